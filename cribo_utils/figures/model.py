"""The backbone a figure looks at and the images it is shown.

:func:`load_figure_model` builds a random (seeded) or checkpoint-loaded ViT or conv net with the settings
resolved for it (:class:`FigureModel`); the image sources are the synthetic scenes
(:func:`synthetic_images`) and folders of image files (:func:`load_folder_images`), and
:func:`square_input` turns a picture into a network input.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor, nn

from cribo_utils.train.parser import SYNTHETIC_PRESET
from data.synthetic import DEFAULT_LEVEL

if TYPE_CHECKING:
    from models.vision_transformer import VisionTransformer

logger = logging.getLogger(__name__)

#: Default input side of the figures for a conv net (a multiple of its stride 32).
_CONV_FIGURE_IMAGE_SIZE = 224


# Settings used when neither the command line nor the checkpoint gives them: the synthetic CPU preset
# (the default data set), and the parser's defaults for the two data-set keys the preset leaves alone.
_FALLBACK: dict[str, Any] = {
    **{key: SYNTHETIC_PRESET[key] for key in ("arch", "patch_size", "depth", "image_size", "n_tokens")},
    "pos_alpha": SYNTHETIC_PRESET["pos_alpha"][0],
    "synthetic_image_size": 128,
    "synthetic_object_colours": "random",
    "synthetic_level": DEFAULT_LEVEL,
}


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def list_image_files(directory: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """The image files of ``--images``: :func:`data.datasets.list_images` of ``directory`` (its
    ``IMAGE_EXTENSIONS``, hidden files and folders skipped, sorted by relative path), sub-folders included
    when ``recursive``.

    Raises:
        FileNotFoundError: ``directory`` is not a folder.
        ValueError: no image file was found (the message suggests ``--recursive``).
    """
    from data.datasets import IMAGE_EXTENSIONS, list_images

    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {str(root)!r}: not a folder; pass a folder of image files")
    files = list_images(root, recursive=recursive)
    if not files:
        hint = "" if recursive else "; add --recursive to search its sub-folders"
        raise ValueError(f"--images {str(root)!r}: no image file found ({', '.join(IMAGE_EXTENSIONS)}){hint}")
    return files


def load_folder_images(
    directory: str | os.PathLike[str], count: int, offset: int = 0, recursive: bool = False
) -> list[Image.Image]:
    """Images ``offset .. offset + count - 1`` of :func:`list_image_files`, as RGB PIL images.

    Raises:
        ValueError: the folder holds fewer than ``offset + count`` images.
    """
    from data.datasets import load_image

    files = list_image_files(directory, recursive)
    if len(files) < offset + count:
        raise ValueError(
            f"--images {str(directory)!r}: {len(files)} image(s) found, {offset + count} needed "
            "(lower --num_images / --bank_images / --memory_images, or add images)"
        )
    return [load_image(path) for path in files[offset : offset + count]]


def synthetic_images(
    count: int,
    split: str = "val",
    image_size: int = 128,
    seed: int = 0,
    offset: int = 0,
    object_colours: str = "random",
    level: str = DEFAULT_LEVEL,
) -> list[Image.Image]:
    """Images ``offset .. offset + count - 1`` of a split of the synthetic scenes (PIL RGB)."""
    from data.synthetic import SyntheticScenes

    total = max(offset + count, 1)
    dataset = SyntheticScenes(
        split=split,
        image_size=image_size,
        num_train=total,
        num_val=total,
        seed=seed,
        object_colours=object_colours,
        level=level,
    )
    return [dataset.render(index)[0] for index in range(offset, offset + count)]


def square_input(image: Image.Image, size: int) -> Tensor:
    """Resize the shorter side to ``size`` (bicubic), centre-crop ``size x size``, ImageNet-normalise.

    Returns:
        (3, size, size) float32.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from data.transforms import normalize

    resized = TF.center_crop(TF.resize(image, size, InterpolationMode.BICUBIC), [size, size])
    return normalize()(resized)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's and Python's global RNGs inside the block and restore the caller's state after."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


