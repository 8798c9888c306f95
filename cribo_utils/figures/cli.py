"""Command line of the figures: ``python -m cribo_utils.figures <figure> [options]``.

Parses the flags (:func:`get_args_parser`), resolves the model, its settings and the images, and calls
the figure's function (:func:`make_figure`); :func:`main` is the entry point of ``__main__``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cribo_utils.figures.attention import plot_attention
from cribo_utils.figures.clusters import plot_clusters
from cribo_utils.figures.curves import plot_curves
from cribo_utils.figures.dense import plot_dense
from cribo_utils.figures.drawing import (
    DEFAULT_DPI,
    SEGMENTATION_SOURCES,
    dataset_palette,
    require_matplotlib,
)
from cribo_utils.figures.model import (
    _check_image_size,
    list_image_files,
    load_figure_model,
    load_folder_images,
    synthetic_images,
)
from cribo_utils.figures.neighbours import plot_neighbours
from data.datasets import IMAGE_EXTENSIONS
from data.synthetic import DEFAULT_LEVEL, OBJECT_COLOUR_MODES, SCENE_LEVELS

FIGURES = ("clusters", "neighbours", "dense", "attention", "curves")
DEFAULT_OUT_DIR = "figures"
DESCRIPTION = "Figures that show what a CrIBo model learned."


def get_args_parser() -> argparse.ArgumentParser:
    """``python -m cribo_utils.figures <figure> [options]``; ``--help`` after a figure lists its options."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument(
        "--out",
        default=DEFAULT_OUT_DIR,
        type=str,
        help="Folder for <figure>.png, or a file path ending in .png.",
    )
    group.add_argument("--dpi", default=DEFAULT_DPI, type=int, help="Resolution of the PNG.")

    model = argparse.ArgumentParser(add_help=False)
    group = model.add_argument_group(
        "model (settings left out are read from the checkpoint, else the "
        "synthetic preset: vit_tiny/16, 6 blocks, 96 px, 8 clusters)"
    )
    group.add_argument(
        "--pretrained_weights",
        default=None,
        type=str,
        help="Checkpoint: a local file (checkpoint.pth, teacher_backbone.pth, released files), a released "
        "model's name (README, Released models) or a URL, downloaded once. Without it a randomly "
        "initialised ViT is shown.",
    )
    group.add_argument(
        "--checkpoint_key",
        default="teacher",
        type=str,
        help='Network of a student/teacher checkpoint ("teacher" or "student").',
    )
    group.add_argument("--arch", default=None, type=str, help="vit_tiny, vit_small or vit_base.")
    group.add_argument("--patch_size", default=None, type=int, help="ViT patch size.")
    group.add_argument("--depth", default=None, type=int, help="Number of transformer blocks.")
    group.add_argument(
        "--image_size",
        default=None,
        type=int,
        help="Side of the network input (a multiple of the patch size); default: the training "
        "crop size stored in the checkpoint.",
    )
    group.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda", "auto"], help="Where to run the model."
    )
    group.add_argument(
        "--seed", default=0, type=int, help="Seed of the random weights, crops and cluster seeds."
    )
    group = model.add_argument_group("images")
    group.add_argument(
        "--images",
        default=None,
        type=str,
        help=f"Folder of image files ({', '.join(IMAGE_EXTENSIONS)}) instead of the synthetic scenes.",
    )
    group.add_argument(
        "--recursive", action="store_true", help="Also take images from the sub-folders of --images."
    )
    group.add_argument("--num_images", default=3, type=int, help="Images shown (one row each).")
    group.add_argument(
        "--synthetic_image_size",
        default=None,
        type=int,
        help="Side of the synthetic scenes (default: the training value, else 128).",
    )
    group.add_argument(
        "--synthetic_object_colours",
        default=None,
        choices=OBJECT_COLOUR_MODES,
        help="Colour mode of the synthetic scenes (default: the training value, else random).",
    )
    group.add_argument(
        "--synthetic_level",
        default=None,
        choices=tuple(SCENE_LEVELS),
        help=f"Level of the synthetic scenes (default: the training value, else {DEFAULT_LEVEL}).",
    )

    clustering = argparse.ArgumentParser(add_help=False)
    group = clustering.add_argument_group("clustering")
    group.add_argument("--n_tokens", default=None, type=int, help="Clusters per image K.")
    group.add_argument("--pos_alpha", default=None, type=float, help="Weight of the positional cost.")
    group.add_argument(
        "--photometric", action="store_true", help="Also apply the training colour augmentation to the views."
    )

    parser = argparse.ArgumentParser(prog="python -m cribo_utils.figures", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="figure", required=True, metavar="{" + ",".join(FIGURES) + "}")
    subparsers.add_parser(
        "clusters", parents=[common, model, clustering], help="two views and the teacher's joint clustering"
    )
    neighbours = subparsers.add_parser(
        "neighbours",
        parents=[common, model, clustering],
        help="objects, their nearest bank objects and the cycle check",
    )
    neighbours.add_argument(
        "--bank_images",
        default=32,
        type=int,
        help="Images stored in the memory bank (after the shown ones in --images).",
    )
    neighbours.add_argument("--objects_per_image", default=2, type=int, help="Objects shown per image.")
    dense = subparsers.add_parser(
        "dense", parents=[common, model], help="dense nearest-neighbour predictions"
    )
    dense.add_argument(
        "--dataset",
        default="synthetic",
        choices=SEGMENTATION_SOURCES,
        help="Memory images and masks (and the validation images when --images is not given).",
    )
    dense.add_argument("--data_path", default=None, type=str, help="Root of --dataset voc / ade20k.")
    dense.add_argument(
        "--masks",
        default=None,
        type=str,
        help="With --images: folder of index-PNG masks named like the images (same stem).",
    )
    dense.add_argument("--memory_images", default=16, type=int, help="Training images in the memory.")
    dense.add_argument("--num_neighbours", default=30, type=int, help="k of the label transfer.")
    dense.add_argument(
        "--temperature", default=0.02, type=float, help="Softmax temperature of the label transfer."
    )
    subparsers.add_parser(
        "attention", parents=[common, model], help="[CLS] attention per head and feature PCA"
    )
    curves = subparsers.add_parser("curves", parents=[common], help="training curves from log.txt")
    curves.add_argument(
        "--log",
        required=True,
        type=str,
        help="log.txt of a training run (log_iterations.txt beside it is read too), or its output folder.",
    )
    curves.add_argument(
        "--smooth", default=None, type=int, help="Moving-average window (default: automatic)."
    )
    return parser


