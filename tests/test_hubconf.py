"""hubconf.py through torch.hub.load(source="local"), with a ViT-S/16-shaped released-layout checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

from cribo_utils.weights.checkpoint_formats import RELEASED_MODELS, CheckpointFormatError
from models import build_backbone

REPO_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def released_vits16(tmp_path_factory):
    """A released-layout file: teacher ``backbone.*`` + ``head.*``, DDP student, Namespace args."""
    torch.manual_seed(0)
    teacher = build_backbone("vit_small", patch_size=16)
    student = build_backbone("vit_small", patch_size=16)
    head = {"head.mlp.0.weight": torch.zeros(8, 384), "head.last_layer.weight_g": torch.ones(8, 1)}
    checkpoint = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "epoch": 800,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, n_tokens=32),
    }
    path = tmp_path_factory.mktemp("released") / "vits16-in.pth"
    torch.save(checkpoint, path)
    return path, teacher.eval(), student.eval()


def test_entry_points_are_listed():
    import hubconf

    entry_points = sorted(
        name for name, value in vars(hubconf).items() if callable(value) and not name.startswith("_")
    )
    assert entry_points == sorted(RELEASED_MODELS)
    dinov2_names = {f"dinov2_vit{size}14{reg}" for size in "sblg" for reg in ("", "_reg")}
    assert {"cribo_vitb16_in", "dino_resnet50", "ibot_vitl16", "vicregl_convnext_xlarge_alpha0p75"} <= set(
        entry_points
    )
    assert dinov2_names <= set(entry_points)
    assert hubconf.dependencies == ["torch", "torchvision", "einops"]
    assert "ViT-S/14" in hubconf.dinov2_vits14.__doc__ and hubconf.dinov2_vits14.__name__ == "dinov2_vits14"


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_hub_load_gives_the_checkpoint_backbone(released_vits16, key):
    path, teacher, student = released_vits16
    model = torch.hub.load(REPO_DIR, "cribo_vits16_in", source="local", weights=str(path), checkpoint_key=key)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = teacher if key == "teacher" else student
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    assert not model.training and model.embed_dim == 384


def test_hub_load_refuses_the_wrong_architecture(released_vits16):
    path, _, _ = released_vits16
    with pytest.raises(CheckpointFormatError, match="pass --arch vit_small"):
        torch.hub.load(REPO_DIR, "cribo_vitb16_in", source="local", weights=str(path))


def test_hub_load_without_pretrained_is_random_and_warned(caplog):
    with caplog.at_level(logging.WARNING):
        model = torch.hub.load(REPO_DIR, "cribo_vits16_coco", source="local", pretrained=False)
    assert "RANDOM INITIALISATION" in caplog.text and "pretrained=False" in caplog.text
    assert model.embed_dim == 384
