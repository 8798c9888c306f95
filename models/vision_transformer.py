"""Vision Transformer backbone with DINO's and dinov2's parameter names and evaluation interface.

The module layout (and therefore every state-dict key) matches the backbones released by DINO, CrIBo
and dinov2, so their weights load with ``strict=True``::

    cls_token                      (1, 1, D)
    pos_embed                      (1, 1 + (img_size / p)^2, D)
    register_tokens                (1, R, D)        only with R > 0 registers (dinov2 "_reg" models)
    patch_embed.proj.{weight,bias} Conv2d(3, D, kernel p, stride p)
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 .{weight,bias}
    blocks.{i}.mlp.fc1 / mlp.fc2 .{weight,bias}     GELU MLP (DINO, dinov2 ViT-S/B/L)
    blocks.{i}.mlp.w12 / mlp.w3 .{weight,bias}      SwiGLU MLP (dinov2 ViT-g)
    blocks.{i}.ls1.gamma / ls2.gamma                (D,) only with LayerScale (dinov2)
    norm.{weight,bias}

Pre-norm blocks (docs/method.md, Sec. 3; Dosovitskiy et al. 2021; LayerScale: Touvron et al. 2021):

    x = x + DropPath(LS1(Attn(LN1(x))));   x = x + DropPath(LS2(MLP(LN2(x))))
    Attn(h) = Proj(concat_heads(softmax(q k^T / sqrt(d_head)) v)),   [q, k, v] = QKV(h)
    MLP(h) = FC2(GELU(FC1(h)))            (hidden width = mlp_ratio * D)
    SwiGLU(h) = W3(SiLU(a) * b),  [a, b] = W12(h)      (hidden width: dinov2's rounded 2/3 * mlp_ratio * D)
    LS(h) = gamma * h                     (identity without LayerScale)

Token order inside the blocks is [CLS], the R registers, then the N patch tokens (dinov2's); the
positional embedding covers [CLS] and the patches, never the registers. Every output of the evaluation
interface leaves the registers out: [CLS] and patch tokens only.

Shapes: B images, H x W pixels, p patch size, N = (H / p) * (W / p) patch tokens, R registers, D width.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import Tensor, nn

logger = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-6
INIT_STD = 0.02


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``drop_prob``.

    Training: ``y_b = x_b * z_b / (1 - drop_prob)`` with ``z_b ~ Bernoulli(1 - drop_prob)``, one draw per
    sample b (shared by all its tokens and channels), so ``E[y] = x``. Evaluation: ``y = x``.

    Args:
        drop_prob: probability in [0, 1) of dropping a sample's branch.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropPath: drop_prob must lie in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        """Apply stochastic depth to ``x`` of shape (B, ...)."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = torch.empty(mask_shape, dtype=x.dtype, device=x.device).bernoulli_(keep_prob)
        return x * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches projected to D channels by a strided convolution.

    Args:
        patch_size: side p of a square patch in pixels.
        in_chans: number of input channels.
        embed_dim: output width D.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D), tokens in row-major order of the (H/p, W/p) patch grid."""
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class Attention(nn.Module):
    """Multi-head self-attention, ``softmax(q k^T / sqrt(d_head)) v`` per head.

    Args:
        dim: token width D.
        num_heads: number of heads h; ``d_head = D / h``.
        qkv_bias: whether the fused q/k/v projection has a bias.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D) through the fused scaled-dot-product attention kernel."""
        q, k, v = self._split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def attention_map(self, x: Tensor) -> Tensor:
        """Explicit attention probabilities ``softmax(q k^T / sqrt(d_head))``, shape (B, h, N, N)."""
        q, k, _ = self._split_heads(x)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        return logits.softmax(dim=-1)


class Mlp(nn.Module):
    """Two-layer perceptron ``fc2(GELU(fc1(x)))`` with hidden width ``hidden_dim``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated MLP ``w3(SiLU(a) * b)`` with ``[a, b] = w12(x)`` split in halves (dinov2's SwiGLUFFNFused names).

    Args:
        dim: token width D.
        hidden_dim: width H of the gate and of the value; ``w12`` is (2H, D), ``w3`` is (D, H).
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0) -> int:
    """dinov2's SwiGLU width: ``2/3 * mlp_ratio * D`` rounded up to a multiple of 8 (4096 for D = 1536)."""
    return (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch, ``gamma * x`` (parameter ``gamma`` of shape (D,)).

    Args:
        dim: token width D.
        init_value: initial value of every entry of ``gamma``.
    """

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return x * self.gamma


#: The MLP kinds of a block: DINO's GELU MLP (``fc1``/``fc2``) or dinov2 ViT-g's SwiGLU (``w12``/``w3``).
FFN_LAYERS = ("mlp", "swiglu")


class Block(nn.Module):
    """Pre-norm block: ``x + DropPath(LS1(Attn(LN1(x))))`` then ``x + DropPath(LS2(MLP(LN2(x))))``.

    Args:
        dim: token width D.
        num_heads: number of attention heads.
        mlp_ratio: MLP hidden width as a multiple of D (when ``ffn_hidden_dim`` is None).
        qkv_bias: bias on the q/k/v projection.
        drop_path: stochastic-depth probability of both residual branches.
        layer_scale_init: initial ``gamma`` of LayerScale on both branches; None: no LayerScale.
        ffn_layer: ``"mlp"`` (GELU MLP) or ``"swiglu"``.
        ffn_hidden_dim: hidden width of the MLP; None: ``mlp_ratio * D`` (MLP) or
            :func:`swiglu_hidden_dim` (SwiGLU).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        ffn_layer: str = "mlp",
        ffn_hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"Block: ffn_layer {ffn_layer!r} is not one of {FFN_LAYERS}")
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.ls1: nn.Module = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp: nn.Module
        if ffn_layer == "swiglu":
            self.mlp = SwiGLU(dim, ffn_hidden_dim or swiglu_hidden_dim(dim, mlp_ratio))
        else:
            self.mlp = Mlp(dim, ffn_hidden_dim or int(dim * mlp_ratio))
        self.ls2: nn.Module = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def self_attention(self, x: Tensor) -> Tensor:
        """Attention probabilities of this block for input tokens ``x`` (B, N, D): (B, heads, N, N)."""
        return self.attn.attention_map(self.norm1(x))


