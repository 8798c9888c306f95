"""models/resnet.py and models/convnext.py: key names of the releases, parity with torchvision / timm,
the backbone interface (global feature, dense grid and its stride) and the architecture detection."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from timm.models.convnext import ConvNeXt as TimmConvNeXt

from cribo_utils.weights.architecture_detection import detect_architecture
from models import CONV_ARCHS, EVAL_ARCHS, build_eval_backbone
from models.convnext import CONVNEXT_SIZES, ConvNeXt
from models.resnet import ResNetBackbone

SMALL_DEPTHS, SMALL_DIMS = (1, 1, 2, 1), (8, 16, 24, 32)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter and BN statistic, so parity is not trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype.is_floating_point:
                values = torch.randn(tensor.shape, generator=generator)
                if name.endswith(("running_var", "norm.weight", ".1.weight")) or "bn" in name:
                    values = 1.0 + 0.2 * values.abs()
                tensor.copy_(0.1 * values if "conv" in name or "pwconv" in name else values)


def _images(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_resnet50_keys_are_torchvision_without_fc() -> None:
    """DINO's dino_resnet50_pretrain.pth and VICRegL's resnet50_alpha*.pth: torchvision names, no fc."""
    with torch.device("meta"):
        ours = ResNetBackbone()
        reference = torchvision.models.resnet50()
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert len(expected) == 318 and "layer4.2.bn3.num_batches_tracked" in expected


def test_resnet50_matches_torchvision_and_vicregl_padding() -> None:
    model = ResNetBackbone().eval()
    _randomise(model)
    reference = torchvision.models.resnet50()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(model.state_dict())
    reference.eval()
    images = _images()
    with torch.no_grad():
        pooled, dense = model.forward_features(images)
        assert torch.allclose(model(images), reference(images), atol=1e-5, rtol=1e-5)
        assert torch.equal(pooled, model(images))
        # VICRegL pads by 1 (ConstantPad2d) then convolves with padding 2: the same as padding 3.
        vicregl_stem = F.conv2d(F.pad(images, (1, 1, 1, 1)), model.conv1.weight, stride=2, padding=2)
        assert torch.allclose(vicregl_stem, model.conv1(images), atol=1e-6)
        layer4 = reference.layer4(
            reference.layer3(
                reference.layer2(
                    reference.layer1(
                        reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
                    )
                )
            )
        )
    assert dense.shape == (2, 4, 2048) and model.patch_size == 32 and model.dense_dim == 2048
    assert torch.allclose(dense, layer4.flatten(2).transpose(1, 2), atol=1e-5)
    assert torch.allclose(pooled, dense.mean(1), atol=1e-5)


def test_resnet50_earlier_dense_stage() -> None:
    model = ResNetBackbone(dense_stage=3).eval()
    with torch.no_grad():
        pooled, dense = model.forward_features(_images())
    assert (model.patch_size, model.dense_dim, model.embed_dim) == (16, 1024, 2048)
    assert dense.shape == (2, 16, 1024) and pooled.shape == (2, 2048)
    with pytest.raises(ValueError, match="dense_stage"):
        ResNetBackbone(dense_stage=5)


def _vicregl_to_timm_key(key: str) -> str:
    """Our (VICRegL) ConvNeXt names -> timm's: the documented mapping checked below."""
    if key.startswith("downsample_layers.0."):
        return "stem." + key[len("downsample_layers.0.") :]
    match = re.fullmatch(r"downsample_layers\.(\d)\.(.*)", key)
    if match:
        return f"stages.{match.group(1)}.downsample.{match.group(2)}"
    match = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(\w+)(\..*)?", key)
    if match:
        stage, block, module, rest = match.groups()
        module = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}.get(module, module)
        return f"stages.{stage}.blocks.{block}.{module}{rest or ''}"
    if key.startswith("norm."):
        return "head." + key
    raise KeyError(key)


