"""Networks: the backbones, the CrIBo projection head and the student/teacher pair.

Two families of backbones, one interface (what every evaluation and figure relies on):

- ``forward(x)`` -> (B, D): the final-norm [CLS] token (ViT); the global average pool of the last
  stage (ResNet-50; ConvNeXt: of the final-norm last-stage tokens, as VICRegL).
- ``forward_features(x)`` -> (global (B, D), dense (B, N, dense_dim)): ViT patch tokens; a conv net's map
  of stage ``dense_stage`` (4 = last stage, stride 32, by default) as row-major tokens.
- ``patch_size``: the dense grid's stride in pixels (ViT: the patch size); ``embed_dim`` / ``dense_dim``:
  the widths of the global feature and of the dense grid.
- ``has_attention``: True for ViTs (``get_last_selfattention``), False for conv nets.

Only the ViTs (``ARCHS``) are trained here; ``EVAL_ARCHS`` adds the conv nets that released
checkpoints of the compared systems use (DINO's and VICRegL's ResNet-50, VICRegL's ConvNeXts).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from models.convnext import CONVNEXT_SIZES, ConvNeXt, build_convnext
from models.resnet import ResNetBackbone, resnet50
from models.vision_transformer import VisionTransformer, vit_base, vit_giant, vit_large, vit_small, vit_tiny

logger = logging.getLogger(__name__)

#: ViT architectures (trainable with main_cribo.py); vit_giant is dinov2's ViT-g (SwiGLU MLP).
ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant")
#: Convolutional architectures (evaluation of released checkpoints only).
CONV_ARCHS = ("resnet50", *CONVNEXT_SIZES)
#: Every architecture the evaluations accept for --arch.
EVAL_ARCHS = ARCHS + CONV_ARCHS
_FACTORIES = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant": vit_giant,
}


def build_backbone(
    arch: str,
    patch_size: int = 16,
    drop_path_rate: float = 0.0,
    img_size: int = 224,
    depth: int | None = None,
    **vit_options: Any,
) -> VisionTransformer:
    """Build a ViT backbone by name.

    Args:
        arch: one of ``ARCHS``.
        patch_size: patch side in pixels (8 or 16 for DINO's and CrIBo's released models, 14 for dinov2's).
        drop_path_rate: stochastic depth of the last block (linearly increasing from 0).
        img_size: image side the positional embedding is stored for (224 for DINO's released weights, 518
            for dinov2's).
        depth: number of blocks; None keeps the architecture's (12; 24 for vit_large; 40 for vit_giant).
        **vit_options: further :class:`models.vision_transformer.VisionTransformer` arguments (LayerScale,
            registers, MLP kind and width, positional interpolation), as
            :meth:`cribo_utils.weights.architecture_detection.DetectedArchitecture.vit_options` reads them
            from a checkpoint.
    Returns:
        The backbone, randomly initialised.
    Raises:
        ValueError: for an unknown ``arch`` (a conv arch is pointed to :func:`build_eval_backbone`).
    """
    if arch not in _FACTORIES:
        where = " (a conv net: evaluation only, see build_eval_backbone)" if arch in CONV_ARCHS else ""
        raise ValueError(f"--arch {arch!r} is not a ViT{where}; choose one of {', '.join(ARCHS)}")
    extra = {} if depth is None else {"depth": depth}
    return _FACTORIES[arch](
        patch_size=patch_size, drop_path_rate=drop_path_rate, img_size=img_size, **extra, **vit_options
    )


def build_eval_backbone(
    arch: str,
    patch_size: int = 16,
    img_size: int = 224,
    depth: int | None = None,
    dense_stage: int = 4,
    layer_scale: bool = False,
    vit_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Any backbone of ``EVAL_ARCHS``, randomly initialised, with the interface described above.

    Args:
        arch: one of ``EVAL_ARCHS``.
        patch_size, img_size, depth: ViT only (see :func:`build_backbone`).
        dense_stage: conv nets only: stage 1-4 whose map is the dense grid (4: stride 32).
        layer_scale: ConvNeXt only: blocks with a learned ``gamma`` (VICRegL's releases have none).
        vit_options: ViT only: the further constructor arguments of :func:`build_backbone`.
    Returns:
        The backbone.
    Raises:
        ValueError: for an unknown ``arch``, naming the accepted ones.
    """
    if arch in _FACTORIES:
        options = dict(vit_options or {})
        return build_backbone(arch, patch_size=patch_size, img_size=img_size, depth=depth, **options)
    if arch == "resnet50":
        return resnet50(dense_stage=dense_stage)
    if arch in CONVNEXT_SIZES:
        return build_convnext(arch, layer_scale=layer_scale, dense_stage=dense_stage)
    raise ValueError(f"--arch {arch!r} is not supported; choose one of {', '.join(EVAL_ARCHS)}")


def dense_stride(arch: str, patch_size: int, dense_stage: int = 4) -> int:
    """Stride in pixels of the dense grid of ``arch``: ``patch_size`` for a ViT, ``4 * 2^(stage - 1)`` for
    a conv net (32 for its last stage), without building the network (for input checks)."""
    return patch_size if arch in ARCHS else 4 * 2 ** (dense_stage - 1)


__all__ = [
    "ARCHS",
    "CONV_ARCHS",
    "EVAL_ARCHS",
    "ConvNeXt",
    "ResNetBackbone",
    "VisionTransformer",
    "build_backbone",
    "build_eval_backbone",
    "dense_stride",
    "vit_base",
    "vit_giant",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
