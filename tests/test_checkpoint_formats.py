"""Checkpoint loading for every layout: ours, released CrIBo, DINO, iBOT and CrOC files.

Each test writes a real ``.pth`` file with the key layout of that format (random vit_tiny weights, 2 blocks,
32 px) and checks the loaded backbone computes exactly what the original network computes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor

from cribo_utils.weights import checkpoint_formats as cf
from models import build_backbone
from models.head import CrIBoHead
from models.student_teacher import CrIBoNetwork

IMG = 32
DEPTH = 2


@dataclasses.dataclass
class _ArbitraryPayload:
    """A class torch's weights-only unpickler must refuse (importable, so the full unpickler would not)."""

    value: int = 3


def _network(seed: int) -> CrIBoNetwork:
    torch.manual_seed(seed)
    backbone = build_backbone("vit_tiny", patch_size=16, img_size=IMG, depth=DEPTH)
    head = CrIBoHead(192, 64, 64, hidden_dim=32, bottleneck_dim=16)
    return CrIBoNetwork(backbone, head)


def _prefixed(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + key: value.clone() for key, value in state_dict.items()}


@pytest.fixture(scope="module")
def networks() -> dict[str, CrIBoNetwork]:
    """Teacher and student with different weights, so picking the wrong one is detected."""
    return {"teacher": _network(1), "student": _network(2)}


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


def _reference_output(network: CrIBoNetwork, images: Tensor) -> tuple[Tensor, Tensor]:
    backbone = network.backbone.eval()
    with torch.no_grad():
        return backbone.forward_features(images)


def _layouts(networks: dict[str, CrIBoNetwork]) -> dict[str, dict]:
    """name -> checkpoint object, with the real top-level and per-network key layouts."""
    teacher = networks["teacher"].state_dict()
    student = networks["student"].state_dict()
    teacher_backbone = networks["teacher"].backbone.state_dict()
    released_args = argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64, pos_alpha=[1.0, 1.0])
    queues = {
        "centroids_queue_cpu": torch.randn(2, 8, 192),
        "cls_queue_cpu": torch.randn(4, 192),
        "cpv_queue_cpu": torch.zeros(4, dtype=torch.long),
    }
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    ibot_student = dict(
        _prefixed(student, "module."), **{"module.backbone.masked_embed": torch.zeros(1, 192)}
    )
    return {
        "ours": {
            "student": _prefixed(student, "module."),
            "teacher": _prefixed(teacher, ""),
            "optimizer": optimizer,
            "epoch": 3,
            "iteration": 30,
            "args": {"arch": "vit_tiny", "patch_size": 16, "depth": DEPTH},
            "dino_loss": {"center": torch.zeros(1, 64), "center_c": torch.zeros(1, 64)},
            "format_version": 1,
        },
        "cribo_released": {
            "student": _prefixed(student, "module."),
            "teacher": _prefixed(teacher, ""),
            "optimizer": optimizer,
            "epoch": 800,
            "args": released_args,
            "dino_loss": {"center": torch.zeros(1, 64), "center_c": torch.zeros(1, 64)},
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
            **queues,
        },
        # DDP-wrapped teacher (the reference wraps the teacher when the model has batch norm).
        "cribo_teacher_module": {
            "student": _prefixed(student, "module."),
            "teacher": _prefixed(teacher, "module."),
        },
        "dino_bare": _prefixed(teacher_backbone, ""),
        "dino_bare_module": _prefixed(teacher_backbone, "module."),
        "ibot_state_dict": {"state_dict": _prefixed(teacher_backbone, "")},
        "ibot_state_dict_prefixed": {
            "state_dict": dict(
                _prefixed(teacher, "module."), **{"module.backbone.masked_embed": torch.ones(1, 192)}
            )
        },
        "ibot_full": {
            "student": ibot_student,
            "teacher": _prefixed(teacher, ""),
            "optimizer": optimizer,
            "epoch": 100,
            "args": released_args,
            "ibot_loss": {"center": torch.zeros(1, 64), "center2": torch.zeros(1, 1, 64)},
        },
        "croc_full": {
            "student": _prefixed(student, "module."),
            "teacher": _prefixed(teacher, ""),
            "optimizer": optimizer,
            "epoch": 300,
            "args": released_args,
            "croc_loss": {"center": torch.zeros(1, 64)},
        },
    }


