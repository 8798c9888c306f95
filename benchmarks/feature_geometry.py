"""Why does a trained network retrieve patches worse (or no better) than a random one? Feature diagnostics.

For random initialisations and trained checkpoints, on the synthetic scenes, this measures what the
last-layer patch features (after the final norm, L2-normalised: what dense NN retrieval uses) contain:

- ``effective_rank``: ``exp(H(p))`` with ``p_i = s_i^2 / sum_j s_j^2`` from the singular values ``s`` of the
  centred validation patch features (1 = all patches on one line, D = isotropic);
- ``cls_mean_cosine``: mean pairwise cosine of the validation [CLS] tokens (1 = image-level collapse);
- ``explained_by_*``: fraction of the patch-feature variance explained by a one-hot regression on the
  image, the object instance (image x label), the class label or the grid position;
- ``retrieval_*``: patch-level retrieval mIoU (0-100): every validation patch takes the softmax-weighted
  vote (k = 10, T = 0.02) of its nearest training patches, labels being the majority class of the patch,
  grouped four ways: ``full`` (13 classes), ``texture`` (background / checkered / striped), ``shape``
  (background + 6 shapes) and ``fg`` (background / object). ``whitened_*`` repeats it after PCA whitening
  fitted on the training patches: when whitening brings a network back to the random level, training
  re-weighted the feature directions rather than removed information.

This is a diagnostic, not the evaluation protocol (``eval_dense_nn.py`` works on pixels, with upsampling
and augmented memory passes); its ``retrieval_full`` follows the protocol's mIoU closely.

    python benchmarks/feature_geometry.py --checkpoints output/checkpoint.pth --depth 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import format_table, machine_info, write_json  # noqa: E402
from cribo_utils.eval.metrics import confusion_matrix, iou_per_class  # noqa: E402
from cribo_utils.weights.checkpoint_formats import build_pretrained_backbone  # noqa: E402
from data.synthetic import NUM_SEG_CLASSES, OBJECT_COLOUR_MODES, SHAPES, SyntheticSegmentation  # noqa: E402
from data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

GROUPINGS = ("full", "texture", "shape", "fg")
SCENE_SIZE = 128  # side of the rendered scenes, as in training (--synthetic_image_size)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "patch-feature diagnostics: random init vs trained",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoints", nargs="*", default=[], help="Trained checkpoints (teacher is used).")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--depth", default=6, type=int, help="Blocks of the random networks.")
    parser.add_argument("--random_seeds", default=2, type=int, help="Random initialisations.")
    parser.add_argument("--num_train", default=600, type=int, help="Synthetic training images (memory).")
    parser.add_argument("--num_val", default=200, type=int, help="Synthetic validation images (queries).")
    parser.add_argument("--input_size", default=96, type=int, help="Network input side (multiple of p).")
    parser.add_argument("--object_colours", default="random", choices=OBJECT_COLOUR_MODES)
    parser.add_argument("--num_neighbours", default=10, type=int)
    parser.add_argument("--temperature", default=0.02, type=float)
    parser.add_argument("--out", default="benchmarks/results/feature_geometry.json")
    return parser


def check_input_size(args: argparse.Namespace) -> None:
    """Raise ValueError unless ``--input_size`` is a multiple of ``--patch_size``."""
    if args.input_size % args.patch_size:
        raise ValueError(
            f"--input_size {args.input_size} must be a multiple of --patch_size {args.patch_size}"
        )


def render_scenes(
    split: str, count: int, object_colours: str, level: str = "legacy"
) -> tuple[Tensor, Tensor]:
    """The first ``count`` scenes of ``split`` at 128 px: (n, 3, 128, 128) pixels in [0, 1], (n, 128, 128)
    uint8 masks. ``level`` is a :data:`data.synthetic.SCENE_LEVELS` name (the shape and texture scores of
    this benchmark read the legacy classes)."""
    dataset = SyntheticSegmentation(
        split,
        image_size=SCENE_SIZE,
        num_train=count,
        num_val=count,
        object_colours=object_colours,
        level=level,
    )
    images, masks = zip(*(dataset.render_arrays(index) for index in range(count)), strict=True)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return pixels, torch.from_numpy(np.stack(masks))


def normalise(pixels: Tensor) -> Tensor:
    """ImageNet mean/std normalisation of (n, 3, H, W) pixels in [0, 1]."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (pixels - mean) / std


