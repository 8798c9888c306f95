"""Figures that show what a CrIBo model learned.

    python -m cribo_utils.visualize clusters                       # random ViT, synthetic scenes
    python -m cribo_utils.visualize clusters --pretrained_weights out/checkpoint.pth
    python -m cribo_utils.visualize neighbours --pretrained_weights out/teacher_backbone.pth --images photos/
    python -m cribo_utils.visualize dense --pretrained_weights vits16-in.pth --dataset voc --data_path VOC/
    python -m cribo_utils.visualize attention --images photos/ --recursive --image_size 224
    python -m cribo_utils.visualize curves --log out/log.txt

Five figures, each a function returning the path of the PNG it wrote (default folder ``figures/``):

1. ``clusters`` (:func:`plot_clusters`): two augmented views of an image and the teacher's joint
   two-view clustering of their patch tokens (CrIBo method doc Sec. 4), one colour per cluster, the same
   colour in both views; clusters present in one view only (discarded by the method) are grey.
2. ``neighbours`` (:func:`plot_neighbours`): a memory bank is built on the fly from other images (teacher,
   clustering, per-view object representations, Sec. 7), then every shown object retrieves its nearest
   bank object from each view with the cycle-consistency test (Sec. 8); the retrieved object is drawn in
   the bank image it came from, framed green when the test passed and red when it failed.
3. ``dense`` (:func:`plot_dense`): image, ground truth and the dense nearest-neighbour prediction
   (dense-nn-protocol.md Part A, via :mod:`cribo_utils.eval.dense_nn`) with the dataset's palette.
4. ``attention`` (:func:`plot_attention`): the last block's [CLS] attention of every head and the first
   three principal components of the patch features as RGB (:func:`pca_rgb`).
5. ``curves`` (:func:`plot_curves`): every loss term, the schedules, the cluster count and the
   cycle-consistent fraction against the iteration, from a training ``log.txt``.

Every model figure runs on a randomly initialised ViT (no ``--pretrained_weights``) or on any checkpoint
:mod:`cribo_utils.weights.checkpoint_formats` reads, on the synthetic scenes (default) or on a folder of
images
(``--images DIR``, optionally ``--recursive``). Settings not given on the command line are read from the
checkpoint's stored training arguments when it has them (``arch``, ``patch_size``, ``depth``,
``image_size``, ``n_tokens``, ``pos_alpha``), else from the weights themselves, else from the synthetic
CPU preset of :mod:`cribo_utils.train.parser`. Figure sizes are exact: a grid of ``rows x cols`` panels of
``panel`` inches at ``dpi`` is ``cols * panel_w * dpi`` by ``rows * panel_h * dpi`` pixels.
"""

from __future__ import annotations

import argparse
import colorsys
import logging
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from cribo_utils.train.parser import SYNTHETIC_PRESET
from data.synthetic import DEFAULT_LEVEL, OBJECT_COLOUR_MODES, SCENE_LEVELS
from data.transforms import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from cribo_utils.method.memory_bank import CentroidMemoryBank
    from data.transforms import CropBox
    from models.vision_transformer import VisionTransformer

logger = logging.getLogger(__name__)

FIGURES = ("clusters", "neighbours", "dense", "attention", "curves")
DEFAULT_OUT_DIR = "figures"
DEFAULT_DPI = 100
SEGMENTATION_SOURCES = ("synthetic", "voc", "ade20k")

#: Panel sizes in inches (width, height) of each figure's grid.
IMAGE_PANEL: tuple[float, float] = (2.5, 2.5)
CURVE_PANEL: tuple[float, float] = (4.0, 3.0)

#: Colour of clusters present in one view only (discarded by CrIBo).
INVALID_CLUSTER_COLOUR: tuple[int, int, int] = (128, 128, 128)
#: Colour of the ignore label (255) in every palette (VOC's own colour for 255).
IGNORE_COLOUR: tuple[int, int, int] = (224, 224, 192)
#: Seed of the fixed random ADE20K palette.
ADE20K_PALETTE_SEED = 20160

#: Default input side of the figures for a conv net (a multiple of its stride 32).
_CONV_FIGURE_IMAGE_SIZE = 224

_EMBED_DIM_TO_ARCH = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}

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
# Colours
# --------------------------------------------------------------------------------------------------


def cluster_palette(n_clusters: int) -> np.ndarray:
    """K distinct, saturated colours, one per cluster id (never grey, so discarded clusters stand out).

    Hue of cluster k: ``frac(k * 0.618034)`` (golden-ratio spacing, neighbours in id far apart in hue),
    saturation 0.8, value alternating 0.95 / 0.7 between even and odd ids.

    Args:
        n_clusters: K >= 1.
    Returns:
        (K, 3) uint8 RGB colours.
    """
    if n_clusters < 1:
        raise ValueError(f"cluster_palette: n_clusters must be >= 1 (`--n_tokens`), got {n_clusters}")
    colours = [
        colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.8, 0.95 if k % 2 == 0 else 0.7) for k in range(n_clusters)
    ]
    return np.round(np.asarray(colours) * 255).astype(np.uint8)


def colour_cluster_labels(
    labels: np.ndarray | Tensor, valid: np.ndarray | Tensor, palette: np.ndarray | None = None
) -> np.ndarray:
    """Map hard cluster ids of one image to colours: ``palette[k]`` if cluster k is valid, else grey.

    The same id gets the same colour wherever it occurs, so passing both views' labels of an image
    (e.g. a (2, h, w) array) colours a cluster identically in the two views.

    Args:
        labels: integer cluster ids in [0, K), any shape (...).
        valid: (K,) bool, True for clusters present in both views.
        palette: (K, 3) uint8 colours; :func:`cluster_palette` (K) by default.
    Returns:
        (..., 3) uint8 colours.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64)
    valid = np.asarray(valid.cpu() if isinstance(valid, Tensor) else valid).astype(bool)
    if valid.ndim != 1:
        raise ValueError(f"colour_cluster_labels: valid must be (K,), got shape {valid.shape}")
    n_clusters = valid.shape[0]
    if labels.size and (labels.min() < 0 or labels.max() >= n_clusters):
        raise ValueError(
            f"colour_cluster_labels: labels must lie in [0, {n_clusters}), "
            f"got [{labels.min()}, {labels.max()}]"
        )
    palette = cluster_palette(n_clusters) if palette is None else np.asarray(palette, dtype=np.uint8)
    if palette.shape != (n_clusters, 3):
        raise ValueError(f"colour_cluster_labels: palette must be ({n_clusters}, 3), got {palette.shape}")
    table = np.where(valid[:, None], palette, np.asarray(INVALID_CLUSTER_COLOUR, dtype=np.uint8))
    return table[labels]


def random_palette(seed: int = ADE20K_PALETTE_SEED, size: int = 256) -> np.ndarray:
    """A fixed random palette, (size, 3) uint8; entry 255 is :data:`IGNORE_COLOUR` (used for ADE20K)."""
    palette = np.random.default_rng(seed).integers(0, 256, size=(size, 3)).astype(np.uint8)
    if size > 255:
        palette[255] = IGNORE_COLOUR
    return palette


def dataset_palette(name: str) -> np.ndarray:
    """The (256, 3) uint8 palette of a segmentation dataset: VOC's for ``voc`` and ``synthetic``, a fixed
    random palette (:func:`random_palette`) for ``ade20k``."""
    if name in ("voc", "synthetic"):
        from data.palette import voc_palette

        return voc_palette()
    if name == "ade20k":
        return random_palette()
    raise ValueError(f"--dataset {name!r}: expected one of {', '.join(SEGMENTATION_SOURCES)}")


def colourise_mask(mask: np.ndarray | Tensor, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids in [0, 255] -> (H, W, 3) uint8 colours ``palette[id]``."""
    mask = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask).astype(np.int64)
    if mask.size and (mask.min() < 0 or mask.max() >= len(palette)):
        raise ValueError(
            f"colourise_mask: class ids must lie in [0, {len(palette)}), got [{mask.min()}, {mask.max()}]"
        )
    return palette[mask]