def _check_image_size(image_size: int, patch_size: int) -> None:
    if image_size <= 0 or image_size % patch_size:
        raise ValueError(
            f"--image_size {image_size} must be a positive multiple of --patch_size {patch_size} "
            f"(e.g. {max(1, round(image_size / patch_size)) * patch_size})"
        )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@dataclass
class FigureModel:
    """A frozen backbone and the settings resolved for it.

    Attributes:
        backbone: eval-mode ViT with ``forward_features`` and ``get_last_selfattention``.
        arch, patch_size, depth: its architecture.
        training_args: the training arguments stored in the checkpoint ({} if none or random weights).
        image_size: the input side to use by default (training crop size, else the checkpoint's
            positional grid, else the synthetic preset's).
    """

    backbone: VisionTransformer
    arch: str
    patch_size: int
    depth: int
    training_args: dict[str, Any]
    image_size: int

    def setting(self, name: str, explicit: Any = None) -> Any:
        """``explicit`` if given, else the checkpoint's training argument ``name``, else the fallback."""
        if explicit is not None:
            return explicit
        if self.training_args.get(name) is not None:
            return self.training_args[name]
        return _FALLBACK[name]


def load_figure_model(
    weights: str | None = None,
    checkpoint_key: str = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
    depth: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FigureModel:
    """Build the backbone the figures look at: random (seeded) or loaded strictly from a checkpoint.

    Settings are resolved as: explicit argument > the checkpoint's stored training arguments (or the
    ``args.json`` next to it) > what the weights' shapes say (width -> arch, patch embedding -> patch
    size, blocks -> depth) > the synthetic preset (``vit_tiny``, patch 16, depth 6). Arch and patch size
    come from :func:`cribo_utils.weights.checkpoint_formats.resolve_architecture`, the training arguments from
    :func:`cribo_utils.weights.checkpoint_formats.stored_training_args`; a checkpoint's depth is its
    weights' own.

    Args:
        weights: any checkpoint layout of :mod:`cribo_utils.weights.checkpoint_formats`; None: random weights.
        checkpoint_key: network of a student/teacher checkpoint (``teacher`` by default).
        arch: ``vit_tiny`` / ``vit_small`` / ``vit_base`` / ``vit_large``, or a conv arch
            (``resnet50``, ``convnext_*``; also chosen when the checkpoint records one or its weights are
            a conv net's).
        patch_size: ViT patch size.
        depth: number of blocks.
        seed: seed of the random initialisation.
        device: where to put the backbone.
    Returns:
        :class:`FigureModel`.
    Raises:
        ValueError: an explicit (or recorded) setting contradicts the weights (the message names the
            flag), or nothing tells the architecture of the weights (the message asks for ``--arch``).
    """
    from cribo_utils.weights.checkpoint_formats import resolve_architecture
    from models import CONV_ARCHS, build_backbone

    if weights is not None:
        resolved_arch, resolved_patch = resolve_architecture(weights, checkpoint_key, arch, patch_size)
        if resolved_arch in CONV_ARCHS:
            return _conv_figure_model(resolved_arch, weights, checkpoint_key, seed, device)
        figure_model = _load_vit(
            weights, checkpoint_key, (arch, patch_size, depth), (resolved_arch, resolved_patch)
        )
    elif arch in CONV_ARCHS:
        return _conv_figure_model(arch, None, checkpoint_key, seed, device)
    else:
        if arch is None:  # the synthetic preset as a whole; an explicit --arch keeps its own depth
            arch, depth = _FALLBACK["arch"], depth or _FALLBACK["depth"]
        patch_size = patch_size or _FALLBACK["patch_size"]
        with _seeded(seed):
            backbone = build_backbone(arch, patch_size=patch_size, depth=depth)
        logger.warning(
            "RANDOM INITIALISATION: no --pretrained_weights given, drawing a random %s/%d with %d "
            "blocks (seed %d)",
            arch,
            patch_size,
            len(backbone.blocks),
            seed,
        )
        figure_model = FigureModel(
            backbone, arch, patch_size, len(backbone.blocks), {}, _FALLBACK["image_size"]
        )
    figure_model.backbone.eval()
    figure_model.backbone.requires_grad_(False)
    figure_model.backbone.to(device)
    return figure_model


def _load_vit(
    weights: str,
    checkpoint_key: str,
    given: tuple[str | None, int | None, int | None],
    resolved: tuple[str, int],
) -> FigureModel:
    """The ViT of ``weights``, built to its shapes and loaded strictly (not yet frozen or moved).

    Args:
        given: the explicit (arch, patch size, depth), None where not given.
        resolved: (arch, patch size) of :func:`cribo_utils.weights.checkpoint_formats.resolve_architecture`.
    Raises:
        ValueError: a given or recorded setting contradicts the weights' shapes (the message names the flag).
    """
    from cribo_utils.weights.architecture_detection import detect_architecture
    from cribo_utils.weights.checkpoint_formats import (
        checkpoint_depth,
        checkpoint_image_size,
        extract_backbone_state_dict,
        load_backbone_state_dict,
        load_checkpoint_file,
        stored_training_args,
    )
    from models import build_backbone

    checkpoint = load_checkpoint_file(weights)
    training_args = stored_training_args(checkpoint, weights)
    state_dict = extract_backbone_state_dict(checkpoint, checkpoint_key)
    detected = detect_architecture(state_dict)
    weights_depth = checkpoint_depth(state_dict)
    depth = (
        given[2]
        if given[2] is not None
        else weights_depth or training_args.get("depth") or _FALLBACK["depth"]
    )
    for flag, explicit, value, found in zip(
        ("arch", "patch_size", "depth"),
        given,
        (*resolved, depth),
        (detected.arch, detected.patch_size, weights_depth),
        strict=True,
    ):
        if found is None or value == found:
            continue
        if explicit is not None:
            raise ValueError(
                f"--{flag} {explicit} does not match the weights in {weights!r} ({flag} {found}); "
                f"pass --{flag} {found} or leave it out"
            )
        raise ValueError(
            f"the training arguments of {weights!r} say {flag} {value} but its weights have {flag} "
            f"{found}; pass --{flag} {found}"
        )
    arch, patch_size = resolved
    grid_size = checkpoint_image_size(state_dict, patch_size)
    backbone = build_backbone(
        arch, patch_size=patch_size, img_size=grid_size, depth=depth, **detected.vit_options()
    )
    load_backbone_state_dict(backbone, state_dict, source=f"{weights!r} (key {checkpoint_key!r})")
    image_size = int(training_args.get("image_size") or grid_size)
    logger.info("loaded %s/%d (%d blocks) from %s", arch, patch_size, depth, weights)
    return FigureModel(backbone, arch, patch_size, int(depth), training_args, image_size)


def _conv_figure_model(
    arch: str, weights: str | None, checkpoint_key: str, seed: int, device: str | torch.device
) -> FigureModel:
    """:class:`FigureModel` of a conv backbone (ResNet-50, ConvNeXt), random (seeded) or from ``weights``.

    Its dense grid (last stage, stride 32) stands for the patch tokens; it has no attention.
    """
    from cribo_utils.weights.checkpoint_formats import build_pretrained_backbone
    from models import build_eval_backbone

    if weights is None:
        with _seeded(seed):
            backbone = build_eval_backbone(arch)
        backbone.eval().requires_grad_(False)
        logger.warning("RANDOM INITIALISATION: no --pretrained_weights given, drawing a random %s", arch)
    else:
        backbone = build_pretrained_backbone(arch, 16, weights, checkpoint_key)
    backbone.to(device)
    # FigureModel types its backbone as a ViT; conv nets share the interface the figures use.
    return FigureModel(
        backbone,  # type: ignore[arg-type]
        arch,
        int(getattr(backbone, "patch_size")),  # noqa: B009
        0,
        {},
        _CONV_FIGURE_IMAGE_SIZE,
    )


def _device_of(backbone: nn.Module) -> torch.device:
    return next(backbone.parameters()).device


def _patch_size(backbone: nn.Module) -> int:
    # getattr: typed as nn.Module, whose attribute access mypy sees as Tensor | Module.
    return int(getattr(backbone, "patch_size"))  # noqa: B009