def output_path(out: str, figure: str) -> Path:
    """``out`` if it names a .png file, else ``out/<figure>.png``."""
    path = Path(out)
    return path if path.suffix.lower() == ".png" else path / f"{figure}.png"


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _figure_images(
    args: argparse.Namespace, count: int, offset: int, split: str, synthetic_size: int
) -> list[Image.Image]:
    if args.images:
        return load_folder_images(args.images, count, offset, args.recursive)
    return synthetic_images(
        count,
        split,
        synthetic_size,
        seed=0,
        offset=offset,
        object_colours=args.synthetic_object_colours,
        level=args.synthetic_level,
    )


def _dense_sources(
    args: argparse.Namespace, synthetic_size: int
) -> tuple[Any, list[Image.Image], list[np.ndarray | None], int, list[str]]:
    """(memory dataset, query images, query masks, C, class names) for the dense figure."""
    from torch.utils.data import Subset

    from cribo_utils.eval.dense_nn import DEFAULT_SPLITS, dataset_classes
    from data.datasets import build_segmentation_dataset, load_image, load_mask

    if args.dataset != "synthetic" and not args.data_path:
        raise ValueError(f"--dataset {args.dataset} needs --data_path (the dataset root)")
    synthetic_kwargs = {
        "image_size": synthetic_size,
        "num_train": max(args.memory_images, 1),
        "num_val": max(args.num_images, 1),
        "seed": 0,
        "object_colours": args.synthetic_object_colours,
        "level": args.synthetic_level,
    }
    train_split, val_split = DEFAULT_SPLITS[args.dataset]
    train: Any = build_segmentation_dataset(args.dataset, args.data_path, train_split, None, synthetic_kwargs)
    if len(train) < args.memory_images:
        raise ValueError(
            f"--memory_images {args.memory_images}: the {train_split} split has {len(train)} images"
        )
    num_classes, names = dataset_classes(train)
    memory = Subset(train, range(args.memory_images))
    if args.images:
        files = list_image_files(args.images, args.recursive)
        if len(files) < args.num_images:
            raise ValueError(
                f"--images {args.images!r}: {len(files)} image(s) found, --num_images {args.num_images}"
            )
        files = files[: args.num_images]
        images = [load_image(path) for path in files]
        masks: list[np.ndarray | None] = []
        for path in files:
            if not args.masks:
                masks.append(None)
                continue
            mask_path = Path(args.masks) / (path.stem + ".png")
            if not mask_path.is_file():
                raise FileNotFoundError(
                    f"--masks {args.masks!r}: no mask {mask_path.name!r} for image {str(path)!r}"
                )
            mask = load_mask(mask_path)
            if args.dataset == "ade20k":  # raw ADE20K annotations: 0 = other (ignored), classes 1..150
                mask = np.where(mask == 0, 255, mask.astype(np.int64) - 1).astype(np.uint8)
            masks.append(mask)
        return memory, images, masks, num_classes, names
    val: Any = build_segmentation_dataset(args.dataset, args.data_path, val_split, None, synthetic_kwargs)
    if len(val) < args.num_images:
        raise ValueError(f"--num_images {args.num_images}: the {val_split} split has {len(val)} images")
    pairs = [val[index] for index in range(args.num_images)]
    return memory, [pair[0] for pair in pairs], [np.asarray(pair[1]) for pair in pairs], num_classes, names


