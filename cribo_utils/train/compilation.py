"""``--compile``: ``torch.compile`` of the two backbones' forward passes (the clustering compiles its own
rounds: ``joint_cluster(..., compiled=True)``, which the step asks for with the same flag).

Only the bound ``forward_features`` of each backbone is replaced, on the instance: the modules, their
parameters and their state-dict keys stay as they are, so checkpoints, the EMA and DDP are unaffected.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_backbones(*networks: nn.Module) -> None:
    """Replace each network's ``backbone.forward_features`` by its ``torch.compile`` (compiled at the first
    call; a backbone without ``forward_features`` is left alone).

    Args:
        networks: modules with a ``backbone`` attribute (the student and the teacher).
    """
    for network in networks:
        backbone = network.backbone
        if hasattr(backbone, "forward_features"):
            # an instance attribute shadows the method; the module itself is not wrapped
            backbone.forward_features = torch.compile(backbone.forward_features)  # type: ignore[method-assign,arg-type]