def upsample_patch_grid(grid: np.ndarray, patch_size: int) -> np.ndarray:
    """Repeat every patch entry ``patch_size`` times along both axes: (h, w, ...) -> (h p, w p, ...)."""
    return np.repeat(np.repeat(grid, patch_size, axis=0), patch_size, axis=1)


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool, True on pixels whose right or lower neighbour has another label."""
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edges[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edges


def blend(image: np.ndarray, colours: np.ndarray, opacity: float = 0.55) -> np.ndarray:
    """``(1 - a) * image + a * colours`` for uint8 (H, W, 3) arrays; returns uint8."""
    mixed = (1.0 - opacity) * image.astype(np.float32) + opacity * colours.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def denormalize(images: Tensor) -> np.ndarray:
    """ImageNet-normalised (..., 3, H, W) tensors back to (..., H, W, 3) uint8 pictures."""
    array = images.detach().float().cpu().movedim(-3, -1).numpy()
    restored = array * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return np.clip(np.rint(restored * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Principal components of patch features
# --------------------------------------------------------------------------------------------------


def pca_rgb(features: Tensor, n_components: int = 3) -> Tensor:
    """Project patch features on their first principal components and scale each to [0, 1] (RGB).

    Fitted jointly on all T = B N tokens, so colours are comparable across images:

        mu = mean_t x_t,   C = (1 / (T - 1)) sum_t (x_t - mu)(x_t - mu)^T,   C v_c = lambda_c v_c,
        lambda_1 >= lambda_2 >= lambda_3,   y_{t,c} = <x_t - mu, v_c>,
        rgb_{t,c} = (y_{t,c} - min_t y_{t,c}) / (max_t y_{t,c} - min_t y_{t,c})   (0.5 if the range is 0).

    The sign of each v_c is fixed so that its entry of largest magnitude is positive (deterministic).

    Args:
        features: (B, N, D) patch tokens.
        n_components: number of components (3 for RGB), at most D.
    Returns:
        (B, N, n_components) float32 in [0, 1].
    """
    if features.ndim != 3:
        raise ValueError(f"pca_rgb: features must be (B, N, D), got {tuple(features.shape)}")
    batch, tokens, dim = features.shape
    if not 1 <= n_components <= dim:
        raise ValueError(f"pca_rgb: n_components must lie in [1, {dim}], got {n_components}")
    flat = features.reshape(batch * tokens, dim).double()
    centred = flat - flat.mean(dim=0, keepdim=True)
    covariance = centred.T @ centred / max(batch * tokens - 1, 1)
    _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    components = eigenvectors[:, -n_components:].flip(-1)  # (D, c), largest variance first
    largest = components.abs().argmax(dim=0)
    signs = torch.sign(components[largest, torch.arange(n_components)])
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    projected = centred @ components  # (T, c)
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    span = high - low
    scaled = torch.where(
        span > 1e-12, (projected - low) / span.clamp_min(1e-12), torch.full_like(projected, 0.5)
    )
    return scaled.float().reshape(batch, tokens, n_components)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def image_extensions() -> tuple[str, ...]:
    """Every file extension Pillow can open (lower case, with the dot)."""
    return tuple(sorted(extension.lower() for extension in Image.registered_extensions()))


def list_image_files(directory: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Image files in ``directory`` (and its sub-folders when ``recursive``), sorted by relative path.

    Any extension Pillow opens counts as an image; hidden files and folders are skipped.

    Raises:
        FileNotFoundError: ``directory`` is not a folder.
        ValueError: no image file was found (the message suggests ``--recursive``).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {str(root)!r}: not a folder; pass a folder of image files")
    extensions = image_extensions()
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = [
        path
        for path in candidates
        if path.is_file()
        and path.suffix.lower() in extensions
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    if not files:
        hint = "" if recursive else "; add --recursive to search its sub-folders"
        raise ValueError(
            f"--images {str(root)!r}: no image file found ({len(extensions)} extensions tried){hint}"
        )
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


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


def _stored_training_args(checkpoint: dict[str, Any], weights: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``args`` entry, else the ``args.json`` a training run writes next to its checkpoints
    (``teacher_backbone.pth`` holds weights only), else {}."""
    import json

    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return dict(args)
    args_json = Path(weights).parent / "args.json"
    if args_json.is_file():
        try:
            with open(args_json) as handle:
                stored = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("ignoring %s: %s", args_json, error)
            return {}
        if isinstance(stored, dict):
            logger.info("training settings read from %s", args_json)
            return stored
    return {}