def make_figure(args: argparse.Namespace) -> Path:
    """Produce the figure described by parsed CLI flags (see :func:`get_args_parser`)."""
    out_path = output_path(args.out, args.figure)
    if args.figure == "curves":
        return plot_curves(args.log, out_path, smooth=args.smooth, dpi=args.dpi)
    if args.num_images < 1:
        raise ValueError(f"--num_images {args.num_images} must be >= 1")
    figure_model = load_figure_model(
        args.pretrained_weights,
        args.checkpoint_key,
        args.arch,
        args.patch_size,
        args.depth,
        seed=args.seed,
        device=_resolve_device(args.device),
    )
    backbone = figure_model.backbone
    image_size = args.image_size or figure_model.image_size
    _check_image_size(image_size, figure_model.patch_size)
    synthetic_size = int(figure_model.setting("synthetic_image_size", args.synthetic_image_size))
    args.synthetic_object_colours = figure_model.setting(
        "synthetic_object_colours", args.synthetic_object_colours
    )
    args.synthetic_level = figure_model.setting("synthetic_level", args.synthetic_level)
    if args.figure == "attention":
        images = _figure_images(args, args.num_images, 0, "val", synthetic_size)
        return plot_attention(backbone, images, out_path, image_size, dpi=args.dpi)
    if args.figure == "dense":
        memory, images, masks, num_classes, names = _dense_sources(args, synthetic_size)
        return plot_dense(
            backbone,
            memory,
            images,
            masks,
            out_path,
            num_classes,
            dataset_palette(args.dataset),
            names,
            image_size=image_size,
            num_neighbours=args.num_neighbours,
            temperature=args.temperature,
            seed=args.seed,
            dpi=args.dpi,
        )
    n_tokens = int(figure_model.setting("n_tokens", args.n_tokens))
    pos_alpha = figure_model.setting("pos_alpha", args.pos_alpha)
    if isinstance(
        pos_alpha, (list, tuple)
    ):  # training stores (end, start); the trained model used the end value
        pos_alpha = pos_alpha[0]
    pos_alpha = float(pos_alpha)
    images = _figure_images(args, args.num_images, 0, "val", synthetic_size)
    if args.figure == "clusters":
        return plot_clusters(
            backbone,
            images,
            out_path,
            image_size,
            n_tokens,
            pos_alpha,
            seed=args.seed,
            photometric=args.photometric,
            dpi=args.dpi,
        )
    if args.figure == "neighbours":
        if args.bank_images < 1:
            raise ValueError(f"--bank_images {args.bank_images} must be >= 1")
        offset = args.num_images if args.images else 0  # synthetic: the bank comes from the train split
        bank = _figure_images(args, args.bank_images, offset, "train", synthetic_size)
        return plot_neighbours(
            backbone,
            images,
            bank,
            out_path,
            image_size,
            n_tokens,
            pos_alpha,
            objects_per_image=args.objects_per_image,
            seed=args.seed,
            photometric=args.photometric,
            dpi=args.dpi,
        )
    raise ValueError(f"unknown figure {args.figure!r}; choose one of {', '.join(FIGURES)}")


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``argv`` and write the figure; returns its path. Without matplotlib: a one-line exit."""
    args = get_args_parser().parse_args(argv)
    try:
        require_matplotlib()
    except ModuleNotFoundError as error:
        raise SystemExit(f"python -m cribo_utils.figures: {error}") from None
    return make_figure(args)
