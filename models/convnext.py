"""ConvNeXt backbones with VICRegL's module names, so its released files load with ``strict=True``.

VICRegL (Bardes et al., NeurIPS 2022) released ConvNeXt-Small / Base / XLarge backbones built by its own
``convnext.py``; the state-dict keys are::

    downsample_layers.0.{0,1}.{weight,bias}      stem: Conv2d(3, d0, 4, stride 4), channels-first LayerNorm
    downsample_layers.{1,2,3}.{0,1}.{weight,bias} channels-first LayerNorm, Conv2d(d_i, d_i+1, 2, stride 2)
    stages.{i}.{j}.dwconv.{weight,bias}          depthwise Conv2d(d, d, 7, padding 3)
    stages.{i}.{j}.norm.{weight,bias}            LayerNorm over channels
    stages.{i}.{j}.pwconv1 / pwconv2.{weight,bias}  Linear(d, 4d), Linear(4d, d)
    stages.{i}.{j}.gamma                         layer scale, only when trained with it (not VICRegL's)
    norm.{weight,bias}                           final LayerNorm

Block (Liu et al., CVPR 2022): ``x + gamma * pwconv2(GELU(pwconv1(LN(dwconv(x)))))`` in channels-last.
VICRegL's ``forward_features`` applies the final ``norm`` to every position of the last stage and
averages the normalised tokens; :class:`ConvNeXt` does the same, so ``forward(x)`` is VICRegL's global
representation and the dense grid (stride 32) is its normalised last-stage map. ``dense_stage`` (1-4)
selects an earlier stage's raw map instead (stride 4 * 2^(stage - 1)). There is no attention map.

The timm ``convnext_*`` networks compute the same function under other names (``stem``,
``stages.i.downsample``, ``stages.i.blocks.j.conv_dw`` / ``mlp.fc1``, ``head.norm``);
``tests/test_conv_backbones.py`` checks the equality through an explicit key map.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from models.vision_transformer import DropPath

logger = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-6
INIT_STD = 0.02

#: (blocks per stage, channels per stage) of each size, as in VICRegL's and the ConvNeXt paper's tables.
CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map: ``(x - mean_c) / sqrt(var_c + eps) * w + b``.

    Args:
        channels: C.
        eps: variance floor (1e-6 as ConvNeXt).
    """

    def __init__(self, channels: int, eps: float = LAYER_NORM_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(variance + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """``x + DropPath(gamma * pwconv2(GELU(pwconv1(LN(dwconv(x))))))``, the MLP in channels-last layout.

    Args:
        dim: channels d.
        drop_path: stochastic-depth probability.
        layer_scale: learn the per-channel ``gamma`` (absent from VICRegL's releases, which use 0).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: bool = False) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6)) if layer_scale else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """(B, d, H, W) -> (B, d, H, W)."""
        branch = rearrange(self.dwconv(x), "b c h w -> b h w c")
        branch = self.pwconv2(self.act(self.pwconv1(self.norm(branch))))
        if self.gamma is not None:
            branch = self.gamma * branch
        return x + self.drop_path(rearrange(branch, "b h w c -> b c h w"))


class ConvNeXt(nn.Module):
    """ConvNeXt trunk (four stages, total stride 32) with VICRegL's names and the backbone interface.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        drop_path_rate: stochastic depth of the last block (linear in the block index from 0).
        layer_scale: per-channel layer scale in every block (keys ``stages.i.j.gamma``).
        dense_stage: stage (1-4) whose map is the dense grid; 4 (normalised, stride 32) by default.

    Attributes:
        embed_dim: width of the global feature (``dims[-1]``).
        dense_dim: width of the dense grid.
        patch_size: stride of the dense grid in pixels.
        has_attention: False.
    """

    has_attention = False

    def __init__(
        self,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale: bool = False,
        dense_stage: int = 4,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt: need 4 stages, got depths {depths} and dims {dims}")
        if dense_stage not in (1, 2, 3, 4):
            raise ValueError(f"ConvNeXt: dense_stage must be 1, 2, 3 or 4, got {dense_stage}")
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), ChannelsFirstLayerNorm(dims[0]))]
        )
        for stage in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    ChannelsFirstLayerNorm(dims[stage]),
                    nn.Conv2d(dims[stage], dims[stage + 1], kernel_size=2, stride=2),
                )
            )
        rates = torch.linspace(0.0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for stage, depth in enumerate(depths):
            first = sum(depths[:stage])
            self.stages.append(
                nn.Sequential(
                    *(ConvNeXtBlock(dims[stage], rates[first + j], layer_scale) for j in range(depth))
                )
            )
        self.norm = nn.LayerNorm(dims[-1], eps=LAYER_NORM_EPS)
        self.embed_dim = self.num_features = dims[-1]
        self.dense_stage = dense_stage
        self.dense_dim = dims[dense_stage - 1]
        self.patch_size = 4 * 2 ** (dense_stage - 1)
        self.apply(_init_weights)

    def _stages(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(raw map of ``dense_stage``, normalised last-stage tokens (B, N, C))."""
        dense = x
        for index in range(4):
            x = self.stages[index](self.downsample_layers[index](x))
            if index + 1 == self.dense_stage:
                dense = x
        return dense, self.norm(rearrange(x, "b c h w -> b (h w) c"))

    def forward(self, x: Tensor) -> Tensor:
        """Mean of the normalised last-stage tokens (VICRegL's representation): (B, 3, H, W) -> (B, C)."""
        return self._stages(x)[1].mean(dim=1)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(global (B, C), dense (B, N, dense_dim)), N = (H/s)(W/s) row-major, s = ``patch_size``."""
        dense, tokens = self._stages(x)
        if self.dense_stage == 4:
            return tokens.mean(dim=1), tokens
        return tokens.mean(dim=1), rearrange(dense, "b c h w -> b (h w) c")


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_convnext(arch: str, **kwargs: Any) -> ConvNeXt:
    """One of ``CONVNEXT_SIZES`` by name; ``kwargs`` go to :class:`ConvNeXt`."""
    if arch not in CONVNEXT_SIZES:
        raise ValueError(f"unknown ConvNeXt size {arch!r}; choose one of {', '.join(CONVNEXT_SIZES)}")
    depths, dims = CONVNEXT_SIZES[arch]
    return ConvNeXt(depths=depths, dims=dims, **kwargs)
