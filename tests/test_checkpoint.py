"""Atomic writes, the backup rotation, and resume fallbacks on damaged files."""

import os

import pytest
import torch

from cribo_utils.train.checkpoint import (
    CheckpointError,
    atomic_save,
    find_resume_checkpoint,
    save_training_checkpoint,
    with_prefix,
    without_prefix,
)


def _state(value: float) -> dict:
    return {
        "student": {"module.backbone.w": torch.full((2,), value)},
        "teacher": {"backbone.w": torch.full((2,), value), "head.v": torch.zeros(1)},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": int(value),
        "dino_loss": {"center": torch.zeros(1, 3), "center_c": torch.zeros(1, 3)},
        "args": {"arch": "vit_tiny"},
    }


def test_save_rotates_backup_and_writes_teacher_file(tmp_path):
    save_training_checkpoint(_state(1), str(tmp_path))
    save_training_checkpoint(_state(2), str(tmp_path), epoch_copy=2)
    latest = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    backup = torch.load(tmp_path / "checkpoint.pth.backup", weights_only=True)
    assert latest["epoch"] == 2 and backup["epoch"] == 1 and latest["format_version"] == 1
    assert (tmp_path / "checkpoint0002.pth").exists()
    teacher = torch.load(tmp_path / "teacher_backbone.pth", weights_only=True)
    assert list(teacher) == ["w"]
    assert not [name for name in os.listdir(tmp_path) if ".tmp." in name]


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    atomic_save(_state(1), path)

    def exploding_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError):
        atomic_save(_state(2), path, keep_backup=True)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert not [name for name in os.listdir(tmp_path) if ".tmp." in name]


def test_resume_prefers_latest_then_backup(tmp_path, caplog):
    assert find_resume_checkpoint(str(tmp_path)) is None
    save_training_checkpoint(_state(1), str(tmp_path))
    save_training_checkpoint(_state(2), str(tmp_path))
    checkpoint, path = find_resume_checkpoint(str(tmp_path))
    assert checkpoint["epoch"] == 2 and path.endswith("checkpoint.pth")
    latest = tmp_path / "checkpoint.pth"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated by a crash
    checkpoint, path = find_resume_checkpoint(str(tmp_path))
    assert checkpoint["epoch"] == 1 and path.endswith(".backup")
    assert "checkpoint.pth" in caplog.text and "backup" in caplog.text


def test_missing_latest_uses_backup(tmp_path):
    save_training_checkpoint(_state(1), str(tmp_path))
    save_training_checkpoint(_state(2), str(tmp_path))
    os.remove(tmp_path / "checkpoint.pth")  # killed between the two renames
    checkpoint, _ = find_resume_checkpoint(str(tmp_path))
    assert checkpoint["epoch"] == 1


def test_both_damaged_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    (tmp_path / "checkpoint.pth.backup").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint.pth.backup"):
        find_resume_checkpoint(str(tmp_path))


def test_prefix_helpers_work_per_key():
    state = {"module.a": 1, "b": 2, "x.module.c": 3}
    assert without_prefix(state, "module.") == {"a": 1, "b": 2, "x.module.c": 3}
    assert with_prefix({"a": 1, "module.b": 2}, "module.") == {"module.a": 1, "module.b": 2}
