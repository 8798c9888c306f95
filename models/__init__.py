"""Networks: the ViT backbones, the CrIBo projection head and the student/teacher pair."""

from __future__ import annotations

import logging

from models.vision_transformer import VisionTransformer, vit_base, vit_small, vit_tiny

logger = logging.getLogger(__name__)

ARCHS = ("vit_tiny", "vit_small", "vit_base")
_FACTORIES = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_backbone(
    arch: str,
    patch_size: int = 16,
    drop_path_rate: float = 0.0,
    img_size: int = 224,
    depth: int | None = None,
) -> VisionTransformer:
    """Build a ViT backbone by name.

    Args:
        arch: one of ``ARCHS``.
        patch_size: patch side in pixels (8 or 16 for the released models).
        drop_path_rate: stochastic depth of the last block (linearly increasing from 0).
        img_size: image side the positional embedding is stored for (224 for released weights).
        depth: number of blocks; None keeps the architecture's 12.
    Returns:
        The backbone, randomly initialised.
    Raises:
        ValueError: for an unknown ``arch``.
    """
    if arch not in _FACTORIES:
        raise ValueError(f"--arch {arch!r} is not supported; choose one of {', '.join(ARCHS)}")
    extra = {} if depth is None else {"depth": depth}
    return _FACTORIES[arch](patch_size=patch_size, drop_path_rate=drop_path_rate, img_size=img_size, **extra)


__all__ = ["ARCHS", "VisionTransformer", "build_backbone", "vit_base", "vit_small", "vit_tiny"]
