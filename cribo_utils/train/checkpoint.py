"""Training checkpoints: atomic writes with a backup, exact resume, and clear errors.

Layout (top-level keys as in the released CrIBo checkpoints, plus ``format_version``, ``iteration``):

``student`` (keys ``module.backbone.*`` / ``module.head.*``), ``teacher`` (``backbone.*`` / ``head.*``),
``optimizer``, ``epoch`` (the epoch the next iteration belongs to), ``iteration`` (the next global
iteration), ``args`` (a plain dict, never a Namespace), ``dino_loss`` (``center``, ``center_c``),
``centroids_queue_cpu`` / ``cpv_queue_cpu`` (the memory bank in the reference layout), ``fp16_scaler``
(when a grad scaler is used). Every value is plain data, so ``torch.load(weights_only=True)`` reads it.

A write goes to a temporary file in the same directory, is flushed to disk, then the previous
``checkpoint.pth`` becomes ``checkpoint.pth.backup`` and the new file is renamed into place. A crash at
any point leaves at least one complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pth"
BACKUP_SUFFIX = ".backup"
TEACHER_NAME = "teacher_backbone.pth"
REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "dino_loss")


class CheckpointError(RuntimeError):
    """A checkpoint (and its backup) cannot be used to resume."""


def atomic_save(obj: Any, path: str, keep_backup: bool = False) -> None:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename).

    With ``keep_backup`` an existing ``path`` is first renamed to ``path + '.backup'``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_backup and os.path.exists(path):
            os.replace(path, path + BACKUP_SUFFIX)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def with_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Add ``prefix`` to every key that does not already start with it (the student's ``module.``)."""
    return {key if key.startswith(prefix) else prefix + key: value for key, value in state_dict.items()}


def without_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Remove a leading ``prefix`` from each key that has it (per key, never in the middle)."""
    return {key[len(prefix) :] if key.startswith(prefix) else key: value for key, value in state_dict.items()}


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load one training checkpoint with ``weights_only=True`` and check its top-level keys.

    Raises:
        CheckpointError: unreadable, truncated or incomplete file (the message names the file).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (a {type(checkpoint).__name__})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a full training checkpoint, missing {', '.join(missing)}")
    return checkpoint


def find_resume_checkpoint(output_dir: str) -> tuple[dict[str, Any], str] | None:
    """The checkpoint to resume from: ``checkpoint.pth``, else its backup; ``None`` for a fresh run.

    Raises:
        CheckpointError: a checkpoint exists but neither it nor the backup can be read. Training never
            silently restarts from scratch over a damaged run.
    """
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    backup = path + BACKUP_SUFFIX
    candidates = [p for p in (path, backup) if os.path.exists(p)]
    if not candidates:
        return None
    errors = []
    for candidate in candidates:
        try:
            checkpoint = read_checkpoint(candidate)
        except CheckpointError as error:
            errors.append(str(error))
            continue
        if errors:
            logger.warning(
                "%s is damaged (%s); resuming from the backup %s instead", path, errors[0], candidate
            )
        elif candidate == backup:
            logger.warning(
                "%s is missing (a save was interrupted); resuming from the backup %s", path, backup
            )
        return checkpoint, candidate
    raise CheckpointError(
        "cannot resume: "
        + "; ".join(errors)
        + f". Move the damaged files out of {output_dir} to start afresh, or restore a checkpoint copy."
    )


def remove_stale_temporary_files(output_dir: str) -> list[str]:
    """Delete ``*.tmp.<pid>`` files left in ``output_dir`` by a writer that was killed mid-save.

    A file is stale when no process with its ``<pid>`` is running on this machine (only one process, rank 0,
    writes to an output folder). Returns the removed paths.
    """
    removed: list[str] = []
    if not os.path.isdir(output_dir):
        return removed
    for name in os.listdir(output_dir):
        stem, _, pid = name.rpartition(".tmp.")
        if not stem or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # the writer still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a live process of another user
        path = os.path.join(output_dir, name)
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        logger.warning("removed %s, left by a save that was interrupted", path)
        removed.append(path)
    return removed


def save_training_checkpoint(state: dict[str, Any], output_dir: str, epoch_copy: int | None = None) -> str:
    """Write ``checkpoint.pth`` atomically (previous one kept as ``.backup``), and optionally
    ``checkpoint{epoch:04}.pth`` and the teacher-only ``teacher_backbone.pth`` for evaluation.

    Temporary files of an earlier, interrupted save are removed first (:func:`remove_stale_temporary_files`).
    """
    remove_stale_temporary_files(output_dir)
    state = dict(state, format_version=FORMAT_VERSION)
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    atomic_save(state, path, keep_backup=True)
    teacher_backbone = {
        key[len("backbone.") :]: value
        for key, value in state["teacher"].items()
        if key.startswith("backbone.")
    }
    atomic_save(teacher_backbone, os.path.join(output_dir, TEACHER_NAME))
    if epoch_copy is not None:
        atomic_save(state, os.path.join(output_dir, f"checkpoint{epoch_copy:04}.pth"))
    return path