LAYOUT_NAMES = [
    "ours",
    "cribo_released",
    "cribo_teacher_module",
    "dino_bare",
    "dino_bare_module",
    "ibot_state_dict",
    "ibot_state_dict_prefixed",
    "ibot_full",
    "croc_full",
]
HAS_STUDENT = {"ours", "cribo_released", "cribo_teacher_module", "ibot_full", "croc_full"}


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_every_layout_gives_the_original_backbone(layout, networks, images, tmp_path):
    path = tmp_path / f"{layout}.pth"
    torch.save(_layouts(networks)[layout], path)
    keys = ["teacher", "student"] if layout in HAS_STUDENT else ["teacher"]
    for key in keys:
        model = cf.build_pretrained_backbone("vit_tiny", 16, weights=path, checkpoint_key=key)
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert model.depth == DEPTH and model.pos_embed.shape == (1, 1 + (IMG // 16) ** 2, 192)
        with torch.no_grad():
            cls, patches = model.forward_features(images)
        ref_cls, ref_patches = _reference_output(networks[key], images)
        assert torch.equal(cls, ref_cls) and torch.equal(patches, ref_patches), (layout, key)
        # load_backbone into an existing model gives the same weights.
        target = build_backbone("vit_tiny", patch_size=16, img_size=IMG, depth=DEPTH)
        cf.load_backbone(target, path, checkpoint_key=key)
        expected = networks[key].backbone.state_dict()
        assert all(torch.equal(value, expected[name]) for name, value in target.state_dict().items())


def test_teacher_and_student_are_told_apart(networks, images, tmp_path):
    path = tmp_path / "ours.pth"
    torch.save(_layouts(networks)["ours"], path)
    teacher = cf.build_pretrained_backbone("vit_tiny", 16, weights=path, checkpoint_key="teacher")
    student = cf.build_pretrained_backbone("vit_tiny", 16, weights=path, checkpoint_key="student")
    with torch.no_grad():
        assert not torch.allclose(teacher(images), student(images))


def test_detect_format(networks):
    layouts = _layouts(networks)
    assert cf.detect_checkpoint_format(layouts["ours"]) == "repo"
    assert cf.detect_checkpoint_format(layouts["cribo_released"]) == "full"
    assert cf.detect_checkpoint_format(layouts["croc_full"]) == "full"
    assert cf.detect_checkpoint_format(layouts["dino_bare"]) == "bare"
    assert cf.detect_checkpoint_format(layouts["ibot_state_dict"]) == "state_dict"
    with pytest.raises(cf.CheckpointFormatError, match="model_ema"):
        cf.detect_checkpoint_format({"model_ema": {"a": 1}, "epoch": 3})


def test_prefixes_are_stripped_per_key_and_only_when_leading():
    value = torch.zeros(1)
    state = {
        "module.backbone.blocks.0.attn.backbone.scale": value,
        "backbone.norm.module.weight": value,
        "cls_token": value,
        "module.pos_embed": value,
        "backbone.module.patch_embed.proj.weight": value,
        "module.head.mlp.0.weight": value,
        "head.last_layer.weight_g": value,
        "module.backbone.masked_embed": value,
        "my_head.weight": value,
    }
    stripped, dropped = cf.strip_backbone_prefixes(state)
    assert sorted(stripped) == sorted(
        [
            "blocks.0.attn.backbone.scale",
            "norm.module.weight",
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "my_head.weight",
        ]
    )
    assert sorted(dropped) == sorted(
        ["module.head.mlp.0.weight", "head.last_layer.weight_g", "module.backbone.masked_embed"]
    )


def test_colliding_keys_are_an_error():
    with pytest.raises(cf.CheckpointFormatError, match="both map to backbone key 'norm.weight'"):
        cf.strip_backbone_prefixes({"backbone.norm.weight": torch.zeros(1), "norm.weight": torch.zeros(1)})


def test_strict_mismatch_lists_missing_unexpected_and_format(networks, tmp_path):
    state = _prefixed(networks["teacher"].state_dict(), "")
    del state["backbone.norm.bias"]
    state["backbone.extra_token"] = torch.zeros(1, 1, 192)
    path = tmp_path / "broken.pth"
    torch.save({"teacher": state, "student": state}, path)
    with pytest.raises(cf.CheckpointFormatError) as info:
        cf.build_pretrained_backbone("vit_tiny", 16, weights=path)
    message = str(info.value)
    assert "1 missing keys [norm.bias]" in message
    assert "1 unexpected keys [extra_token]" in message
    assert "full student/teacher checkpoint" in message and "'teacher'" in message
    assert str(path) in message


def test_wrong_arch_names_the_arch_the_shapes_fit(networks, tmp_path):
    path = tmp_path / "tiny_bare.pth"
    torch.save(networks["teacher"].backbone.state_dict(), path)
    with pytest.raises(cf.CheckpointFormatError) as info:
        cf.build_pretrained_backbone("vit_small", 16, weights=path)
    message = str(info.value)
    assert "holds a ViT-Tiny/16 backbone, but --arch vit_small was requested" in message
    assert "--arch vit_tiny --patch_size 16" in message and "bare backbone state dict" in message
    assert "\n" not in message and "missing keys" not in message
    with pytest.raises(cf.CheckpointFormatError, match="pass --patch_size 16"):
        cf.build_pretrained_backbone("vit_tiny", 8, weights=path)


def test_shape_mismatch_is_listed_with_a_hint(networks, tmp_path):
    state = networks["teacher"].backbone.state_dict()
    state["norm.weight"] = torch.ones(7)
    path = tmp_path / "tiny_bare.pth"
    torch.save(state, path)
    with pytest.raises(cf.CheckpointFormatError) as info:
        cf.build_pretrained_backbone("vit_tiny", 16, weights=path)
    message = str(info.value)
    assert "norm.weight: checkpoint (7,) vs model (192,)" in message
    assert "--arch" in message and "bare backbone state dict" in message


def test_recorded_arch_mismatch_names_the_flag(networks, tmp_path):
    path = tmp_path / "released.pth"
    torch.save(_layouts(networks)["cribo_released"], path)
    with pytest.raises(cf.CheckpointFormatError, match="pass --arch vit_tiny"):
        cf.build_pretrained_backbone("vit_small", 16, weights=path)
    with pytest.raises(cf.CheckpointFormatError, match="pass --patch_size 16"):
        cf.build_pretrained_backbone("vit_tiny", 8, weights=path)


def test_missing_checkpoint_key_lists_the_networks(networks, tmp_path):
    path = tmp_path / "released.pth"
    torch.save(_layouts(networks)["cribo_released"], path)
    with pytest.raises(cf.CheckpointFormatError, match=r"no entry 'ema'.*\['student', 'teacher'\]"):
        cf.build_pretrained_backbone("vit_tiny", 16, weights=path, checkpoint_key="ema")


def test_namespace_is_allowed_and_nothing_else(tmp_path):
    allowed = tmp_path / "namespace.pth"
    torch.save({"args": argparse.Namespace(arch="vit_small", lr=5e-4), "x": torch.ones(2)}, allowed)
    loaded = cf.load_checkpoint_file(allowed)
    assert loaded["args"].arch == "vit_small" and torch.equal(loaded["x"], torch.ones(2))

    refused = tmp_path / "payload.pth"
    torch.save({"args": _ArbitraryPayload(), "x": torch.ones(2)}, refused)
    # The file itself is fine: the full unpickler reads it, so the refusal below comes from the allowlist.
    assert torch.load(refused, weights_only=False)["args"].value == 3
    with pytest.raises(cf.CheckpointFormatError, match="refused to load checkpoint") as info:
        cf.load_checkpoint_file(refused)
    assert str(refused) in str(info.value) and "_ArbitraryPayload" in str(info.value)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        cf.load_checkpoint_file(missing)
    good = tmp_path / "good.pth"
    torch.save({"a": torch.ones(3)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    for path in (truncated, empty, garbage):
        with pytest.raises(cf.CheckpointFormatError) as info:
            cf.load_checkpoint_file(path)
        assert str(path) in str(info.value)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.ones(1)], not_a_dict)
    with pytest.raises(cf.CheckpointFormatError, match="holds a list"):
        cf.load_checkpoint_file(not_a_dict)


def test_random_initialisation_is_logged_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="cribo_utils.weights.checkpoint_formats"):
        model = cf.build_pretrained_backbone("vit_tiny", 16, weights=None)
    assert "RANDOM INITIALISATION" in caplog.text
    assert not model.training and model.pos_embed.shape == (1, 197, 192)


def test_files_written_by_the_training_checkpointer_load(networks, images, tmp_path):
    """Our own training files contain plain data only: a plain weights_only load works, and so does ours."""
    from cribo_utils.train.checkpoint import TEACHER_NAME, save_training_checkpoint

    state = {key: value for key, value in _layouts(networks)["ours"].items() if key != "format_version"}
    checkpoint_path = Path(save_training_checkpoint(state, str(tmp_path)))
    for path in (checkpoint_path, tmp_path / TEACHER_NAME):
        torch.load(path, map_location="cpu", weights_only=True)
        model = cf.build_pretrained_backbone("vit_tiny", 16, weights=path)
        with torch.no_grad():
            assert torch.equal(model(images), _reference_output(networks["teacher"], images)[0])
    assert cf.detect_checkpoint_format(cf.load_checkpoint_file(checkpoint_path)) == "repo"


def test_load_released_model_names(networks, tmp_path):
    with pytest.raises(ValueError, match="cribo_vits16_in"):
        cf.load_released_model("cribo_vits8_in", None)
    path = tmp_path / "bare.pth"
    torch.save(networks["teacher"].backbone.state_dict(), path)
    with pytest.raises(cf.CheckpointFormatError, match="pass --arch vit_tiny"):
        cf.load_released_model("cribo_vits16_in", path)


def test_image_size_and_depth_are_read_from_the_weights():
    state = {"pos_embed": torch.zeros(1, 1 + 36, 8), "blocks.0.norm1.weight": torch.zeros(8)}
    state["blocks.5.norm1.weight"] = torch.zeros(8)
    assert cf.checkpoint_image_size(state, 16) == 96
    assert cf.checkpoint_depth(state) == 6
    assert cf.checkpoint_image_size({"pos_embed": torch.zeros(1, 1 + 12, 8)}, 16) == 224
    assert cf.checkpoint_depth({"cls_token": torch.zeros(1)}) is None


# --------------------------------------------------------------------------------------------------------
# --arch / --patch_size read from the checkpoint
# --------------------------------------------------------------------------------------------------------


def test_architecture_is_read_from_recorded_args_then_from_the_shapes(networks, tmp_path):
    recorded = tmp_path / "released.pth"  # records args: arch vit_tiny, patch_size 16
    torch.save(_layouts(networks)["cribo_released"], recorded)
    assert cf.resolve_architecture(recorded) == ("vit_tiny", 16)
    torch.manual_seed(0)
    bare = tmp_path / "bare.pth"  # records nothing: the shapes say ViT-Small/8
    torch.save(build_backbone("vit_small", patch_size=8, img_size=IMG, depth=DEPTH).state_dict(), bare)
    assert cf.resolve_architecture(bare) == ("vit_small", 8)
    assert cf.resolve_architecture(bare, patch_size=8) == ("vit_small", 8)
    assert cf.resolve_architecture(bare, arch="vit_base", patch_size=4) == ("vit_base", 4)  # explicit wins
    assert cf.resolve_architecture(None) == ("vit_small", 16)  # random init: DINO's defaults
    assert cf.resolve_architecture(None, arch="resnet50") == ("resnet50", 16)


def test_args_json_next_to_weights_only_files_is_read(tmp_path):
    import json

    torch.manual_seed(0)
    weights = tmp_path / "teacher_backbone.pth"
    torch.save(build_backbone("vit_tiny", patch_size=16, img_size=IMG, depth=DEPTH).state_dict(), weights)
    assert cf.stored_training_args(cf.load_checkpoint_file(weights), weights) == {}
    (tmp_path / "args.json").write_text(json.dumps({"arch": "vit_tiny", "patch_size": 16, "image_size": 96}))
    stored = cf.stored_training_args(cf.load_checkpoint_file(weights), weights)
    assert stored["image_size"] == 96 and stored["arch"] == "vit_tiny"


def test_unknown_architecture_asks_for_the_flag_naming_the_file(tmp_path):
    path = tmp_path / "mystery.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3), "encoder.bias": torch.zeros(3)}, path)
    with pytest.raises(cf.CheckpointFormatError) as error:
        cf.resolve_architecture(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "pass --arch" in message


def test_eval_flags_left_unset_are_filled_from_the_checkpoint(networks, tmp_path):
    parser = cf.add_backbone_args(argparse.ArgumentParser())
    path = tmp_path / "released.pth"
    torch.save(_layouts(networks)["cribo_released"], path)
    args = cf.resolve_backbone_args(parser.parse_args(["--pretrained_weights", str(path)]))
    assert (args.arch, args.patch_size) == ("vit_tiny", 16)
    backbone = cf.backbone_from_args(parser.parse_args(["--pretrained_weights", str(path)]))
    assert backbone.embed_dim == 192 and len(backbone.blocks) == DEPTH


def test_mapped_read_for_the_architecture_matches_the_full_read_in_both_file_formats(tmp_path):
    torch.manual_seed(0)
    state = build_backbone("vit_tiny", patch_size=8, img_size=IMG, depth=DEPTH).state_dict()
    zipped, legacy = tmp_path / "zip.pth", tmp_path / "legacy.pth"
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)  # torch cannot map this format
    for path in (zipped, legacy):
        mapped, read = cf.load_checkpoint_file(path, mmap=True), cf.load_checkpoint_file(path)
        assert mapped.keys() == read.keys() and all(torch.equal(mapped[k], read[k]) for k in read)
        assert cf.resolve_architecture(path) == ("vit_tiny", 8)