class VisionTransformer(nn.Module):
    """ViT with a [CLS] token, learned positional embedding and DINO's / dinov2's parameter names.

    Stochastic depth grows linearly over the blocks: block i drops its branches with probability
    ``drop_path_rate * i / (depth - 1)``. Parameters are initialised as in DINO: truncated normal
    (std 0.02) for ``cls_token``, ``pos_embed`` and every Linear weight, zero Linear biases, unit
    LayerNorms; the patch convolution keeps PyTorch's default initialisation; registers start at
    N(0, 1e-6) as in dinov2.

    Args:
        img_size: side of the square image the positional embedding is stored for
            (224 -> a 14 x 14 grid for p = 16; dinov2: 518 -> 37 x 37 for p = 14). Other sizes are
            interpolated on the fly (:meth:`interpolate_pos_encoding`).
        patch_size: patch side p in pixels.
        in_chans: number of input channels.
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: number of attention heads.
        mlp_ratio: MLP hidden width as a multiple of D.
        qkv_bias: bias on the q/k/v projection.
        drop_path_rate: stochastic depth of the last block.
        layer_scale_init: LayerScale on every residual branch, ``gamma`` starting at this value
            (dinov2); None: no LayerScale (DINO, CrIBo).
        num_register_tokens: R learned register tokens placed after [CLS] (dinov2 "_reg": 4).
        ffn_layer: ``"mlp"`` (GELU) or ``"swiglu"`` (dinov2 ViT-g).
        ffn_hidden_dim: hidden width of every block's MLP; None: the ``mlp_ratio`` rule of the kind.
        interpolate_offset: the positional grid is resized by the scale factors ``(rows + offset) / M``
            and ``(cols + offset) / M`` (DINO, dinov2: 0.1); 0 resizes to the output size instead
            (dinov2 with registers, timm).
        interpolate_antialias: antialiased bicubic resizing (dinov2 with registers, timm: True).

    Attributes:
        grad_checkpointing: when True (see :meth:`set_grad_checkpointing`), a forward pass that records
            gradients keeps only each block's input and recomputes the block during backward: the saved
            activations shrink from about 17 D floats per token and block (1.98 GB for ViT-S/16, 32 crops
            of 224 px, fp32) to D per token and block, for one extra forward of the blocks. Results and
            gradients are unchanged (the drop-path draws are replayed). Off by default.
        has_attention: True (:meth:`get_last_selfattention`); the conv backbones have none.
        dense_dim: width of the dense grid (the patch tokens), D.
    """

    has_attention = True

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layer_scale_init: float | None = None,
        num_register_tokens: int = 0,
        ffn_layer: str = "mlp",
        ffn_hidden_dim: int | None = None,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ) -> None:
        super().__init__()
        if patch_size <= 0 or img_size % patch_size != 0:
            raise ValueError(
                f"VisionTransformer: img_size {img_size} is not a positive multiple of patch_size "
                f"{patch_size}; pass an --image_size divisible by --patch_size"
            )
        if depth < 1:
            raise ValueError(f"VisionTransformer: depth must be >= 1, got {depth}")
        if num_register_tokens < 0:
            raise ValueError(
                f"VisionTransformer: num_register_tokens must be >= 0, got {num_register_tokens}"
            )
        self.embed_dim = self.num_features = self.dense_dim = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.img_size = img_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid_side = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid_side * grid_side, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        rates = torch.linspace(0.0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=rate,
                layer_scale_init=layer_scale_init,
                ffn_layer=ffn_layer,
                ffn_hidden_dim=ffn_hidden_dim,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.grad_checkpointing = False

        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.apply(_init_linear_and_norm)

    def interpolate_pos_encoding(self, x_tokens: Tensor, height: int, width: int) -> Tensor:
        """Positional embedding for an image of ``height`` x ``width`` pixels, exactly as DINO / dinov2.

        The stored (M x M) grid, M = sqrt(N0), is resized bicubically to the (H/p, W/p) patch grid:
        with ``interpolate_offset`` o > 0 by the scale factors ``((H/p + o) / M, (W/p + o) / M)`` (DINO's
        recipe, o = 0.1: the offset guards the floor in the output size against rounding, and the sampling
        positions follow the given scale factor rather than the ratio of output to input size); with o = 0
        by the output size (dinov2 with registers, timm); antialiased when ``interpolate_antialias``. When
        the token count equals N0 and the image is square, the stored embedding is returned unchanged.

        Args:
            x_tokens: (B, 1 + N, D) tokens after the [CLS] token was prepended (registers not included).
            height: image height H in pixels (a multiple of p).
            width: image width W in pixels (a multiple of p).
        Returns:
            (1, 1 + N, D) positional embedding, [CLS] entry first, grid row-major.
        """
        num_patches = x_tokens.shape[1] - 1
        num_stored = self.pos_embed.shape[1] - 1
        if num_patches == num_stored and height == width:
            return self.pos_embed
        rows, cols = height // self.patch_size, width // self.patch_size
        stored_side = math.sqrt(num_stored)
        cls_pos = self.pos_embed[:, :1]
        grid = rearrange(self.pos_embed[:, 1:], "1 (h w) d -> 1 d h w", h=int(stored_side))
        if self.interpolate_offset:
            offset = self.interpolate_offset
            grid = F.interpolate(
                grid,
                scale_factor=((rows + offset) / stored_side, (cols + offset) / stored_side),
                mode="bicubic",
                antialias=self.interpolate_antialias,
            )
        else:
            antialias = self.interpolate_antialias
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=antialias)
        if grid.shape[-2:] != (rows, cols):
            raise RuntimeError(
                f"interpolate_pos_encoding: resized grid {tuple(grid.shape[-2:])} does not match the "
                f"patch grid {(rows, cols)}"
            )
        return torch.cat((cls_pos, rearrange(grid, "1 d h w -> 1 (h w) d")), dim=1)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """Patch-embed images, prepend [CLS], add the positional embedding, insert the registers.

        Args:
            x: (B, C, H, W) images, H and W multiples of the patch size.
        Returns:
            (B, 1 + R + N, D) input tokens of the first block: [CLS], registers, patches.
        Raises:
            ValueError: if H or W is not divisible by the patch size.
        """
        if x.ndim != 4:
            raise ValueError(f"VisionTransformer expects (B, C, H, W) images, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"VisionTransformer: image size {height}x{width} is not divisible by the patch size "
                f"{self.patch_size}; resize or crop the images to multiples of {self.patch_size} pixels"
            )
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, height, width)
        if self.register_tokens is None:
            return tokens
        registers = self.register_tokens.expand(tokens.shape[0], -1, -1)
        return torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)

    def _without_registers(self, tokens: Tensor) -> Tensor:
        """(B, 1 + R + N, D) -> (B, 1 + N, D): [CLS] and the patch tokens."""
        if not self.num_register_tokens:
            return tokens
        return torch.cat((tokens[:, :1], tokens[:, 1 + self.num_register_tokens :]), dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade one extra forward of the blocks for activation memory in training (see the class docs)."""
        self.grad_checkpointing = enable

    def _encode(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1 + R + N, D) tokens after the final LayerNorm ([CLS], registers, patches)."""
        tokens = self.prepare_tokens(x)
        recompute = self.grad_checkpointing and torch.is_grad_enabled() and tokens.requires_grad
        for block in self.blocks:
            if recompute:
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: Tensor) -> Tensor:
        """Normalised [CLS] token: (B, C, H, W) -> (B, D)."""
        return self._encode(x)[:, 0]

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[CLS] and patch tokens after the final LayerNorm, from one pass (registers left out).

        Args:
            x: (B, C, H, W) images.
        Returns:
            ``(cls, patches)`` of shapes (B, D) and (B, N, D), N = (H/p)(W/p) in row-major grid order.
        """
        tokens = self._encode(x)
        return tokens[:, 0], tokens[:, 1 + self.num_register_tokens :]

    def forward_register_tokens(self, x: Tensor) -> Tensor:
        """The register tokens after the final LayerNorm: (B, C, H, W) -> (B, R, D) (empty for R = 0)."""
        return self._encode(x)[:, 1 : 1 + self.num_register_tokens]

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """Outputs of the last ``n`` blocks, each through the final LayerNorm (DINO's linear eval).

        Args:
            x: (B, C, H, W) images.
            n: number of final blocks to return, 1 <= n <= depth.
        Returns:
            ``n`` tensors of shape (B, 1 + N, D) ([CLS] then the patch tokens, registers left out),
            shallowest first.
        """
        if not 1 <= n <= self.depth:
            raise ValueError(f"get_intermediate_layers: n must lie in [1, {self.depth}], got {n}")
        tokens = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index >= self.depth - n:
                outputs.append(self._without_registers(self.norm(tokens)))
        return outputs

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Attention probabilities of the last block, ``softmax(q k^T / sqrt(d_head))``.

        Args:
            x: (B, C, H, W) images.
        Returns:
            (B, heads, 1 + N, 1 + N), row/column 0 the [CLS] token. Without registers every row sums to 1;
            with registers their rows and columns are left out, so a row sums to 1 minus its attention to
            the registers.
        """
        tokens = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last_block = self.blocks[-1]
        assert isinstance(last_block, Block)
        attention = last_block.self_attention(tokens)
        if not self.num_register_tokens:
            return attention
        keep = torch.cat(
            (torch.zeros(1, dtype=torch.long), torch.arange(1 + self.num_register_tokens, tokens.shape[1]))
        ).to(attention.device)
        return attention.index_select(2, keep).index_select(3, keep)


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def vit_tiny(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny: D = 192, 12 blocks, 3 heads."""
    return VisionTransformer(
        patch_size=patch_size, **{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs}
    )


def vit_small(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Small: D = 384, 12 blocks, 6 heads."""
    return VisionTransformer(
        patch_size=patch_size, **{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs}
    )


def vit_base(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Base: D = 768, 12 blocks, 12 heads."""
    return VisionTransformer(
        patch_size=patch_size, **{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs}
    )


def vit_large(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Large: D = 1024, 24 blocks, 16 heads (iBOT's ViT-L/16, dinov2's ViT-L/14)."""
    return VisionTransformer(
        patch_size=patch_size, **{"embed_dim": 1024, "depth": 24, "num_heads": 16, **kwargs}
    )


def vit_giant(patch_size: int = 14, **kwargs: Any) -> VisionTransformer:
    """ViT-giant as dinov2's ``vit_giant2``: D = 1536, 40 blocks, 24 heads, SwiGLU MLP of width 4096."""
    return VisionTransformer(
        patch_size=patch_size,
        **{"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglu", **kwargs},
    )
