"""The training state on disk: what a checkpoint holds, restoring it exactly, seeding from a released
checkpoint, and the digest that proves every rank ends with the same state."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from cribo_utils.runtime import distributed
from cribo_utils.train.checkpoint import (
    CheckpointError,
    save_training_checkpoint,
    with_prefix,
    without_prefix,
)
from cribo_utils.train.health import check_finite_weights
from cribo_utils.train.parts import TrainingParts
from models.head import HEAD_BOTTLENECK_DIM, HEAD_HIDDEN_DIM, HEAD_NLAYERS

logger = logging.getLogger(__name__)


def args_as_plain_dict(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` with tuples as lists: what ``args.json`` and the checkpoint's ``args`` hold."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(args).items()}


def checkpoint_state(parts: TrainingParts, epoch: int, iteration: int) -> dict[str, Any]:
    """The plain-data checkpoint dictionary (see :mod:`cribo_utils.train.checkpoint`)."""
    args_dict = args_as_plain_dict(parts.args)
    state = {
        "student": with_prefix(parts.student.state_dict(), "module."),
        "teacher": parts.teacher.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "args": args_dict,
        "dino_loss": {"center": parts.loss.center.cpu(), "center_c": parts.loss.center_c.cpu()},
        "memory_bank_meta": {"num_images": parts.bank.num_images, "step": int(parts.bank.step)},
    }
    state.update({key: value.cpu() for key, value in parts.bank.to_reference_layout().items()})
    if parts.scaler is not None:
        state["fp16_scaler"] = parts.scaler.state_dict()
    return state


# The flags that shape the networks' weights, and the value a checkpoint that stored no such key was trained
# with (None: no assumption, the key is compared only when the checkpoint stored it).
NETWORK_SHAPE_FLAGS: dict[str, Any] = {
    "arch": None,
    "patch_size": None,
    "depth": None,
    "image_size": None,  # the positional embedding is stored for the crop side
    "out_dim": None,
    "out_dim_c": None,
    "use_bn_in_head": None,
    "head_hidden_dim": HEAD_HIDDEN_DIM,
    "head_nlayers": HEAD_NLAYERS,
    "head_bottleneck_dim": HEAD_BOTTLENECK_DIM,
}


def check_same_networks(args: argparse.Namespace, checkpoint: dict[str, Any], path: str) -> None:
    """Refuse to resume ``path`` with flags that build networks of other shapes than it holds.

    Raises:
        CheckpointError: naming each differing flag with the checkpoint's value, the flags to pass to resume
            it (e.g. after an upgrade changed a preset's default) and the alternative of a new output folder.
    """
    stored = checkpoint.get("args") or {}
    if isinstance(stored, argparse.Namespace):  # the reference's checkpoints store a Namespace
        stored = vars(stored)
    differing = []
    for flag, legacy in NETWORK_SHAPE_FLAGS.items():
        if flag not in stored and legacy is None:
            continue
        trained = stored.get(flag, legacy)
        if hasattr(args, flag) and getattr(args, flag) != trained:
            differing.append((flag, trained, getattr(args, flag)))
    if differing:
        asked = ", ".join(f"--{flag} {now}" for flag, _, now in differing)
        fix = " ".join(
            f"--{flag} {str(value).lower() if isinstance(value, bool) else value}"
            for flag, value, _ in differing
        )
        raise CheckpointError(
            f"{path} holds networks trained with other shapes than this command builds ({asked}); "
            f"to resume it, pass {fix}; to start afresh, use a new --output_dir"
        )


def restore_state(parts: TrainingParts, checkpoint: dict[str, Any]) -> tuple[int, int]:
    """Load a full checkpoint into ``parts`` (strict); returns ``(epoch, iteration)`` to continue from."""
    parts.student.load_state_dict(without_prefix(checkpoint["student"], "module."), strict=True)
    parts.teacher.load_state_dict(without_prefix(checkpoint["teacher"], "module."), strict=True)
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.loss.center.copy_(checkpoint["dino_loss"]["center"])
    parts.loss.center_c.copy_(checkpoint["dino_loss"]["center_c"])
    if "centroids_queue_cpu" in checkpoint:
        meta = checkpoint.get("memory_bank_meta", {})
        parts.bank.load_reference_layout(
            {key: checkpoint[key].to(parts.device) for key in ("centroids_queue_cpu", "cpv_queue_cpu")},
            num_images=meta.get("num_images"),
        )
        parts.bank.step.fill_(int(meta.get("step", 0)))
    if parts.scaler is not None and "fp16_scaler" in checkpoint:
        parts.scaler.load_state_dict(checkpoint["fp16_scaler"])
    iteration = int(checkpoint.get("iteration", checkpoint["epoch"] * parts.iters_per_epoch))
    return iteration // parts.iters_per_epoch, iteration


def seed_from_released_checkpoint(parts: TrainingParts, path: str) -> None:
    """``--start_checkpoint_path``: initialise student and teacher from a released full checkpoint."""
    from cribo_utils.weights.checkpoint_formats import load_checkpoint_file

    checkpoint = load_checkpoint_file(path)
    for name, network in (("student", parts.student), ("teacher", parts.teacher)):
        if name not in checkpoint:
            raise SystemExit(
                f"--start_checkpoint_path {path}: no '{name}' entry (keys: {sorted(checkpoint)})"
            )
        network.load_state_dict(without_prefix(checkpoint[name], "module."), strict=True)
    if "dino_loss" in checkpoint:
        parts.loss.center.copy_(checkpoint["dino_loss"]["center"])
        parts.loss.center_c.copy_(checkpoint["dino_loss"]["center_c"])
    logger.info("initialised student and teacher from %s", path)


def load_initial_backbones(parts: TrainingParts, path: str) -> None:
    """``--init_backbone``: load one backbone checkpoint (any layout the evaluations read) into the student's
    and the teacher's backbones, strictly; heads, centres, bank and optimiser keep their fresh state."""
    from cribo_utils.weights.checkpoint_formats import load_backbone
    from cribo_utils.weights.errors import CheckpointFormatError

    try:
        load_backbone(parts.student.backbone, path)  # read once (a name or URL is fetched once)
    except FileNotFoundError as error:
        raise CheckpointFormatError(f"--init_backbone {path}: {error}") from error
    parts.teacher.backbone.load_state_dict(parts.student.backbone.state_dict(), strict=True)
    logger.info("initialised the student's and the teacher's backbones from %s", path)


def state_digest(parts: TrainingParts) -> dict[str, str]:
    """SHA-256 of the teacher weights, the loss centres and the memory bank: equal on every rank after
    a correct data-parallel run (logged by every rank at the end of training)."""
    import hashlib

    digests = {}
    for name, tensors in (
        ("teacher", parts.teacher.state_dict()),
        ("centres", parts.loss.state_dict()),
        ("memory_bank", parts.bank.to_reference_layout()),
    ):
        sha = hashlib.sha256()
        for key in sorted(tensors):
            sha.update(key.encode())
            sha.update(tensors[key].detach().cpu().contiguous().numpy().tobytes())
        digests[name] = sha.hexdigest()[:16]
    return digests


def save(parts: TrainingParts, epoch: int, iteration: int, epoch_copy: int | None = None) -> None:
    check_finite_weights(parts, iteration)
    if distributed.is_main_process():
        save_training_checkpoint(checkpoint_state(parts, epoch, iteration), parts.args.output_dir, epoch_copy)
    distributed.barrier()
