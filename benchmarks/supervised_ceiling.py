"""What a network of the default shape can reach with labels: the yardstick for the learning signal.

Trains the same backbone as the default run (ViT-Tiny/16, 6 blocks, 96 px) on the synthetic training
scenes with a per-patch linear classifier and the cross-entropy against each patch's majority label,
``L = mean_{b,n} -log softmax(W z_{b,n} + c)[y_{b,n}]``, for a fixed number of iterations (the
pretraining's random resized crops of the 128 px scenes and horizontal flips, AdamW, linear warm-up then
cosine decay), and saves the backbone as a bare state dict (DINO's backbone-only layout) that every
evaluation and ``learning_signal.py`` load. It answers "can the protocol see learned dense features, and
how far does this network get in this budget?"; it is not self-supervised and never part of training.

    python benchmarks/supervised_ceiling.py --iterations 384 --out output/supervised/backbone.pth
    python benchmarks/learning_signal.py --checkpoints output/supervised/backbone.pth --depth 6
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.feature_geometry import check_input_size, normalise, render_scenes  # noqa: E402
from cribo_utils.train.checkpoint import atomic_save  # noqa: E402
from data.synthetic import DEFAULT_LEVEL, OBJECT_COLOUR_MODES, SCENE_LEVELS  # noqa: E402
from models import ARCHS, build_backbone  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "supervised per-patch ceiling", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--arch", default="vit_tiny", choices=ARCHS)
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--depth", default=6, type=int)
    parser.add_argument("--input_size", default=96, type=int, help="Training side (multiple of patch).")
    parser.add_argument("--num_train", default=2048, type=int, help="Synthetic training scenes.")
    parser.add_argument("--object_colours", default="random", choices=OBJECT_COLOUR_MODES)
    parser.add_argument("--level", default=DEFAULT_LEVEL, choices=tuple(SCENE_LEVELS), help="Scene level.")
    parser.add_argument(
        "--crop_scale",
        default=(0.25, 1.0),
        type=float,
        nargs=2,
        help="Area range of the random crops (the pretraining's --global_crops_scale).",
    )
    parser.add_argument("--iterations", default=384, type=int, help="384 = the default run's count.")
    parser.add_argument("--batch_size", default=32, type=int)
    parser.add_argument("--lr", default=1e-3, type=float, help="Peak AdamW learning rate.")
    parser.add_argument("--warmup_iterations", default=50, type=int)
    parser.add_argument("--weight_decay", default=0.04, type=float)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--out", default="output/supervised/backbone.pth")
    return parser


def learning_rate(iteration: int, args: argparse.Namespace) -> float:
    """Linear warm-up to ``lr`` over ``warmup_iterations``, then half-cosine decay to 0."""
    warmup = min(1.0, (iteration + 1) / max(1, args.warmup_iterations))
    return args.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * iteration / args.iterations))


def random_crops(
    images: Tensor, masks: Tensor, args: argparse.Namespace, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Square random resized crops (area fraction ~ U(crop_scale)), random horizontal flips, resized to
    ``input_size``; returns the crops and each patch's majority label, (B, 3, S, S) and (B, S/p, S/p).

    One affine grid for the whole batch: a crop of side fraction f centred at (x, y) (normalised
    coordinates) maps output coordinate u to f u + x, with f negated for a flip.
    """
    batch = images.shape[0]
    low, high = args.crop_scale
    side = (low + (high - low) * torch.rand(batch, generator=generator)).sqrt()
    centre = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = centre
    size = (batch, 1, args.input_size, args.input_size)
    grid = F.affine_grid(theta, size, align_corners=False)
    crops = F.grid_sample(images, grid, mode="bilinear", align_corners=False)
    num_labels = SCENE_LEVELS[args.level].num_classes + 1
    one_hot = F.one_hot(masks.long(), num_labels).permute(0, 3, 1, 2).float()
    label_maps = F.grid_sample(one_hot, grid, mode="bilinear", align_corners=False)
    labels = F.adaptive_avg_pool2d(label_maps, args.input_size // args.patch_size).argmax(1)
    return crops, labels


def train(args: argparse.Namespace) -> dict[str, float]:
    """Train, save the backbone atomically, return the losses and the wall time."""
    check_input_size(args)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    pixels, masks = render_scenes("train", args.num_train, args.object_colours, args.level)
    images = normalise(pixels)
    backbone = build_backbone(args.arch, args.patch_size, img_size=args.input_size, depth=args.depth)
    classifier = torch.nn.Linear(backbone.embed_dim, SCENE_LEVELS[args.level].num_classes + 1)
    optimizer = torch.optim.AdamW(
        [*backbone.parameters(), *classifier.parameters()], weight_decay=args.weight_decay
    )
    start = time.perf_counter()
    losses = []
    for iteration in range(args.iterations):
        index = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        batch, target = random_crops(images[index], masks[index], args, generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(iteration, args)
        _, patches = backbone.forward_features(batch)
        loss = F.cross_entropy(classifier(patches).flatten(0, 1), target.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if iteration % 50 == 0 or iteration == args.iterations - 1:
            print(
                f"iteration {iteration}: loss {losses[-1]:.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(backbone.state_dict(), args.out)
    return {"first_loss": losses[0], "last_loss": losses[-1], "train_seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = get_args_parser().parse_args(argv)
    summary = train(args)
    print(json.dumps({**summary, "checkpoint": args.out}))
    return summary


if __name__ == "__main__":
    main()