@pytest.mark.parametrize("layer_scale", [False, True])
def test_convnext_matches_timm_through_a_key_map(layer_scale: bool) -> None:
    """Same function as timm's ConvNeXt; VICRegL's global feature is mean_n(LN(x_n)) (timm: LN(mean))."""
    ours = ConvNeXt(SMALL_DEPTHS, SMALL_DIMS, layer_scale=layer_scale).eval()
    _randomise(ours)
    timm_model = TimmConvNeXt(
        depths=SMALL_DEPTHS, dims=SMALL_DIMS, num_classes=0, ls_init_value=1e-6 if layer_scale else None
    ).eval()
    timm_model.load_state_dict(
        {_vicregl_to_timm_key(k): v for k, v in ours.state_dict().items()}, strict=True
    )
    images = _images()
    with torch.no_grad():
        pooled, dense = ours.forward_features(images)
        last_map = timm_model.forward_features(images)  # (B, C, H/32, W/32), before the head norm
        tokens = F.layer_norm(
            last_map.flatten(2).transpose(1, 2), (SMALL_DIMS[-1],), ours.norm.weight, ours.norm.bias, 1e-6
        )
    assert dense.shape == (2, 4, SMALL_DIMS[-1]) and ours.patch_size == 32
    assert torch.allclose(dense, tokens, atol=1e-4)
    assert torch.allclose(pooled, tokens.mean(1), atol=1e-4)
    assert torch.equal(ours(images), pooled)
    assert any(k.endswith("gamma") for k in ours.state_dict()) == layer_scale


def test_convnext_earlier_dense_stage_is_the_raw_stage_map() -> None:
    model = ConvNeXt(SMALL_DEPTHS, SMALL_DIMS, dense_stage=3).eval()
    images = _images()
    with torch.no_grad():
        _, dense = model.forward_features(images)
        x = images
        for stage in range(3):
            x = model.stages[stage](model.downsample_layers[stage](x))
    assert (model.patch_size, model.dense_dim) == (16, SMALL_DIMS[2])
    assert torch.allclose(dense, x.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("arch", list(CONVNEXT_SIZES))
def test_convnext_sizes_on_the_meta_device(arch: str) -> None:
    """Every size (XLarge included) is built without memory; blocks and widths as VICRegL's convnext.py."""
    depths, dims = CONVNEXT_SIZES[arch]
    with torch.device("meta"):
        model = build_eval_backbone(arch)
        timm_model = TimmConvNeXt(depths=depths, dims=dims, num_classes=0, ls_init_value=None)
    ours = {_vicregl_to_timm_key(k): v.shape for k, v in model.state_dict().items()}
    assert ours == {k: v.shape for k, v in timm_model.state_dict().items()}
    assert model.embed_dim == dims[-1] and model.patch_size == 32
    assert not any(k.endswith("gamma") for k in model.state_dict())  # VICRegL trains without layer scale
    found = detect_architecture(model.state_dict())
    assert (found.family, found.arch, found.loadable) == ("convnext", arch, True)


def test_detection_of_every_arch_and_of_foreign_layouts() -> None:
    for arch in EVAL_ARCHS:
        with torch.device("meta"):
            model = build_eval_backbone(arch, patch_size=8 if arch == "vit_base" else 16)
        found = detect_architecture(model.state_dict())
        assert found.arch == arch and found.loadable, arch
        if arch.startswith("vit"):
            assert found.patch_size == (8 if arch == "vit_base" else 16)
    with torch.device("meta"):
        timm_convnext = TimmConvNeXt(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), num_classes=0)
        resnet18 = torchvision.models.resnet18()
    found = detect_architecture(timm_convnext.state_dict())
    assert (found.arch, found.loadable) == ("convnext_small", False) and "timm" in found.description
    found = detect_architecture(resnet18.state_dict())
    assert found.family == "resnet" and found.arch is None
    assert detect_architecture({"weight": torch.zeros(1)}).family == "unknown"


def test_registry_lists_conv_archs_for_evaluation_only() -> None:
    assert CONV_ARCHS == (
        "resnet50",
        "convnext_tiny",
        "convnext_small",
        "convnext_base",
        "convnext_large",
        "convnext_xlarge",
    )
    assert not build_eval_backbone("resnet50").has_attention
    with pytest.raises(ValueError, match="convnext_huge.*resnet50"):
        build_eval_backbone("convnext_huge")