def load_split(split: str, count: int, args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """Normalised (n, 3, S, S) inputs and (n, g*g) majority labels per patch."""
    pixels, masks = render_scenes(split, count, args.object_colours)
    pixels = F.interpolate(pixels, size=args.input_size, mode="bilinear", antialias=True, align_corners=False)
    grid = args.input_size // args.patch_size
    one_hot = F.one_hot(masks.long(), NUM_SEG_CLASSES).permute(0, 3, 1, 2)
    labels = F.adaptive_avg_pool2d(one_hot.float(), grid).argmax(1).flatten(1)
    return normalise(pixels), labels


def label_groups(labels: Tensor) -> dict[str, Tensor]:
    """The four label groupings of patch labels (0 = background, c + 1 = class c = texture * 6 + shape)."""
    is_object = labels > 0
    texture = torch.where(is_object, 1 + (labels - 1) // len(SHAPES), 0)
    shape = torch.where(is_object, 1 + (labels - 1) % len(SHAPES), 0)
    return {"full": labels, "texture": texture, "shape": shape, "fg": is_object.long()}


@torch.no_grad()
def network_features(backbone: torch.nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(n, D) [CLS] tokens and (n, N, D) L2-normalised patch tokens, in batches of 64."""
    cls_parts, patch_parts = [], []
    for start in range(0, len(images), 64):
        cls_tokens, patches = backbone.forward_features(images[start : start + 64])
        cls_parts.append(cls_tokens.float())
        patch_parts.append(F.normalize(patches.float(), dim=-1))
    return torch.cat(cls_parts), torch.cat(patch_parts)


def pixel_features(images: Tensor, patch_size: int) -> Tensor:
    """Raw-pixel baseline: each patch's pixels, centred and L2-normalised, (n, N, 3 p^2)."""
    patches = F.unfold(images, patch_size, stride=patch_size).transpose(1, 2)
    return F.normalize(patches - patches.mean(-1, keepdim=True), dim=-1)


def effective_rank(features: Tensor) -> float:
    singular = torch.linalg.svdvals(features - features.mean(0))
    weights = singular.square() / singular.square().sum()
    return float(torch.exp(-(weights * torch.log(weights.clamp_min(1e-12))).sum()))


def explained_variance(features: Tensor, groups: Tensor) -> float:
    """1 - residual / total variance of ``features`` (rows) after subtracting each group's mean."""
    centred = features - features.mean(0)
    ids = torch.unique(groups, return_inverse=True)[1]
    sums = torch.zeros(int(ids.max()) + 1, centred.shape[1]).index_add_(0, ids, centred)
    counts = torch.bincount(ids).float()[:, None]
    residual = centred - (sums / counts)[ids]
    return float(1 - residual.square().sum() / centred.square().sum())


def whiten(memory: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """PCA whitening fitted on ``memory`` applied to both, then L2 normalisation."""
    mean = memory.mean(0)
    covariance = torch.cov((memory - mean).T) + 1e-4 * torch.eye(memory.shape[1])
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    transform = eigenvectors / eigenvalues.clamp_min(1e-6).sqrt()
    return F.normalize((memory - mean) @ transform, dim=-1), F.normalize((queries - mean) @ transform, dim=-1)


def retrieval_miou(
    memory: Tensor, memory_labels: Tensor, queries: Tensor, query_labels: Tensor, args: argparse.Namespace
) -> dict[str, float]:
    """Patch-level k-NN vote mIoU (0-100) for each label grouping."""
    memory_groups, query_groups = label_groups(memory_labels), label_groups(query_labels)
    weights, indices = [], []
    for start in range(0, len(queries), 2048):
        similarity = queries[start : start + 2048] @ memory.T
        top, index = similarity.topk(args.num_neighbours, dim=1)
        weights.append((top / args.temperature).softmax(dim=1))
        indices.append(index)
    weight, index = torch.cat(weights), torch.cat(indices)
    scores = {}
    for name in GROUPINGS:
        num_classes = int(max(memory_groups[name].max(), query_groups[name].max())) + 1
        votes = torch.zeros(len(queries), num_classes).scatter_add_(1, memory_groups[name][index], weight)
        confusion = confusion_matrix(votes.argmax(1), query_groups[name], num_classes)
        present = confusion.sum(0) + confusion.sum(1) > 0
        scores[name] = 100 * float(iou_per_class(confusion)[present].mean())
    return scores


def diagnose(
    name: str,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    features: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    (train_cls, train_patches), (val_cls, val_patches) = features
    dim = val_patches.shape[-1]
    memory, queries = train_patches.reshape(-1, dim), val_patches.reshape(-1, dim)
    memory_labels, query_labels = train[1].flatten(), val[1].flatten()
    num_images, num_patches = val[1].shape
    image_ids = torch.arange(num_images).repeat_interleave(num_patches)
    result: dict[str, Any] = {
        "network": name,
        "effective_rank": effective_rank(queries),
        "explained_by_image": explained_variance(queries, image_ids),
        "explained_by_instance": explained_variance(queries, image_ids * NUM_SEG_CLASSES + query_labels),
        "explained_by_label": explained_variance(queries, query_labels),
        "explained_by_position": explained_variance(queries, torch.arange(num_patches).repeat(num_images)),
    }
    if val_cls is not None:
        cls_unit = F.normalize(val_cls, dim=-1)
        result["cls_mean_cosine"] = float((cls_unit @ cls_unit.T).mean())
    for key, value in retrieval_miou(memory, memory_labels, queries, query_labels, args).items():
        result[f"retrieval_{key}"] = value
    white_memory, white_queries = whiten(memory, queries)
    for key, value in retrieval_miou(white_memory, memory_labels, white_queries, query_labels, args).items():
        result[f"whitened_{key}"] = value
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    check_input_size(args)
    torch.manual_seed(0)
    start = time.perf_counter()
    train, val = load_split("train", args.num_train, args), load_split("val", args.num_val, args)
    rows = [
        diagnose(
            "raw pixels",
            train,
            val,
            (
                (None, pixel_features(train[0], args.patch_size)),
                (None, pixel_features(val[0], args.patch_size)),
            ),
            args,
        )
    ]
    networks = [(f"random init, seed {seed}", None, seed) for seed in range(args.random_seeds)]
    networks += [(path, path, 0) for path in args.checkpoints]
    for name, weights, seed in networks:
        backbone = build_pretrained_backbone(
            args.arch, args.patch_size, weights, depth=args.depth if weights is None else None, init_seed=seed
        )
        features = (network_features(backbone, train[0]), network_features(backbone, val[0]))
        rows.append(diagnose(name, train, val, features, args))

    metrics = [key for key in rows[-1] if key != "network"]
    # One column per network (metrics as rows keeps the table narrow).
    headers = ["metric", *(row["network"][-28:] for row in rows)]
    print(format_table(headers, [[key, *(row.get(key) for row in rows)] for key in metrics]))
    random_rows = [row for row in rows if row["network"].startswith("random init")]
    summary = {
        "protocol": vars(args),
        "machine": machine_info(),
        "rows": rows,
        "random_mean": (
            {key: statistics.mean(row[key] for row in random_rows) for key in metrics} if random_rows else {}
        ),
        "seconds": time.perf_counter() - start,
    }
    write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
