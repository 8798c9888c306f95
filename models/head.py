"""CrIBo projection head: one shared MLP trunk and two weight-normalised output layers
(docs/method.md, Sec. 5).

Parameter names follow DINO's ``DINOHead`` (legacy ``torch.nn.utils.weight_norm`` naming), so the
released heads load with ``strict=True``::

    mlp.{0,2,4}.{weight,bias}           trunk (use_bn=False)
    last_layer.{weight_g,weight_v}      [CLS] output layer, (out_dim, 1) and (out_dim, bottleneck)
    last_layer_c.{weight_g,weight_v}    object output layer, (out_dim_c, 1) and (out_dim_c, bottleneck)
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

INIT_STD = 0.02
# DINO's widths, those of every released CrIBo head (and of every run that stored no head widths).
HEAD_HIDDEN_DIM = 2048
HEAD_NLAYERS = 3
HEAD_BOTTLENECK_DIM = 256


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation over each output row (Salimans & Kingma, 2016).

    ``W_o = g_o * v_o / ||v_o||_2``  for every output unit o, and ``y = x W^T``.

    Stored as ``weight_g`` (out, 1) and ``weight_v`` (out, in), the names of the legacy
    ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))``. ``weight_v`` gets nn.Linear's
    default initialisation (DINO applies its truncated-normal init before wrapping the layer) and
    ``weight_g`` starts at 1.

    Args:
        in_features: input width.
        out_features: output width.
        freeze_norm: if True, ``weight_g`` stays at 1 (``requires_grad=False``), so every row of the
            effective weight has unit norm (DINO's ``norm_last_layer``).
    """

    def __init__(self, in_features: int, out_features: int, freeze_norm: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_norm)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # nn.Linear's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in)).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """Effective weight ``g * v / ||v||`` of shape (out, in)."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out), ``y = x W^T``."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"freeze_norm={not self.weight_g.requires_grad}"
        )


class CrIBoHead(nn.Module):
    """DINO head with a second output layer for objects (docs/method.md, Sec. 5).

    ``z = h(x) / ||h(x)||_2`` with the trunk
    ``h = Linear(D, H) - GELU - Linear(H, H) - GELU - Linear(H, Z)`` (H = 2048, Z = 256 in DINO and the
    released runs)
    (BatchNorm1d after each hidden Linear when ``use_bn``), then
    ``forward(x) = last_layer(z)`` for [CLS] tokens and ``forward_c(x) = last_layer_c(z)`` for object
    representations, two independent weight-normalised bias-free layers. Trunk Linears use a
    truncated normal (std 0.02) weight and zero bias.

    Args:
        in_dim: backbone width D.
        out_dim: number of [CLS] prototypes O.
        out_dim_c: number of object prototypes Oc.
        use_bn: insert BatchNorm1d after the hidden Linears (shifts the ``mlp`` indices as in DINO).
        norm_last_layer: freeze ``weight_g`` of both output layers at 1.
        nlayers: number of Linear layers in the trunk (>= 1).
        hidden_dim: width H of the hidden trunk layers.
        bottleneck_dim: width Z of the L2-normalised bottleneck.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        out_dim_c: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = HEAD_NLAYERS,
        hidden_dim: int = HEAD_HIDDEN_DIM,
        bottleneck_dim: int = HEAD_BOTTLENECK_DIM,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"CrIBoHead: nlayers must be >= 1, got {nlayers}")
        self.mlp = _build_trunk(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)
        self.last_layer_c = WeightNormLinear(bottleneck_dim, out_dim_c, freeze_norm=norm_last_layer)

    def bottleneck(self, x: Tensor) -> Tensor:
        """L2-normalised trunk output ``h(x) / ||h(x)||``: (..., D) -> (..., bottleneck_dim)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def project(self, bottleneck: Tensor) -> Tensor:
        """[CLS] logits from a bottleneck: (..., bottleneck_dim) -> (..., out_dim)."""
        return self.last_layer(bottleneck)

    def project_c(self, bottleneck: Tensor) -> Tensor:
        """Object logits from a bottleneck: (..., bottleneck_dim) -> (..., out_dim_c)."""
        return self.last_layer_c(bottleneck)

    def forward(self, x: Tensor) -> Tensor:
        """[CLS] logits ``last_layer(bottleneck(x))``: (..., D) -> (..., out_dim)."""
        return self.project(self.bottleneck(x))

    def forward_c(self, x: Tensor) -> Tensor:
        """Object logits ``last_layer_c(bottleneck(x))``: (..., D) -> (..., out_dim_c)."""
        return self.project_c(self.bottleneck(x))

    def forward_both(self, cls_tokens: Tensor, *objects: Tensor) -> tuple[Tensor, Tensor]:
        """``(forward(cls_tokens), forward_c(cat(objects)))`` with one trunk call over the rows of all.

        The trunk acts on each row alone, so the logits are those of the two calls (bit for bit with the
        CPU's BLAS, which computes a row the same whatever the number of rows; another BLAS may differ by
        float round-off). The trunk's weight gradient then sums all rows in one product instead of adding
        two, which moves it by float round-off. With BatchNorm in training mode a row depends on the batch
        statistics, so then the two calls are made separately, as in the reference.

        Args:
            cls_tokens: (R, D) [CLS] tokens.
            objects: one or more (S_i, D) tensors of object representations, taken in order.
        Returns:
            ``((R, out_dim), (sum_i S_i, out_dim_c))``.
        """
        if self.training and any(isinstance(module, nn.BatchNorm1d) for module in self.mlp.modules()):
            return self.forward(cls_tokens), self.forward_c(torch.cat(objects))
        bottleneck = self.bottleneck(torch.cat((cls_tokens, *objects)))
        cls_part, object_part = bottleneck.split(
            [cls_tokens.shape[0], bottleneck.shape[0] - cls_tokens.shape[0]]
        )
        return self.project(cls_part), self.project_c(object_part)


def _build_trunk(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = []
    widths = [in_dim] + [hidden_dim] * (nlayers - 1)
    for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
        layers.append(nn.Linear(width_in, width_out))
        if use_bn:
            layers.append(nn.BatchNorm1d(width_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def head_widths(state: dict[str, Tensor]) -> dict[str, int]:
    """The :class:`CrIBoHead` widths a head state dict (keys without ``head.``) was saved with.

    Returns ``out_dim``, ``out_dim_c``, ``bottleneck_dim``, ``nlayers`` and ``hidden_dim`` (the default
    when the trunk is one Linear and has no hidden layer), read from the weight shapes.
    """
    trunk = sorted(
        (int(parts[1]), value)
        for key, value in state.items()
        if (parts := key.split("."))[0] == "mlp"
        and parts[1].isdigit()
        and parts[-1] == "weight"
        and value.dim() == 2
    )
    if "last_layer.weight_v" not in state or "last_layer_c.weight_v" not in state:
        raise KeyError(f"not a CrIBo head state dict (keys: {sorted(state)[:6]} ...)")
    out_dim, bottleneck = state["last_layer.weight_v"].shape
    linear_weights = [value for _, value in trunk] or [state["mlp.weight"]]
    return {
        "out_dim": int(out_dim),
        "out_dim_c": int(state["last_layer_c.weight_v"].shape[0]),
        "bottleneck_dim": int(bottleneck),
        "nlayers": len(linear_weights),
        "hidden_dim": int(linear_weights[0].shape[0]) if len(linear_weights) > 1 else HEAD_HIDDEN_DIM,
    }