def _architecture_of(state_dict: dict[str, Tensor]) -> tuple[str | None, int | None]:
    """(arch, patch size) read from the weights' shapes, None where they cannot be read."""
    cls_token = state_dict.get("cls_token")
    proj = state_dict.get("patch_embed.proj.weight")
    arch = _EMBED_DIM_TO_ARCH.get(int(cls_token.shape[-1])) if cls_token is not None else None
    return arch, (int(proj.shape[-1]) if proj is not None and proj.ndim == 4 else None)


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
    size, blocks -> depth) > the synthetic preset (``vit_tiny``, patch 16, depth 6).

    Args:
        weights: any checkpoint layout of :mod:`cribo_utils.weights.checkpoint_formats`; None: random weights.
        checkpoint_key: network of a student/teacher checkpoint (``teacher`` by default).
        arch: ``vit_tiny`` / ``vit_small`` / ``vit_base`` / ``vit_large``, or a conv arch
            (``resnet50``, ``convnext_*``; also chosen when the weights are a conv net's).
        patch_size: ViT patch size.
        depth: number of blocks.
        seed: seed of the random initialisation.
        device: where to put the backbone.
    Returns:
        :class:`FigureModel`.
    Raises:
        ValueError: an explicit setting contradicts the weights (the message names the flag).
    """
    from models import build_backbone

    conv_model = _load_conv_figure_model(weights, checkpoint_key, arch, seed, device)
    if conv_model is not None:
        return conv_model
    if weights is None:
        if arch is None:  # the synthetic preset as a whole; an explicit --arch keeps its own depth
            arch, depth = _FALLBACK["arch"], depth or _FALLBACK["depth"]
        patch_size = patch_size or _FALLBACK["patch_size"]
        with _seeded(seed):
            backbone = build_backbone(arch, patch_size=patch_size, depth=depth)
        depth = len(backbone.blocks)
        logger.warning(
            "RANDOM INITIALISATION: no --pretrained_weights given, drawing a random %s/%d with %d "
            "blocks (seed %d)",
            arch,
            patch_size,
            depth,
            seed,
        )
        training_args: dict[str, Any] = {}
        image_size = _FALLBACK["image_size"]
    else:
        from cribo_utils.weights.checkpoint_formats import (
            checkpoint_depth,
            checkpoint_image_size,
            extract_backbone_state_dict,
            load_backbone_state_dict,
            load_checkpoint_file,
        )

        checkpoint = load_checkpoint_file(weights)
        training_args = _stored_training_args(checkpoint, weights)
        state_dict = extract_backbone_state_dict(checkpoint, checkpoint_key)
        weights_arch, weights_patch = _architecture_of(state_dict)
        weights_depth = checkpoint_depth(state_dict)
        resolved: dict[str, Any] = {}
        for flag, given, found in (
            ("arch", arch, weights_arch),
            ("patch_size", patch_size, weights_patch),
            ("depth", depth, weights_depth),
        ):
            if given is not None and found is not None and given != found:
                raise ValueError(
                    f"--{flag} {given} does not match the weights in {weights!r} ({flag} {found}); "
                    f"pass --{flag} {found} or leave it out"
                )
            resolved[flag] = (
                given if given is not None else (found or training_args.get(flag) or _FALLBACK[flag])
            )
        arch, patch_size, depth = resolved["arch"], resolved["patch_size"], resolved["depth"]
        grid_size = checkpoint_image_size(state_dict, patch_size)
        backbone = build_backbone(arch, patch_size=patch_size, img_size=grid_size, depth=depth)
        load_backbone_state_dict(backbone, state_dict, source=f"{weights!r} (key {checkpoint_key!r})")
        image_size = int(training_args.get("image_size") or grid_size)
        logger.info("loaded %s/%d (%d blocks) from %s", arch, patch_size, depth, weights)
    backbone.eval()
    backbone.requires_grad_(False)
    backbone.to(device)
    return FigureModel(
        backbone=backbone,
        arch=arch,
        patch_size=patch_size,
        depth=int(depth),
        training_args=training_args,
        image_size=image_size,
    )


def _load_conv_figure_model(
    weights: str | None, checkpoint_key: str, arch: str | None, seed: int, device: str | torch.device
) -> FigureModel | None:
    """:class:`FigureModel` of a conv backbone (ResNet-50, ConvNeXt), or None when the figures get a ViT.

    A conv net is used when ``arch`` names one, or when ``arch`` is not given and the weights' shapes are
    a conv net's. Its dense grid (last stage, stride 32) stands for the patch tokens; it has no attention.
    """
    from cribo_utils.weights.architecture_detection import detect_architecture
    from cribo_utils.weights.checkpoint_formats import build_pretrained_backbone, extract_backbone_state_dict
    from models import CONV_ARCHS, build_eval_backbone

    if arch is None and weights is not None:
        from cribo_utils.weights.checkpoint_formats import load_checkpoint_file

        detected = detect_architecture(
            extract_backbone_state_dict(load_checkpoint_file(weights), checkpoint_key)
        )
        arch = detected.arch if detected.family in ("resnet", "convnext") else None
    if arch not in CONV_ARCHS:
        return None
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


# --------------------------------------------------------------------------------------------------
# Two views, teacher tokens and the joint clustering
# --------------------------------------------------------------------------------------------------


@dataclass
class ClusteredViews:
    """Two augmented views of B images and the teacher's joint clustering of their patch tokens.

    Attributes:
        pictures: (B, 2, S, S, 3) uint8, the views exactly as the network saw them.
        boxes: per image, the two crop boxes (original-image pixels) and flip flags.
        positions1, positions2: (B, 2, N) patch-centre coordinates of each view.
        tokens1, tokens2: (B, N, D) teacher patch tokens (post-LayerNorm).
        labels1, labels2: (B, h, w) long hard cluster id of every patch of each view.
        valid: (B, K) bool, clusters with members in both views.
        objects1, objects2: (M, D) per-view object representations of the valid clusters.
        object_ids: (M, 2) long (image, cluster) of every object row, image by image, cluster ascending.
        patch_size: p.
    """

    pictures: np.ndarray
    boxes: list[tuple[tuple[CropBox, bool], tuple[CropBox, bool]]]
    positions1: Tensor
    positions2: Tensor
    tokens1: Tensor
    tokens2: Tensor
    labels1: Tensor
    labels2: Tensor
    valid: Tensor
    objects1: Tensor
    objects2: Tensor
    object_ids: Tensor
    patch_size: int

    @property
    def n_clusters(self) -> int:
        return int(self.valid.shape[1])

    def view_labels(self, view: int) -> Tensor:
        """(B, h, w) labels of view 1 or 2."""
        return self.labels1 if view == 1 else self.labels2


def make_two_views(
    images: Sequence[Image.Image],
    image_size: int,
    patch_size: int,
    seed: int = 0,
    photometric: bool = False,
    crop_scale: tuple[float, float] = (0.25, 1.0),
) -> tuple[Tensor, Tensor, Tensor, Tensor, np.ndarray, list[Any]]:
    """Draw CrIBo's two global views of every image with :class:`data.augmentations.TwoViewTransform`.

    The crop, flip and patch-centre coordinates are the training ones; the colour pipeline of each
    view is applied only with ``photometric`` (off by default, so the figures show the scene itself).

    Returns:
        ``(crops1 (B, 3, S, S), crops2, positions1 (B, 2, N), positions2, pictures (B, 2, S, S, 3) uint8,
        boxes)``.
    """
    from data.augmentations import TwoViewTransform

    _check_image_size(image_size, patch_size)
    transform = TwoViewTransform(image_size=image_size, patch_size=patch_size, global_crops_scale=crop_scale)
    crops: list[list[Tensor]] = [[], []]
    positions: list[list[Tensor]] = [[], []]
    pictures, boxes = [], []
    with _seeded(seed):
        for image in images:
            image = image.convert("RGB")
            per_view = []
            for view in range(2):
                box, flipped = transform.global_crop.sample(image)
                picture = transform.global_crop.apply(image, box, flipped)
                if photometric:
                    picture = transform.global_photometric[view](picture)
                crops[view].append(transform.to_tensor(picture))
                positions[view].append(transform.global_crop.positions(box, flipped))
                per_view.append(np.asarray(picture, dtype=np.uint8))
                boxes.append((box, flipped))
            pictures.append(np.stack(per_view))
    paired_boxes = list(zip(boxes[0::2], boxes[1::2], strict=True))
    return (
        torch.stack(crops[0]),
        torch.stack(crops[1]),
        torch.stack(positions[0]),
        torch.stack(positions[1]),
        np.stack(pictures),
        paired_boxes,
    )


@torch.no_grad()
def cluster_image_views(
    backbone: VisionTransformer,
    images: Sequence[Image.Image],
    image_size: int,
    n_clusters: int,
    pos_alpha: float,
    seed: int = 0,
    photometric: bool = False,
    batch_size: int = 16,
) -> ClusteredViews:
    """Two views per image, teacher patch tokens, joint clustering and object representations.

    The same computation as the training step (method doc Sec. 1, teacher side):
    ``T_tok = teacher([x1; x2])``, ``A, valid = joint_cluster(T_tok, pos1, pos2, alpha)``,
    ``c^v = object_representations(T_tok^v, A_v, valid)``; batched over ``batch_size`` images, with
    per-image cost normalisation so batching changes nothing.

    Args:
        backbone: eval-mode ViT.
        images: B PIL images.
        image_size: S, side of the views (multiple of the patch size).
        n_clusters: K (``--n_tokens``).
        pos_alpha: weight of the positional cost.
        seed: seed of the crops and of the cluster seeds.
        photometric: also apply the training colour augmentation.
        batch_size: images per forward pass.
    Returns:
        :class:`ClusteredViews`.
    """
    from cribo_utils.method.clustering import joint_cluster, object_representations

    if not images:
        raise ValueError("cluster_image_views: no images given")
    patch_size = _patch_size(backbone)
    device = _device_of(backbone)
    crops1, crops2, positions1, positions2, pictures, boxes = make_two_views(
        images, image_size, patch_size, seed=seed, photometric=photometric
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    names = ("tokens1", "tokens2", "labels", "valid", "objects1", "objects2")
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        views = torch.cat([crops1[start:stop], crops2[start:stop]]).to(device)
        _, tokens = backbone.forward_features(views)
        tokens1, tokens2 = tokens.float().split(views.shape[0] // 2)
        clusters = joint_cluster(
            tokens1,
            tokens2,
            positions1[start:stop].to(device),
            positions2[start:stop].to(device),
            n_clusters=n_clusters,
            alpha=pos_alpha,
            generator=generator,
        )
        # Objects of a chunk come image by image, so concatenating the chunks keeps the global order.
        for name, value in zip(
            names,
            (
                tokens1,
                tokens2,
                clusters.labels,
                clusters.valid,
                object_representations(tokens1, clusters.assign1, clusters.valid),
                object_representations(tokens2, clusters.assign2, clusters.valid),
            ),
            strict=True,
        ):
            parts[name].append(value)
    merged = {name: torch.cat(values) for name, values in parts.items()}
    side = image_size // patch_size
    labels = merged["labels"]
    return ClusteredViews(
        pictures=pictures,
        boxes=boxes,
        positions1=positions1,
        positions2=positions2,
        tokens1=merged["tokens1"],
        tokens2=merged["tokens2"],
        labels1=rearrange(labels[:, : side * side], "b (h w) -> b h w", h=side),
        labels2=rearrange(labels[:, side * side :], "b (h w) -> b h w", h=side),
        valid=merged["valid"],
        objects1=merged["objects1"],
        objects2=merged["objects2"],
        object_ids=merged["valid"].nonzero(),
        patch_size=patch_size,
    )


# --------------------------------------------------------------------------------------------------
# Figure plumbing
# --------------------------------------------------------------------------------------------------


def grid_pixel_size(rows: int, cols: int, panel: tuple[float, float], dpi: int) -> tuple[int, int]:
    """(width, height) in pixels of a ``rows x cols`` grid of ``panel``-inch panels at ``dpi``."""
    return round(cols * panel[0] * dpi), round(rows * panel[1] * dpi)


def _new_grid(rows: int, cols: int, panel: tuple[float, float], dpi: int) -> tuple[Figure, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = grid_pixel_size(rows, cols, panel, dpi)
    figure, axes = plt.subplots(rows, cols, figsize=(width / dpi, height / dpi), dpi=dpi, squeeze=False)
    return figure, axes


def _save(figure: Figure, out_path: str | os.PathLike[str], dpi: int) -> Path:
    import matplotlib.pyplot as plt

    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    plt.close(figure)
    logger.info("wrote %s", path)
    return path


def _finish_layout(
    figure: Figure, title: str, wspace: float, hspace: float, title_inches: float = 0.55
) -> None:
    """Put ``title`` on top, keeping ``title_inches`` free for it whatever the number of rows."""
    figure.suptitle(title, fontsize=9)
    height = figure.get_size_inches()[1]
    figure.subplots_adjust(
        left=0.02, right=0.98, bottom=0.02, top=1.0 - title_inches / height, wspace=wspace, hspace=hspace
    )


def _show(
    ax: Axes, picture: np.ndarray, title: str | None = None, fontsize: float = 8, cmap: str | None = None
) -> None:
    if cmap is None:
        ax.imshow(picture, interpolation="nearest")
    else:
        ax.imshow(picture, interpolation="nearest", cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def _frame(ax: Axes, colour: str, width: float = 4.0) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def overlay_clusters(
    picture: np.ndarray, labels: np.ndarray, valid: np.ndarray, patch_size: int, opacity: float = 0.55
) -> np.ndarray:
    """A view with its cluster map (patch resolution) blended on top and cluster borders darkened.

    Args:
        picture: (S, S, 3) uint8 view.
        labels: (h, w) cluster ids of its patches.
        valid: (K,) bool valid clusters (others drawn grey).
        patch_size: p, with S = h p.
    Returns:
        (S, S, 3) uint8.
    """
    pixels = upsample_patch_grid(np.asarray(labels), patch_size)
    out = blend(picture, colour_cluster_labels(pixels, valid), opacity)
    out[label_boundaries(pixels)] = (out[label_boundaries(pixels)] * 0.3).astype(np.uint8)
    return out


def highlight_object(
    picture: np.ndarray, member: np.ndarray, colour: np.ndarray, patch_size: int
) -> np.ndarray:
    """Dim everything outside one object's patches and tint the object with its colour.

    Args:
        picture: (S, S, 3) uint8.
        member: (h, w) bool, the object's patches.
        colour: (3,) uint8.
        patch_size: p.
    Returns:
        (S, S, 3) uint8.
    """
    pixels = upsample_patch_grid(np.asarray(member, dtype=bool), patch_size)
    dimmed = (picture.astype(np.float32) * 0.3).astype(np.uint8)
    tinted = blend(picture, np.broadcast_to(colour, picture.shape), 0.35)
    out = np.where(pixels[..., None], tinted, dimmed)
    out[label_boundaries(pixels.astype(np.int64))] = colour
    return out


# --------------------------------------------------------------------------------------------------
# 1. clusters
# --------------------------------------------------------------------------------------------------


def plot_clusters(
    backbone: VisionTransformer,
    images: Sequence[Image.Image],
    out_path: str | os.PathLike[str],
    image_size: int,
    n_clusters: int,
    pos_alpha: float = 1.0,
    seed: int = 0,
    photometric: bool = False,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Figure 1: the teacher's joint two-view clustering of each image.

    One row per image: the original image with both crop boxes, then view 1 and view 2 with their
    patch clusters overlaid. A cluster has the same colour in both views; clusters with members in one
    view only (not objects for CrIBo) are grey.

    Args:
        backbone: eval-mode ViT (the teacher's backbone).
        images: PIL images (one row each).
        out_path: PNG to write.
        image_size: side of the views.
        n_clusters: K.
        pos_alpha: positional-cost weight of the clustering.
        seed: crops and cluster seeds.
        photometric: feed the views through the training colour augmentation.
        dpi: resolution (figure is ``3 * 2.5 * dpi`` by ``rows * 2.5 * dpi`` pixels).
    Returns:
        The path written.
    """
    views = cluster_image_views(backbone, images, image_size, n_clusters, pos_alpha, seed, photometric)
    figure, axes = _new_grid(len(images), 3, IMAGE_PANEL, dpi)
    box_colours = ("#00e5ff", "#ff3d00")
    from matplotlib.patches import Rectangle

    for row, image in enumerate(images):
        valid = views.valid[row].cpu().numpy()
        _show(
            axes[row, 0],
            np.asarray(image.convert("RGB")),
            f"image {row}: {int(valid.sum())}/{n_clusters} objects",
        )
        for view in (1, 2):
            box, flipped = views.boxes[row][view - 1]
            axes[row, 0].add_patch(
                Rectangle(
                    (box.left - 0.5, box.top - 0.5),
                    box.width,
                    box.height,
                    fill=False,
                    edgecolor=box_colours[view - 1],
                    linewidth=1.5,
                )
            )
            overlay = overlay_clusters(
                views.pictures[row, view - 1],
                views.view_labels(view)[row].cpu().numpy(),
                valid,
                views.patch_size,
            )
            _show(axes[row, view], overlay, f"view {view}" + (" (flipped)" if flipped else ""))
            _frame(axes[row, view], box_colours[view - 1], 2.0)
    _finish_layout(
        figure,
        "teacher joint clustering (grey: cluster in one view only, discarded)",
        wspace=0.05,
        hspace=0.2,
    )
    return _save(figure, out_path, dpi)


# --------------------------------------------------------------------------------------------------
# 2. neighbours
# --------------------------------------------------------------------------------------------------


@dataclass
class ObjectBank:
    """A memory bank filled from a set of images, remembering where each stored object came from.

    Attributes:
        bank: the :class:`cribo_utils.method.memory_bank.CentroidMemoryBank` holding the objects.
        views: the clustered views of the bank images.
        slot_image: (K * Q,) long bank image of every slot (-1 for empty slots).
        slot_cluster: (K * Q,) long cluster id of every slot (-1 for empty slots).
    """

    bank: CentroidMemoryBank
    views: ClusteredViews
    slot_image: Tensor
    slot_cluster: Tensor

    def locate(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """(bank image, cluster id) of each slot in ``slots``."""
        slots = slots.to(self.slot_image.device)
        return self.slot_image[slots], self.slot_cluster[slots]


def build_object_bank(
    backbone: VisionTransformer,
    images: Sequence[Image.Image],
    image_size: int,
    n_clusters: int,
    pos_alpha: float,
    seed: int = 0,
    photometric: bool = False,
) -> ObjectBank:
    """Run teacher + clustering over the bank images and push their objects into a fresh memory bank.

    The bank holds Q = ``len(images)`` images, filled by one push of every object (view-1 and view-2
    representations in the same slot), as the training step pushes a batch (method doc Sec. 7).

    Returns:
        :class:`ObjectBank`, whose ``locate`` maps bank slots back to (image, cluster).
    """
    from cribo_utils.method.memory_bank import CentroidMemoryBank

    views = cluster_image_views(backbone, images, image_size, n_clusters, pos_alpha, seed, photometric)
    bank = CentroidMemoryBank(len(images), n_clusters, views.objects1.shape[1]).to(views.objects1.device)
    bank.push(views.objects1, views.objects2, views.valid.sum(dim=1))
    slots = bank.valid_slots()
    # One push lists its images in order, clusters ascending: slot i of valid_slots is object row i.
    if not torch.equal(bank.view(1), views.objects1) or not torch.equal(bank.view(2), views.objects2):
        raise RuntimeError(
            "build_object_bank: the memory bank does not list one push's objects in push order; "
            "cribo_utils.method.memory_bank changed its layout"
        )
    slot_image = torch.full((bank.capacity,), -1, dtype=torch.long, device=slots.device)
    slot_cluster = slot_image.clone()
    slot_image[slots] = views.object_ids[:, 0].to(slots.device)
    slot_cluster[slots] = views.object_ids[:, 1].to(slots.device)
    return ObjectBank(bank=bank, views=views, slot_image=slot_image, slot_cluster=slot_cluster)


def _largest_objects(views: ClusteredViews, per_image: int) -> list[int]:
    """Object rows to show: per image, the ``per_image`` objects covering most patches (both views)."""
    sizes = torch.stack(
        [F.one_hot(views.view_labels(v).flatten(1), views.n_clusters).sum(1) for v in (1, 2)]
    ).sum(0)
    rows = []
    for image in range(views.valid.shape[0]):
        object_rows = (views.object_ids[:, 0] == image).nonzero().flatten()
        clusters = views.object_ids[object_rows, 1]
        order = sizes[image, clusters].argsort(descending=True, stable=True)
        rows.extend(object_rows[order[:per_image]].tolist())
    return rows


def plot_neighbours(
    backbone: VisionTransformer,
    query_images: Sequence[Image.Image],
    bank_images: Sequence[Image.Image],
    out_path: str | os.PathLike[str],
    image_size: int,
    n_clusters: int,
    pos_alpha: float = 1.0,
    objects_per_image: int = 2,
    seed: int = 0,
    photometric: bool = False,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Figure 2: objects, their nearest objects in a memory bank of other images, and the cycle check.

    The bank is built from ``bank_images`` (:func:`build_object_bank`); the query objects are all valid
    objects of ``query_images``; retrieval is
    :func:`cribo_utils.method.neighbours.find_cycle_consistent_neighbours`
    (method doc Sec. 8): ``j_v(i) = argmax_r cos(c^v_i, q^v_r)``, accepted when the neighbour's other view
    points back to the query's other view among all current objects. One row per shown object: query
    view 1, its neighbour (bank view 1), query view 2, its neighbour (bank view 2); a neighbour is framed
    green when the cycle-consistency test passed and red when it failed.

    Args:
        backbone: eval-mode ViT.
        query_images: images whose objects retrieve neighbours (they form the "current batch").
        bank_images: images stored in the bank.
        out_path: PNG to write.
        image_size: side of the views.
        n_clusters: K.
        pos_alpha: positional-cost weight.
        objects_per_image: objects shown per query image (the largest ones).
        seed: crops and cluster seeds (the bank uses ``seed + 1``).
        photometric: apply the training colour augmentation.
        dpi: resolution (figure is ``4 * 2.5 * dpi`` wide, ``2.5 * dpi`` per shown object high).
    Returns:
        The path written.
    """
    from cribo_utils.method.neighbours import find_cycle_consistent_neighbours

    if not bank_images:
        raise ValueError("plot_neighbours: the memory bank needs at least one image (--bank_images)")
    if objects_per_image < 1:
        raise ValueError(f"--objects_per_image {objects_per_image} must be >= 1")
    memory = build_object_bank(
        backbone, bank_images, image_size, n_clusters, pos_alpha, seed + 1, photometric
    )
    if memory.bank.is_empty:
        raise ValueError(
            "plot_neighbours: no bank image has an object present in both views, the bank is empty; "
            "use more --bank_images or a larger --image_size"
        )
    queries = cluster_image_views(
        backbone, query_images, image_size, n_clusters, pos_alpha, seed, photometric
    )
    result = find_cycle_consistent_neighbours(queries.objects1, queries.objects2, memory.bank)
    shown = _largest_objects(queries, objects_per_image)
    if not shown:
        raise ValueError(
            "plot_neighbours: no query image has an object present in both views; "
            "use more --num_images or a larger --image_size"
        )
    palette = cluster_palette(n_clusters)
    figure, axes = _new_grid(len(shown), 4, IMAGE_PANEL, dpi)
    for row, index in enumerate(shown):
        image, cluster = queries.object_ids[index].tolist()
        colour = palette[cluster]
        for view, slot, mask in (
            (1, result.index1[index], result.mask1[index]),
            (2, result.index2[index], result.mask2[index]),
        ):
            query_member = (queries.view_labels(view)[image] == cluster).cpu().numpy()
            column = 2 * (view - 1)
            _show(
                axes[row, column],
                highlight_object(queries.pictures[image, view - 1], query_member, colour, queries.patch_size),
                f"query {image} obj {cluster}, view {view}",
            )
            bank_image, bank_cluster = (int(t) for t in memory.locate(slot.reshape(1)))
            query_vector = (queries.objects1 if view == 1 else queries.objects2)[index]
            similarity = F.cosine_similarity(
                query_vector, memory.bank.gather_slots(view, slot.reshape(1))[0], dim=0
            )
            bank_member = (memory.views.view_labels(view)[bank_image] == bank_cluster).cpu().numpy()
            passed = bool(mask)
            _show(
                axes[row, column + 1],
                highlight_object(
                    memory.views.pictures[bank_image, view - 1],
                    bank_member,
                    colour,  # the query's colour: the pair reads as one object
                    queries.patch_size,
                ),
                f"bank {bank_image} obj {bank_cluster}: cos {float(similarity):.2f}\n"
                f"cycle {'passed' if passed else 'failed'}",
            )
            _frame(axes[row, column + 1], "#00c853" if passed else "#d50000")
    accepted = (result.mask1.float().mean().item(), result.mask2.float().mean().item())
    _finish_layout(
        figure,
        f"nearest objects in a bank of {len(bank_images)} images ({memory.bank.num_objects} objects); "
        f"cycle-consistent: {accepted[0]:.0%} (view 1), {accepted[1]:.0%} (view 2)",
        wspace=0.08,
        hspace=0.35,
    )
    return _save(figure, out_path, dpi)


# --------------------------------------------------------------------------------------------------
# 3. dense
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def plot_dense(
    backbone: VisionTransformer,
    memory_dataset: Any,
    images: Sequence[Image.Image],
    masks: Sequence[np.ndarray | Image.Image | None],
    out_path: str | os.PathLike[str],
    num_classes: int,
    palette: np.ndarray,
    class_names: Sequence[str] | None = None,
    image_size: int = 96,
    num_neighbours: int = 30,
    temperature: float = 0.02,
    ignore_index: int = 255,
    seed: int = 0,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Figure 3: dense nearest-neighbour label transfer (dense-nn-protocol.md Part A).

    A memory of patch features and soft patch labels is built from ``memory_dataset`` with
    :func:`cribo_utils.eval.dense_nn.build_memory` (one augmentation pass, every patch kept), then each image
    is predicted with :func:`cribo_utils.eval.dense_nn.predict`:
    ``y_hat(q) = sum_j softmax_j(cos(q, x_j) / beta) y_j`` over the k nearest memory patches,
    upsampled bilinearly and arg-maxed per pixel. One row per image: image, ground truth (if given),
    prediction, and a legend of the classes shown.

    Args:
        backbone: eval-mode ViT.
        memory_dataset: yields (PIL image, PIL mask) pairs with class ids in [0, C) or ``ignore_index``.
        images: PIL images to predict.
        masks: ground truth per image ((H, W) class ids or PIL mask), None where unknown.
        out_path: PNG to write.
        num_classes: C.
        palette: (256, 3) uint8 colours (:func:`dataset_palette`).
        class_names: C names for the legend.
        image_size: the network input side (images and masks resized to it, as the protocol's validation).
        num_neighbours: k.
        temperature: beta.
        ignore_index: label not scored (drawn with palette[255]).
        seed: memory crop / jitter / noise seed.
        dpi: resolution (figure is ``4 * 2.5 * dpi`` by ``rows * 2.5 * dpi`` pixels).
    Returns:
        The path written.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from cribo_utils.eval.dense_nn import DenseNNConfig, build_memory, predict
    from data.transforms import normalize, paired_resize

    if len(masks) != len(images):
        raise ValueError(
            f"plot_dense: {len(images)} images but {len(masks)} masks (use None for unknown masks)"
        )
    device = _device_of(backbone)
    config = DenseNNConfig(
        input_size=image_size,
        memory_size=None,
        num_neighbours=num_neighbours,
        temperature=temperature,
        augmentation_epochs=1,
        batch_size=8,
        num_workers=0,
        seed=seed,
        ignore_index=ignore_index,
        progress=False,
    )
    memory = build_memory(backbone, memory_dataset, config, num_classes, device)
    inputs: list[Tensor] = []
    targets: list[np.ndarray | None] = []
    for image, mask in zip(images, masks, strict=True):
        if mask is None:
            resized = TF.resize(image.convert("RGB"), [image_size, image_size], InterpolationMode.BILINEAR)
            inputs.append(normalize()(resized))
            targets.append(None)
        else:
            tensor, resized_mask = paired_resize(image.convert("RGB"), mask, image_size)
            inputs.append(tensor)
            targets.append(resized_mask.numpy())
    batch = torch.stack(inputs)
    predictions = torch.cat(
        [predict(backbone, part.to(device), memory, config).cpu() for part in batch.split(8)]
    )
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    figure, axes = _new_grid(len(images), 4, IMAGE_PANEL, dpi)
    from matplotlib.patches import Patch

    pictures = denormalize(batch)
    for row, (target, prediction) in enumerate(zip(targets, predictions.numpy(), strict=True)):
        _show(axes[row, 0], pictures[row], f"image {row}")
        present = set(np.unique(prediction).tolist())
        if target is None:
            _show(axes[row, 1], np.full_like(pictures[row], 255), "no ground truth")
            title = "prediction"
        else:
            scored = target != ignore_index
            accuracy = float((prediction[scored] == target[scored]).mean()) if scored.any() else float("nan")
            _show(axes[row, 1], colourise_mask(target, palette), "ground truth")
            present |= set(np.unique(target[scored]).tolist())
            title = f"prediction (pixel acc. {accuracy:.0%})"
        _show(axes[row, 2], colourise_mask(prediction, palette), title)
        axes[row, 3].axis("off")
        handles = [
            Patch(
                facecolor=palette[c] / 255.0,
                edgecolor="black",
                linewidth=0.5,
                label=names[c] if c < len(names) else str(c),
            )
            for c in sorted(present)[:12]
        ]
        axes[row, 3].legend(handles=handles, loc="center left", fontsize=7, frameon=False)
    _finish_layout(
        figure,
        f"dense nearest-neighbour retrieval: memory of {len(memory)} patches from "
        f"{len(memory_dataset)} images, k = {min(num_neighbours, len(memory))}",
        wspace=0.05,
        hspace=0.25,
    )
    return _save(figure, out_path, dpi)


# --------------------------------------------------------------------------------------------------
# 4. attention
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_maps(backbone: VisionTransformer, images: Tensor) -> Tensor:
    """[CLS] attention of every head of the last block, as patch grids.

    ``a_{h,n} = softmax_m(q_cls^h . k_m^h / sqrt(d_head))`` restricted to the patch tokens n (the [CLS]
    to [CLS] entry is dropped, so a map sums to ``1 - a_{h,cls}``).

    Args:
        backbone: ViT with ``get_last_selfattention``.
        images: (B, 3, H, W) normalised.
    Returns:
        (B, heads, H / p, W / p).
    """
    patch_size = _patch_size(backbone)
    attention = backbone.get_last_selfattention(images)  # (B, heads, 1 + N, 1 + N)
    return rearrange(attention[:, :, 0, 1:], "b k (h w) -> b k h w", h=images.shape[-2] // patch_size)


@torch.no_grad()
def plot_attention(
    backbone: VisionTransformer,
    images: Sequence[Image.Image],
    out_path: str | os.PathLike[str],
    image_size: int,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Figure 4: last-layer [CLS] attention per head and the PCA of the patch features as RGB.

    A conv backbone (``has_attention`` False) has no attention: the figure says so in its title and
    draws the image and the PCA of its dense features (last stage, stride 32) only.

    One row per image (resized and centre-cropped to ``image_size``): the image, one panel per head
    (:func:`attention_maps`, each min-max scaled to [0, 1], its range in the title), and
    :func:`pca_rgb` of the final patch tokens, fitted jointly on all images so a colour means the same
    direction in every row.

    Args:
        backbone: eval-mode ViT.
        images: PIL images.
        out_path: PNG to write.
        image_size: input side (multiple of the patch size).
        dpi: resolution (figure is ``(heads + 2) * 2.5 * dpi`` by ``rows * 2.5 * dpi`` pixels).
    Returns:
        The path written.
    """
    patch_size = _patch_size(backbone)
    _check_image_size(image_size, patch_size)
    device = _device_of(backbone)
    batch = torch.stack([square_input(image.convert("RGB"), image_size) for image in images]).to(device)
    has_attention = bool(getattr(backbone, "has_attention", True))
    if has_attention:
        maps = attention_maps(backbone, batch).float().cpu()
    else:
        logger.warning(
            "%s is a conv net: it has no attention maps; drawing the images and the PCA of its dense "
            "features only",
            type(backbone).__name__,
        )
        maps = torch.zeros(len(images), 0, 1, 1)
    _, tokens = backbone.forward_features(batch)
    side = image_size // patch_size
    colours = rearrange(pca_rgb(tokens.float().cpu()), "b (h w) c -> b h w c", h=side).numpy()
    heads = maps.shape[1]
    figure, axes = _new_grid(len(images), heads + 2, IMAGE_PANEL, dpi)
    pictures = denormalize(batch)
    for row in range(len(images)):
        _show(axes[row, 0], pictures[row], f"image {row}")
        for head in range(heads):
            head_map = maps[row, head].numpy()
            low, high = float(head_map.min()), float(head_map.max())
            scaled = (head_map - low) / (high - low) if high > low else np.zeros_like(head_map)
            _show(
                axes[row, head + 1],
                upsample_patch_grid(scaled, patch_size),
                f"head {head} ({low:.3f} to {high:.3f})",
                cmap="inferno",
            )
        pca_picture = np.rint(upsample_patch_grid(colours[row], patch_size) * 255).astype(np.uint8)
        _show(axes[row, heads + 1], pca_picture, "PCA of patch features")
    title = "last-layer [CLS] attention per head; first 3 principal components of the patch tokens as RGB"
    if not has_attention:
        title = (
            f"{type(backbone).__name__} is a conv net and has no attention maps; first 3 principal "
            f"components of its dense features (stride {patch_size}) as RGB"
        )
    _finish_layout(
        figure,
        title,
        wspace=0.05,
        hspace=0.2,
    )
    return _save(figure, out_path, dpi)


# --------------------------------------------------------------------------------------------------
# 5. curves
# --------------------------------------------------------------------------------------------------

#: Panels of the curves figure: title and the log.txt keys drawn in it.
CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("losses", ("loss", "loss_img", "loss_obj", "loss_nn")),
    ("learning rate", ("lr",)),
    ("weight decay", ("wd",)),
    ("teacher momentum", ("momentum",)),
    ("valid clusters per image", ("clusters_per_image",)),
    ("cycle-consistent fraction", ("nn_fraction", "nn_fraction_2")),
    ("throughput (images/s)", ("images_per_s",)),
)


@dataclass
class TrainingCurves:
    """Series read from a ``log.txt``.

    Attributes:
        steps: key -> (iterations, values) of the per-iteration records (records without ``epoch_`` keys).
        epochs: key -> (iterations, values) of the per-epoch averages, keyed without the ``epoch_`` prefix.
    """

    steps: dict[str, tuple[np.ndarray, np.ndarray]]
    epochs: dict[str, tuple[np.ndarray, np.ndarray]]


def read_training_curves(log_path: str | os.PathLike[str]) -> TrainingCurves:
    """Parse a training ``log.txt`` (JSON lines, :class:`cribo_utils.runtime.logger.MetricLogger`) into
    series.

    A record with any ``epoch_``-prefixed key is a per-epoch average; every other record with an
    ``iteration`` is a per-iteration record. Non-numeric values are skipped.

    Args:
        log_path: the ``log.txt`` file, or the training output folder holding it.
    Raises:
        FileNotFoundError: no log file there.
        ValueError: a line is not JSON, or no record has an ``iteration``.
    """
    import json

    path = Path(log_path)
    if path.is_dir():
        path = path / "log.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"--log {str(path)!r}: no such file; pass the log.txt of a training run (or its --output_dir)"
        )
    steps: dict[str, list[tuple[float, float]]] = {}
    epochs: dict[str, list[tuple[float, float]]] = {}
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"--log {str(path)!r} line {line_number} is not JSON ({error}); "
                    "expected one JSON object per line"
                ) from error
            if not isinstance(record, dict) or "iteration" not in record:
                continue
            is_epoch = any(key.startswith("epoch_") for key in record)
            for key, value in record.items():
                if (
                    key in ("iteration", "epoch")
                    or isinstance(value, bool)
                    or not isinstance(value, (int, float))
                ):
                    continue
                if is_epoch:
                    if key.startswith("epoch_"):
                        epochs.setdefault(key.removeprefix("epoch_"), []).append((record["iteration"], value))
                else:
                    steps.setdefault(key, []).append((record["iteration"], value))
    if not steps and not epochs:
        raise ValueError(
            f"--log {str(path)!r}: no record with an 'iteration' key; is this a CrIBo training log?"
        )

    def as_arrays(series: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for key, points in series.items():
            array = np.asarray(points, dtype=np.float64)
            out[key] = (array[:, 0], array[:, 1])
        return out

    return TrainingCurves(steps=as_arrays(steps), epochs=as_arrays(epochs))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values: ``out_t = mean(v_{max(0, t-w+1) .. t})``."""
    if window < 1:
        raise ValueError(f"moving_average: window must be >= 1, got {window}")
    cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def plot_curves(
    log_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    smooth: int | None = None,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Figure 5: training curves from ``log.txt`` against the iteration.

    Panels (:data:`CURVE_PANELS`): every loss term, learning rate, weight decay, teacher momentum, valid
    clusters per image, cycle-consistent fraction of both directions and throughput. Per-iteration values
    are drawn as thin lines (with a trailing moving average of ``smooth`` records on top when there are
    many), per-epoch averages as markers. A panel whose keys were never logged says so.

    Args:
        log_path: ``log.txt`` or the training output folder.
        out_path: PNG to write.
        smooth: moving-average window; None picks ``len / 50`` for logs longer than 200 records.
        dpi: resolution (figure is ``4 * 4.0 * dpi`` by ``2 * 3.0 * dpi`` pixels).
    Returns:
        The path written.
    """
    curves = read_training_curves(log_path)
    rows, cols = 2, 4
    figure, axes = _new_grid(rows, cols, CURVE_PANEL, dpi)
    flat_axes = axes.flatten()
    for ax, (title, keys) in zip(flat_axes, CURVE_PANELS, strict=False):
        drawn = False
        for colour_index, key in enumerate(keys):
            colour = f"C{colour_index}"
            if key in curves.steps:
                x, y = curves.steps[key]
                window = smooth if smooth is not None else (max(1, len(y) // 50) if len(y) > 200 else 1)
                ax.plot(x, y, color=colour, linewidth=0.8, alpha=0.4 if window > 1 else 1.0, label=key)
                if window > 1:
                    ax.plot(x, moving_average(y, window), color=colour, linewidth=1.2)
                drawn = True
            if key in curves.epochs:
                x, y = curves.epochs[key]
                ax.plot(
                    x,
                    y,
                    "o",
                    color=colour,
                    markersize=4,
                    markeredgecolor="black",
                    markeredgewidth=0.5,
                    label=f"{key} (epoch mean)" if key not in curves.steps else None,
                )
                drawn = True
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.yaxis.get_offset_text().set_fontsize(7)
        ax.set_xlabel("iteration", fontsize=7)
        ax.grid(alpha=0.3)
        if drawn:
            if len(keys) > 1:
                ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, fontsize=9)
    for ax in flat_axes[len(CURVE_PANELS) :]:
        ax.axis("off")
    figure.suptitle(f"training curves: {log_path}", fontsize=9)
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.88, wspace=0.3, hspace=0.55)
    return _save(figure, out_path, dpi)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    """``python -m cribo_utils.visualize <figure> [options]``; ``--help`` after a figure lists its options."""
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
        help="Checkpoint (checkpoint.pth, teacher_backbone.pth, released CrIBo/DINO files). Without "
        "it a randomly initialised ViT is shown.",
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
        help="Folder of image files (any format Pillow reads) instead of the synthetic scenes.",
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

    parser = argparse.ArgumentParser(
        prog="python -m cribo_utils.visualize", description=__doc__.split("\n")[0]
    )
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
        "--log", required=True, type=str, help="log.txt of a training run, or its output folder."
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
    """Parse ``argv`` and write the figure; returns its path."""
    return make_figure(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    from cribo_utils.runtime.logger import setup_logging

    setup_logging(None)
    main()
