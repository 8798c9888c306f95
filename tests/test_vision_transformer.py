"""Tests for models/vision_transformer.py: timm parity, DINO's positional interpolation, keys, eval API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from models import ARCHS, build_backbone
from models.vision_transformer import DropPath, VisionTransformer, vit_base, vit_large, vit_small, vit_tiny


def _randomise(model: torch.nn.Module) -> None:
    """Give every parameter random values (biases and LayerNorms included) so parity is not trivial."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))


def _timm_twin(ours: VisionTransformer, img_size: int | tuple[int, int]) -> TimmVisionTransformer:
    """timm ViT of the same shape, explicit (non-fused) attention, [CLS] pooling, no head."""
    twin = TimmVisionTransformer(
        img_size=img_size,
        patch_size=ours.patch_size,
        embed_dim=ours.embed_dim,
        depth=ours.depth,
        num_heads=ours.num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        class_token=True,
        reg_tokens=0,
        global_pool="token",
        num_classes=0,
    )
    for block in twin.blocks:
        block.attn.fused_attn = False
    return twin.eval()


def _dino_reference_interpolation(
    pos_embed: torch.Tensor, patch_size: int, x_shape: torch.Size
) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` transcribed literally (including its w/h naming)."""
    _, _, w, h = x_shape
    npatch = (w // patch_size) * (h // patch_size)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _expected_backbone_keys(depth: int) -> list[str]:
    block_keys = [
        f"blocks.{i}.{layer}.{kind}"
        for i in range(depth)
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for kind in ("weight", "bias")
    ]
    return [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        *block_keys,
        "norm.weight",
        "norm.bias",
    ]


# ---------------------------------------------------------------------------------------------------
# timm parity


def test_matches_timm_at_224() -> None:
    ours = vit_tiny(depth=2).eval()
    _randomise(ours)
    twin = _timm_twin(ours, 224)
    twin.load_state_dict(ours.state_dict(), strict=True)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cls, patches = ours.forward_features(images)
        timm_tokens = twin.forward_features(images)
        timm_cls = twin(images)
        ours_cls = ours(images)
    assert patches.shape == (2, 196, 192)
    torch.testing.assert_close(cls, timm_tokens[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(patches, timm_tokens[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_cls, timm_cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_cls, cls, atol=0, rtol=0)


@pytest.mark.parametrize("height, width", [(160, 224), (224, 96)])
def test_matches_timm_at_non_square_size(height: int, width: int) -> None:
    ours = vit_tiny(depth=2).eval()
    _randomise(ours)
    images = torch.randn(2, 3, height, width)
    num_patches = (height // 16) * (width // 16)
    with torch.no_grad():
        resized = ours.interpolate_pos_encoding(torch.zeros(1, 1 + num_patches, 192), height, width)
    state = dict(ours.state_dict(), pos_embed=resized)
    twin = _timm_twin(ours, (height, width))
    twin.load_state_dict(state, strict=True)
    with torch.no_grad():
        cls, patches = ours.forward_features(images)
        timm_tokens = twin.forward_features(images)
    assert patches.shape == (2, num_patches, 192)
    torch.testing.assert_close(cls, timm_tokens[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(patches, timm_tokens[:, 1:], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# positional-embedding interpolation


@pytest.mark.parametrize(
    "patch_size, height, width",
    [(16, 160, 224), (16, 224, 96), (16, 64, 64), (16, 112, 448), (16, 448, 448), (8, 48, 80)],
)
def test_interpolation_equals_dino_reference(patch_size: int, height: int, width: int) -> None:
    model = VisionTransformer(img_size=224, patch_size=patch_size, embed_dim=24, depth=1, num_heads=2)
    images = torch.randn(1, 3, height, width)
    tokens = torch.zeros(1, 1 + (height // patch_size) * (width // patch_size), 24)
    with torch.no_grad():
        ours = model.interpolate_pos_encoding(tokens, height, width)
        reference = _dino_reference_interpolation(model.pos_embed, patch_size, images.shape)
    assert ours.shape == tokens.shape
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)


def test_interpolation_returns_stored_embedding_for_matching_square_input() -> None:
    model = vit_tiny(depth=1, img_size=64)
    tokens = torch.zeros(1, 1 + 16, 192)
    assert model.interpolate_pos_encoding(tokens, 64, 64) is model.pos_embed
    # Same token count (4 x 4 = 2 x 8) but another aspect: DINO resizes, and so do we.
    resized = model.interpolate_pos_encoding(tokens, 32, 128)
    assert resized is not model.pos_embed and resized.shape == (1, 17, 192)


def test_interpolation_uses_scale_factor_not_output_size() -> None:
    """DINO's +0.1 scale-factor recipe samples other positions than a plain resize to (rows, cols)."""
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=8, depth=1, num_heads=2)
    with torch.no_grad():
        ours = model.interpolate_pos_encoding(torch.zeros(1, 1 + 10 * 6, 8), 160, 96)[:, 1:]
        grid = model.pos_embed[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
        by_size = F.interpolate(grid, size=(10, 6), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 60, 8)
    assert (ours - by_size).abs().max() > 1e-3


def test_interpolation_orientation_and_constants_by_hand() -> None:
    """A grid that varies along rows only stays row-only, rows first; a constant grid stays constant."""
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=4, depth=1, num_heads=1)
    rows = torch.arange(4.0).repeat_interleave(4)  # value = row index of the 4 x 4 grid
    with torch.no_grad():
        model.pos_embed[0, 1:] = rows[:, None].expand(16, 4)
        model.pos_embed[0, 0] = 7.0
        out = model.interpolate_pos_encoding(torch.zeros(1, 1 + 2 * 6, 4), 32, 96)
    assert torch.equal(out[0, 0], torch.full((4,), 7.0))
    grid = out[0, 1:].reshape(2, 6, 4)
    torch.testing.assert_close(grid, grid[:, :1].expand(2, 6, 4), atol=1e-6, rtol=0)
    assert grid[1, 0, 0] > grid[0, 0, 0] + 1.0  # rows shrink 4 -> 2, so their values spread apart

    with torch.no_grad():
        model.pos_embed[0, 1:] = 0.5
        out = model.interpolate_pos_encoding(torch.zeros(1, 1 + 3 * 5, 4), 48, 80)
    torch.testing.assert_close(out[0, 1:], torch.full((15, 4), 0.5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("height, width", [(33, 32), (32, 40)])
def test_size_not_divisible_by_patch_raises(height: int, width: int) -> None:
    model = vit_tiny(depth=1, img_size=32)
    with pytest.raises(ValueError, match=rf"{height}x{width}.*patch size 16"):
        model(torch.randn(1, 3, height, width))


def test_img_size_not_divisible_by_patch_raises() -> None:
    with pytest.raises(ValueError, match="img_size 100.*patch_size 16"):
        VisionTransformer(img_size=100, patch_size=16)


# ---------------------------------------------------------------------------------------------------
# keys, architecture and initialisation


def test_state_dict_keys_equal_dino_layout() -> None:
    with torch.device("meta"):
        model = vit_small()
    state = model.state_dict()
    assert list(state) == _expected_backbone_keys(12)
    assert len(state) == 150
    assert state["pos_embed"].shape == (1, 197, 384)
    assert state["cls_token"].shape == (1, 1, 384)
    assert state["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    assert state["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert state["blocks.0.attn.qkv.bias"].shape == (1152,)
    assert state["blocks.11.mlp.fc1.weight"].shape == (1536, 384)


@pytest.mark.parametrize(
    "factory, width, heads, parameters",
    [(vit_tiny, 192, 3, 5_524_416), (vit_small, 384, 6, 21_665_664), (vit_base, 768, 12, 85_798_656)],
)
def test_factories_match_timm_shapes(factory, width: int, heads: int, parameters: int) -> None:
    with torch.device("meta"):
        ours = factory(patch_size=8)
        twin = TimmVisionTransformer(patch_size=8, embed_dim=width, depth=12, num_heads=heads, num_classes=0)
    assert (ours.embed_dim, ours.depth, ours.num_heads, ours.patch_size) == (width, 12, heads, 8)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in twin.state_dict().items()
    }
    # `parameters` is for patch 16; patch 8 adds 28^2 - 14^2 positional rows and shrinks the conv.
    conv_delta = 3 * width * (16 * 16 - 8 * 8)
    assert sum(p.numel() for p in ours.parameters()) == parameters + (784 - 196) * width - conv_delta
    assert ours.norm.eps == 1e-6 and ours.blocks[0].norm1.eps == 1e-6


def test_build_backbone_registry() -> None:
    assert ARCHS == ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant")
    model = build_backbone("vit_tiny", patch_size=8, drop_path_rate=0.2, img_size=32, depth=3)
    assert (model.patch_size, model.depth, model.pos_embed.shape) == (8, 3, (1, 17, 192))
    with pytest.raises(ValueError, match="vit_huge.*vit_tiny, vit_small, vit_base, vit_large, vit_giant"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="resnet50.*a conv net"):
        build_backbone("resnet50")


def test_vit_large_has_timm_vit_large_patch16_shapes() -> None:
    """ViT-L/16 (iBOT's release): width 1024, 24 blocks, 16 heads; built on the meta device (no memory)."""
    with torch.device("meta"):
        ours = vit_large(patch_size=16)
        twin = _timm_twin(ours, 224)
    assert (ours.embed_dim, ours.depth, ours.num_heads, ours.patch_size) == (1024, 24, 16, 16)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in twin.state_dict().items()
    }
    assert sum(p.numel() for p in ours.parameters()) == 303_301_632


def test_initialisation_like_dino() -> None:
    model = vit_small(depth=2)
    for name, param in model.named_parameters():
        if name.startswith("blocks") and name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        if "norm" in name and name.endswith("weight"):
            assert torch.all(param == 1), name
    for tensor in (model.pos_embed, model.blocks[0].attn.qkv.weight, model.blocks[1].mlp.fc2.weight):
        assert abs(tensor.std().item() - 0.02) < 0.002
        assert tensor.abs().max() <= 2.0


# ---------------------------------------------------------------------------------------------------
# evaluation interface


def test_intermediate_layers_are_normed_block_outputs() -> None:
    model = vit_tiny(depth=4, img_size=32).eval()
    _randomise(model)
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        layers = model.get_intermediate_layers(images, n=3)
        cls, patches = model.forward_features(images)
        tokens = model.prepare_tokens(images)
        manual = []
        for block in model.blocks:
            tokens = block(tokens)
            manual.append(model.norm(tokens))
    assert len(layers) == 3 and all(layer.shape == (2, 7, 192) for layer in layers)
    for layer, reference in zip(layers, manual[1:], strict=True):
        torch.testing.assert_close(layer, reference, atol=0, rtol=0)
    torch.testing.assert_close(layers[-1][:, 0], cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(layers[-1][:, 1:], patches, atol=1e-6, rtol=0)
    assert len(model.get_intermediate_layers(images)) == 1
    with pytest.raises(ValueError, match="n must lie in"):
        model.get_intermediate_layers(images, n=5)


def test_last_selfattention_equals_manual_softmax() -> None:
    model = vit_tiny(depth=2, img_size=32).eval()
    _randomise(model)
    images = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        attention = model.get_last_selfattention(images)
        tokens = model.blocks[0](model.prepare_tokens(images))
        last = model.blocks[1]
        qkv = last.attn.qkv(last.norm1(tokens)).reshape(2, 9, 3, 3, 64)  # (B, 1+N, q/k/v, heads, d)
        manual = torch.empty(2, 3, 9, 9)
        for head in range(3):
            q, k = qkv[:, :, 0, head], qkv[:, :, 1, head]
            manual[:, head] = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(64), dim=-1)
        # The fused-attention block output must agree with the explicit attention probabilities.
        v = qkv[:, :, 2].permute(0, 2, 1, 3)
        explicit = last.attn.proj((manual @ v).permute(0, 2, 1, 3).reshape(2, 9, 192))
        fused = last.attn(last.norm1(tokens))
    assert attention.shape == (2, 3, 9, 9)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, 9), atol=1e-6, rtol=0)
    torch.testing.assert_close(attention, manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# stochastic depth


def test_drop_path_eval_is_identity_and_train_drops_whole_samples() -> None:
    drop = DropPath(0.3)
    x = torch.ones(20000, 3, 2)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    y = drop(x)
    per_sample = y.reshape(20000, -1)
    assert torch.all(per_sample == per_sample[:, :1])  # one decision per sample
    values = per_sample[:, 0].unique()
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / 0.7]))
    survival = (per_sample[:, 0] > 0).float().mean().item()
    assert abs(survival - 0.7) < 5 * math.sqrt(0.7 * 0.3 / 20000)
    assert abs(y.mean().item() - 1.0) < 0.03  # unbiased: E[y] = x
    assert torch.equal(DropPath(0.0).train()(x), x)
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.0)


def test_drop_path_rate_increases_linearly_over_blocks() -> None:
    model = vit_tiny(depth=5, img_size=32, drop_path_rate=0.2)
    rates = [block.drop_path.drop_prob for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_model_deterministic_in_eval_and_stochastic_in_train() -> None:
    model = vit_tiny(depth=3, img_size=32, drop_path_rate=0.5)
    plain = vit_tiny(depth=3, img_size=32)
    plain.load_state_dict(model.state_dict())
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), atol=0, rtol=0)
        model.train()
        first, second = model(images), model(images)
    assert not torch.allclose(first, second)
