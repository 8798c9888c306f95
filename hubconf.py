"""torch.hub entry points for the released CrIBo backbones, loaded from a local file (no download).

Download the checkpoint yourself (links in the README), then::

    import torch
    backbone = torch.hub.load("/path/to/this/repo", "cribo_vits16_in", source="local",
                              weights="/path/to/vits16-in.pth")
    cls = backbone(images)                              # (B, 384) final-norm [CLS]
    cls, patches = backbone.forward_features(images)    # (B, 384), (B, N, 384)

Each entry point returns the teacher backbone (``checkpoint_key="teacher"``, what the paper evaluates)
in eval mode with frozen parameters. Without ``weights`` the network is randomly initialised and a
warning is logged.
"""

from __future__ import annotations

from torch import nn

from cribo_utils.checkpoint_formats import load_released_model

dependencies = ["torch"]


def cribo_vits16_coco(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """CrIBo ViT-S/16 pretrained on COCO (300 epochs); ``weights``: local ``vits16-coco.pth``."""
    return load_released_model("cribo_vits16_coco", weights, checkpoint_key)


def cribo_vits16_in(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """CrIBo ViT-S/16 pretrained on ImageNet-1k (800 epochs); ``weights``: local ``vits16-in.pth``."""
    return load_released_model("cribo_vits16_in", weights, checkpoint_key)


def cribo_vitb16_in(weights: str | None = None, checkpoint_key: str = "teacher") -> nn.Module:
    """CrIBo ViT-B/16 pretrained on ImageNet-1k (400 epochs); ``weights``: local ``vitb16-in.pth``."""
    return load_released_model("cribo_vitb16_in", weights, checkpoint_key)
