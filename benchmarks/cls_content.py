"""What does the [CLS] token encode? Its variance explained by each property of the synthetic scenes.

The README's k-NN and linear probes ask whether the final-norm [CLS] token tells the image label (the class
of the largest object). When it does not, this says what it tells instead. For random initialisations and
checkpoints, on ``--num_images`` validation scenes, the L2-normalised [CLS] tokens ``Z`` (what the k-NN
probe compares) are regressed by least squares on one scene property ``P`` at a time (with an intercept),
and the fraction of their variance it explains is reported:

    R^2(P) = 1 - ||Z - [P 1] B*||_F^2 / ||Z - mean(Z)||_F^2,   B* = argmin_B ||Z - [P 1] B||_F^2

Properties: ``label`` (one-hot image label), ``count`` (one-hot number of visible objects), ``area``
(foreground fraction), ``background_colour`` (the background's two RGB colours), ``outline`` (one-hot shape
of the largest object), ``background_family`` (one-hot gradient / clouds / dots), ``centroid`` (mean
foreground position). One-hot regressors explain their share of a random ``Z`` by chance alone, about
``(levels - 1) / num_images``; the ``chance`` row gives it for every property, from tokens drawn at random.

    python benchmarks/cls_content.py --checkpoints output/checkpoint.pth --depth 6
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import default_out, format_table, machine_info, write_json  # noqa: E402
from data.scene_render import label_from_mask, render_scene  # noqa: E402
from data.synthetic import (  # noqa: E402
    BACKGROUNDS,
    DEFAULT_LEVEL,
    SCENE_LEVELS,
    SHAPES,
    Scene,
    SceneLevel,
    SyntheticSegmentation,
)
from data.transforms import normalize  # noqa: E402

PROPERTIES = ("label", "count", "area", "background_colour", "outline", "background_family", "centroid")
# Scenes of the tuning runs (learning_signal.py's protocol seed is kept for the README's table).
TUNING_SEED = 1


def _one_hot(index: int, size: int) -> list[float]:
    return [float(index == k) for k in range(size)]


def scene_properties(scene: Scene, mask: np.ndarray, instances: np.ndarray, level: SceneLevel) -> dict:
    """Every property of :data:`PROPERTIES` of one rendered scene, as a list of regressor values."""
    visible = [k for k in range(len(scene.objects)) if (instances == k + 1).any()]
    largest = max(visible, key=lambda k: int((instances == k + 1).sum()))
    rows, cols = np.nonzero(mask > 0)
    size = scene.image_size
    return {
        "label": _one_hot(label_from_mask(mask), level.num_classes),
        "count": _one_hot(len(visible) - 1, level.max_objects),
        "area": [float((mask > 0).mean())],
        "background_colour": [value / 255.0 for colour in scene.background_colours for value in colour],
        "outline": _one_hot(SHAPES.index(scene.objects[largest].shape), len(SHAPES)),
        "background_family": _one_hot(BACKGROUNDS.index(scene.background), len(BACKGROUNDS)),
        "centroid": [float(cols.mean()) / size, float(rows.mean()) / size],
    }


def explained_variance(tokens: Tensor, regressors: Tensor) -> float:
    """R^2 of the least-squares fit of ``tokens`` (n, D) on ``regressors`` (n, p) plus an intercept."""
    design = torch.cat([regressors.double(), torch.ones(len(regressors), 1, dtype=torch.float64)], dim=1)
    tokens = tokens.double()
    solution = torch.linalg.lstsq(design, tokens).solution
    residual = tokens - design @ solution
    return float(1.0 - residual.pow(2).sum() / (tokens - tokens.mean(0)).pow(2).sum())


def validation_scenes(num_images: int, seed: int, level: str, image_size: int) -> tuple[Tensor, dict]:
    """Normalised images (n, 3, S, S) and the properties (name -> (n, p) tensor) of the validation scenes."""
    split = SyntheticSegmentation("val", image_size=image_size, num_val=num_images, seed=seed, level=level)
    images, table = [], {name: [] for name in PROPERTIES}
    for index in range(num_images):
        scene = split.scene(index)
        image, mask, instances = render_scene(scene)
        images.append(normalize()(Image.fromarray(image)))
        for name, values in scene_properties(scene, mask, instances, split.level).items():
            table[name].append(values)
    return torch.stack(images), {name: torch.tensor(values) for name, values in table.items()}


@torch.no_grad()
def cls_tokens(backbone: torch.nn.Module, images: Tensor, batch_size: int = 100) -> Tensor:
    """L2-normalised final-norm [CLS] tokens (n, D)."""
    parts = [backbone(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return torch.nn.functional.normalize(torch.cat(parts), dim=-1)


def content_row(tokens: Tensor, properties: dict[str, Tensor]) -> dict[str, float]:
    return {name: explained_variance(tokens, properties[name]) for name in PROPERTIES}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("what the [CLS] token encodes", add_help=True)
    parser.add_argument("--checkpoints", nargs="*", default=[], help="Trained checkpoints (their teachers).")
    parser.add_argument("--random_seeds", default=1, type=int, help="Random initialisations to include.")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--depth", default=6, type=int, help="Blocks of the random networks.")
    parser.add_argument("--num_images", default=1000, type=int, help="Validation scenes.")
    parser.add_argument("--input_size", default=128, type=int, help="Side of the scenes and the input.")
    parser.add_argument("--level", default=DEFAULT_LEVEL, choices=tuple(SCENE_LEVELS))
    parser.add_argument("--synthetic_seed", default=TUNING_SEED, type=int, help="Seed of the scenes.")
    parser.add_argument("--out", default=default_out("cls_content"))
    return parser


def main(argv: list[str] | None = None) -> dict:
    from cribo_utils.weights.checkpoint_formats import build_pretrained_backbone

    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    images, properties = validation_scenes(args.num_images, args.synthetic_seed, args.level, args.input_size)
    generator = torch.Generator().manual_seed(0)
    rows = {
        "chance (random tokens)": content_row(torch.randn(len(images), 192, generator=generator), properties)
    }
    networks = [(f"random init {seed}", None, seed) for seed in range(args.random_seeds)]
    networks += [(path, path, 0) for path in args.checkpoints]
    for name, weights, seed in networks:
        backbone = build_pretrained_backbone(
            args.arch, args.patch_size, weights, depth=args.depth, init_seed=seed
        )
        rows[name] = content_row(cls_tokens(backbone, images), properties)
    print(
        format_table(
            ["network", *PROPERTIES],
            [[name[-40:], *(f"{row[key]:.3f}" for key in PROPERTIES)] for name, row in rows.items()],
            title=f"[CLS] variance explained (R^2) on {args.num_images} {args.level} validation scenes",
        )
    )
    summary = {
        "protocol": vars(args),
        "machine": machine_info(),
        "r2": rows,
        "seconds": time.perf_counter() - start,
    }
    write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
