"""Colours, patch-grid pictures and the panel grid every figure is drawn on.

Palettes (clusters, segmentation datasets), the picture helpers (upsampling a patch grid, borders,
blending, undoing the ImageNet normalisation), the PCA of patch features as RGB, and the matplotlib grid
of exact pixel size with its title and PNG writer. No model and no data set here.
"""

from __future__ import annotations

import colorsys
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from data.transforms import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

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
# Figure plumbing
# --------------------------------------------------------------------------------------------------


def grid_pixel_size(rows: int, cols: int, panel: tuple[float, float], dpi: int) -> tuple[int, int]:
    """(width, height) in pixels of a ``rows x cols`` grid of ``panel``-inch panels at ``dpi``."""
    return round(cols * panel[0] * dpi), round(rows * panel[1] * dpi)


MATPLOTLIB_HINT = 'the figures need matplotlib, an optional extra: pip install -e ".[viz]"'


def require_matplotlib() -> None:
    """ModuleNotFoundError naming the extra to install when matplotlib is missing; nothing otherwise."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(MATPLOTLIB_HINT) from error


def _new_grid(rows: int, cols: int, panel: tuple[float, float], dpi: int) -> tuple[Figure, np.ndarray]:
    require_matplotlib()
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
