"""Tests for models/head.py: DINO key layout, weight normalisation, frozen magnitudes, the two outputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.head import CrIBoHead, WeightNormLinear, head_widths


def _small_head(**kwargs) -> CrIBoHead:
    options = {"hidden_dim": 48, "bottleneck_dim": 16, **kwargs}
    return CrIBoHead(32, 64, 24, **options)


def test_keys_and_shapes_like_dino() -> None:
    head = CrIBoHead(384, 64, 32)
    shapes = {name: tuple(tensor.shape) for name, tensor in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 384),
        "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048),
        "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048),
        "mlp.4.bias": (256,),
        "last_layer.weight_g": (64, 1),
        "last_layer.weight_v": (64, 256),
        "last_layer_c.weight_g": (32, 1),
        "last_layer_c.weight_v": (32, 256),
    }
    assert [type(layer) for layer in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]


def test_batch_norm_layout_like_dino() -> None:
    head = _small_head(use_bn=True)
    assert [type(layer) for layer in head.mlp] == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.GELU,
        nn.Linear,
        nn.BatchNorm1d,
        nn.GELU,
        nn.Linear,
    ]
    assert "mlp.1.running_mean" in head.state_dict() and "mlp.6.weight" in head.state_dict()
    assert _small_head(nlayers=1).mlp.weight.shape == (16, 32)


def test_trunk_equals_manual_linear_gelu_stack_and_bottleneck_is_unit_norm() -> None:
    head = _small_head()
    x = torch.randn(5, 32)
    state = head.state_dict()
    hidden = F.gelu(x @ state["mlp.0.weight"].T + state["mlp.0.bias"])
    hidden = F.gelu(hidden @ state["mlp.2.weight"].T + state["mlp.2.bias"])
    trunk = hidden @ state["mlp.4.weight"].T + state["mlp.4.bias"]
    manual = trunk / trunk.norm(dim=1, keepdim=True)
    with torch.no_grad():
        bottleneck = head.bottleneck(x)
    assert bottleneck.shape == (5, 16)
    torch.testing.assert_close(bottleneck, manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(bottleneck.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    assert head.bottleneck(torch.randn(2, 3, 32)).shape == (2, 3, 16)  # any leading shape


def test_weight_norm_formula_against_row_by_row_reference() -> None:
    layer = WeightNormLinear(6, 4, freeze_norm=False)
    with torch.no_grad():
        layer.weight_g.copy_(torch.tensor([[2.0], [0.5], [-1.0], [3.0]]))
    x = torch.randn(7, 6)
    rows = []
    for o in range(4):
        v = layer.weight_v[o].tolist()
        norm = math.sqrt(sum(e**2 for e in v))
        rows.append([layer.weight_g[o, 0].item() * e / norm for e in v])
    weight = torch.tensor(rows)
    with torch.no_grad():
        torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer(x), x @ weight.T, atol=1e-5, rtol=0)
        # Row norms equal |g| by construction: a value checkable by hand.
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.tensor([2.0, 0.5, 1.0, 3.0]))


def test_weight_norm_loads_torch_weight_norm_state_and_agrees() -> None:
    torch_layer = nn.utils.parametrizations.weight_norm(nn.Linear(8, 5, bias=False))
    with torch.no_grad():
        torch_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    ours = WeightNormLinear(8, 5, freeze_norm=False)
    ours.load_state_dict(
        {
            "weight_g": torch_layer.parametrizations.weight.original0,
            "weight_v": torch_layer.parametrizations.weight.original1,
        },
        strict=True,
    )
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), torch_layer(x), atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy API is deprecated, but it defines the released key names
        legacy = nn.utils.weight_norm(nn.Linear(8, 5, bias=False))
    assert set(legacy.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(legacy.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), legacy(x), atol=1e-6, rtol=0)


def test_weight_norm_initialisation() -> None:
    layer = WeightNormLinear(256, 512)
    assert torch.equal(layer.weight_g, torch.ones(512, 1))
    bound = 1 / math.sqrt(256)  # nn.Linear's default uniform bound
    assert layer.weight_v.abs().max() <= bound and layer.weight_v.abs().max() > 0.9 * bound
    head = CrIBoHead(64, 32, 16, hidden_dim=512)
    weight = head.mlp[2].weight
    assert abs(weight.std().item() - 0.02) < 0.002 and torch.count_nonzero(head.mlp[2].bias) == 0


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_norm_last_layer_freezes_both_magnitudes(norm_last_layer: bool) -> None:
    head = _small_head(norm_last_layer=norm_last_layer)
    for layer in (head.last_layer, head.last_layer_c):
        assert layer.weight_g.requires_grad is (not norm_last_layer)
        assert torch.equal(layer.weight_g, torch.ones_like(layer.weight_g))
        assert layer.weight_v.requires_grad
    (head(torch.randn(3, 32)).sum() + head.forward_c(torch.randn(3, 32)).sum()).backward()
    assert (head.last_layer.weight_g.grad is None) is norm_last_layer
    if norm_last_layer:
        torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(64))


def test_forward_and_forward_c_use_separate_last_layers() -> None:
    head = _small_head(norm_last_layer=False)
    x = torch.randn(4, 32)
    logits, logits_c = head(x), head.forward_c(x)
    assert logits.shape == (4, 64) and logits_c.shape == (4, 24)
    bottleneck = head.bottleneck(x)
    torch.testing.assert_close(logits, head.project(bottleneck), atol=0, rtol=0)
    torch.testing.assert_close(logits_c, head.project_c(bottleneck), atol=0, rtol=0)
    torch.testing.assert_close(logits_c, bottleneck @ head.last_layer_c.weight.T, atol=1e-6, rtol=0)
    assert not torch.allclose(logits[:, :24], logits_c)

    logits.sum().backward()
    assert head.last_layer.weight_v.grad is not None and head.last_layer_c.weight_v.grad is None
    head.zero_grad(set_to_none=True)
    head.forward_c(x).sum().backward()
    assert head.last_layer.weight_v.grad is None and head.last_layer_c.weight_v.grad is not None
    assert head.mlp[0].weight.grad is not None


def test_invalid_nlayers_raises() -> None:
    with pytest.raises(ValueError, match="nlayers"):
        CrIBoHead(8, 4, 4, nlayers=0)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"hidden_dim": 48, "bottleneck_dim": 16},
        {"hidden_dim": 40, "bottleneck_dim": 12, "use_bn": True},
        {"hidden_dim": 40, "bottleneck_dim": 12, "nlayers": 2},
        {"bottleneck_dim": 12, "nlayers": 1},
    ],
)
def test_head_widths_read_back_the_widths_a_head_was_built_with(options) -> None:
    head = CrIBoHead(32, 64, 24, **options)
    widths = head_widths(head.state_dict())
    expected = {"out_dim": 64, "out_dim_c": 24, "nlayers": 3, "hidden_dim": 2048, "bottleneck_dim": 256}
    expected.update({key: value for key, value in options.items() if key != "use_bn"})
    assert widths == expected
    rebuilt = CrIBoHead(32, use_bn=options.get("use_bn", False), **widths)
    rebuilt.load_state_dict(head.state_dict())  # strict: every shape agrees


def test_head_widths_refuse_a_state_without_output_layers() -> None:
    with pytest.raises(KeyError, match="not a CrIBo head"):
        head_widths({"mlp.0.weight": torch.zeros(4, 4)})
