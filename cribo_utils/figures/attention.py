"""Figure 4, ``attention``: the last block's [CLS] attention per head and the PCA of the patch features.

:func:`attention_maps` reads the [CLS] rows of the last self-attention as patch grids; :func:`plot_attention`
draws them next to :func:`cribo_utils.figures.drawing.pca_rgb` of the final patch tokens (a conv net
gets the PCA panel only).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from cribo_utils.figures.drawing import (
    DEFAULT_DPI,
    IMAGE_PANEL,
    _finish_layout,
    _new_grid,
    _save,
    _show,
    denormalize,
    pca_rgb,
    upsample_patch_grid,
)
from cribo_utils.figures.model import _check_image_size, _device_of, _patch_size, square_input

if TYPE_CHECKING:
    from models.vision_transformer import VisionTransformer

logger = logging.getLogger(__name__)


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
