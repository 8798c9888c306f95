"""torch.hub entry points: one per released backbone of CrIBo and the compared systems.

The entry points are the names of ``checkpoints/released_models.json`` (the README's "Released models"
table): CrIBo, CrOC, DINO, iBOT, VICRegL and dinov2 (with dinov2's and DINO's own hub names)::

    import torch
    repo = "/path/to/this/repo"
    backbone = torch.hub.load(repo, "cribo_vits16_in", source="local")  # downloaded once, verified, cached
    dinov2 = torch.hub.load(repo, "dinov2_vits14_reg", source="local", pretrained=True)
    local = torch.hub.load(repo, "cribo_vits16_in", source="local", weights="/path/to/vits16-in.pth")
    random = torch.hub.load(repo, "dino_vits16", source="local", pretrained=False)  # random init, warned

    cls = backbone(images)                              # (B, 384) final-norm [CLS]
    cls, patches = backbone.forward_features(images)    # (B, 384), (B, N, 384); registers left out
    resnet = torch.hub.load(repo, "vicregl_resnet50_alpha0p75", source="local")
    pooled, grid = resnet.forward_features(images)      # (B, 2048), (B, (H/32)(W/32), 2048)

``pretrained=True`` (the default, as in DINO's and dinov2's hubs) downloads the release once into torch's
hub cache (``$TORCH_HOME/hub/checkpoints``); ``weights=`` loads a local file instead and fetches nothing.
ViT entry points return the teacher backbone of student/teacher checkpoints (``checkpoint_key="teacher"``,
what the papers evaluate); conv entry points return the same interface with the global average pool as
``forward`` and the last stage as the dense grid (``models/__init__.py``). Every network is in eval mode
with frozen parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from cribo_utils.weights import checkpoint_formats as _formats
from cribo_utils.weights import release_registry as _registry

if TYPE_CHECKING:  # only callables that are entry points at module level: torch.hub lists them all
    from collections.abc import Callable

dependencies = ["torch", "torchvision", "einops"]


def _entry_point(release: _registry.Release) -> Callable[..., nn.Module]:
    def entry_point(
        pretrained: bool = True, weights: str | None = None, checkpoint_key: str = "teacher"
    ) -> nn.Module:
        return _formats.load_released_model(release.name, weights, checkpoint_key, pretrained)

    entry_point.__name__ = entry_point.__qualname__ = release.name
    entry_point.__doc__ = (
        f"{release.system} {release.model} ({release.url}).\n\n"
        "pretrained: download the release once into the hub cache (default True; False: random weights).\n"
        "weights: a local file to load instead (nothing is fetched).\n"
        'checkpoint_key: "teacher" (default) or "student" for student/teacher checkpoints.'
    )
    return entry_point


# One module-level function per registry name, so that torch.hub.list / help / load see them all.
globals().update({name: _entry_point(release) for name, release in _registry.released_models().items()})
