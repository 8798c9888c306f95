"""torch.hub entry points for the released backbones of CrIBo and the compared systems, from local files.

Nothing is downloaded: fetch the release yourself (file names in the README's "Released models of the
compared systems" section), then::

    import torch
    backbone = torch.hub.load("/path/to/this/repo", "cribo_vits16_in", source="local",
                              weights="/path/to/vits16-in.pth")
    cls = backbone(images)                              # (B, 384) final-norm [CLS]
    cls, patches = backbone.forward_features(images)    # (B, 384), (B, N, 384)

    resnet = torch.hub.load(repo, "vicregl_resnet50_alpha0p75", source="local",
                            weights="resnet50_alpha0.75.pth")
    pooled, grid = resnet.forward_features(images)      # (B, 2048), (B, (H/32)(W/32), 2048)

ViT entry points return the teacher backbone of student/teacher checkpoints (``checkpoint_key="teacher"``,
what the papers evaluate); conv entry points return the same interface with the global average pool as
``forward`` and the last stage as the dense grid (``models/__init__.py``). Every network is in eval mode
with frozen parameters. Without ``weights`` it is randomly initialised and a warning is logged.
"""

from __future__ import annotations

from torch import nn

from cribo_utils.weights.checkpoint_formats import load_released_model

dependencies = ["torch", "torchvision"]


def cribo_vits16_coco(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """CrIBo ViT-S/16 pretrained on COCO (300 epochs); ``weights``: local ``vits16-coco.pth``."""
    return load_released_model("cribo_vits16_coco", weights, checkpoint_key)


def cribo_vits16_in(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """CrIBo ViT-S/16 pretrained on ImageNet-1k (800 epochs); ``weights``: local ``vits16-in.pth``."""
    return load_released_model("cribo_vits16_in", weights, checkpoint_key)


def cribo_vitb16_in(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """CrIBo ViT-B/16 pretrained on ImageNet-1k (400 epochs); ``weights``: local ``vitb16-in.pth``."""
    return load_released_model("cribo_vitb16_in", weights, checkpoint_key)


def dino_vits16(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """DINO ViT-S/16; ``weights``: ``dino_deitsmall16_pretrain.pth`` (or the full checkpoint)."""
    return load_released_model("dino_vits16", weights, checkpoint_key)


def dino_vits8(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """DINO ViT-S/8; ``weights``: ``dino_deitsmall8_pretrain.pth`` (or the full checkpoint)."""
    return load_released_model("dino_vits8", weights, checkpoint_key)


def dino_vitb16(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """DINO ViT-B/16; ``weights``: ``dino_vitbase16_pretrain.pth`` (or the full checkpoint)."""
    return load_released_model("dino_vitb16", weights, checkpoint_key)


def dino_vitb8(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """DINO ViT-B/8; ``weights``: ``dino_vitbase8_pretrain.pth`` (or the full checkpoint)."""
    return load_released_model("dino_vitb8", weights, checkpoint_key)


def dino_resnet50(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """DINO ResNet-50 (torchvision keys, no ``fc``); ``weights``: ``dino_resnet50_pretrain.pth``."""
    return load_released_model("dino_resnet50", weights, checkpoint_key)


def ibot_vits16(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """iBOT ViT-S/16; ``weights``: its ``checkpoint_teacher.pth`` (or the full ``checkpoint.pth``)."""
    return load_released_model("ibot_vits16", weights, checkpoint_key)


def ibot_vitb16(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """iBOT ViT-B/16; ``weights``: its ``checkpoint_teacher.pth`` (or the full ``checkpoint.pth``)."""
    return load_released_model("ibot_vitb16", weights, checkpoint_key)


def ibot_vitl16(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """iBOT ViT-L/16; ``weights``: its ``checkpoint_teacher.pth`` (or the full ``checkpoint.pth``)."""
    return load_released_model("ibot_vitl16", weights, checkpoint_key)


def vicregl_resnet50_alpha0p9(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """VICRegL ResNet-50, alpha 0.9; ``weights``: ``resnet50_alpha0.9.pth`` or the full checkpoint."""
    return load_released_model("vicregl_resnet50_alpha0p9", weights, checkpoint_key)


def vicregl_resnet50_alpha0p75(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """VICRegL ResNet-50, alpha 0.75; ``weights``: ``resnet50_alpha0.75.pth`` or the full checkpoint."""
    return load_released_model("vicregl_resnet50_alpha0p75", weights, checkpoint_key)


def vicregl_convnext_small_alpha0p9(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """VICRegL ConvNeXt-S, alpha 0.9; ``weights``: ``convnext_small_alpha0.9.pth``."""
    return load_released_model("vicregl_convnext_small_alpha0p9", weights, checkpoint_key)


def vicregl_convnext_small_alpha0p75(
    weights: str | None = None, checkpoint_key: str = "teacher"
) -> nn.Module:
    """VICRegL ConvNeXt-S, alpha 0.75; ``weights``: ``convnext_small_alpha0.75.pth``."""
    return load_released_model("vicregl_convnext_small_alpha0p75", weights, checkpoint_key)


def vicregl_convnext_base_alpha0p9(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """VICRegL ConvNeXt-B, alpha 0.9; ``weights``: ``convnext_base_alpha0.9.pth``."""
    return load_released_model("vicregl_convnext_base_alpha0p9", weights, checkpoint_key)


def vicregl_convnext_base_alpha0p75(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """VICRegL ConvNeXt-B, alpha 0.75; ``weights``: ``convnext_base_alpha0.75.pth``."""
    return load_released_model("vicregl_convnext_base_alpha0p75", weights, checkpoint_key)


def vicregl_convnext_xlarge_alpha0p75(
    weights: str | None = None, checkpoint_key: str = "teacher"
) -> nn.Module:
    """VICRegL ConvNeXt-XL, alpha 0.75; ``weights``: ``convnext_xlarge_alpha0.75.pth``."""
    return load_released_model("vicregl_convnext_xlarge_alpha0p75", weights, checkpoint_key)
