"""The linear probe's checkpoint: what it records, reading it back, and whether a rerun may resume from it.

``eval_linear.py`` writes ``<output_dir>/eval_linear_<dataset>_checkpoint.pth`` atomically after every epoch
(:func:`cribo_utils.train.checkpoint.atomic_save`) with DINO's keys (``epoch`` = the next epoch to run,
``state_dict``, ``optimizer``, ``scheduler``, ``best_acc``) plus the epoch ``history`` and the ``settings``
that produced it. Rerunning the same command resumes after the last completed epoch; a checkpoint of other
settings is refused with the differing flags named, never silently continued or overwritten. Every entry is
a tensor, a number, a string or a list / dict of them, so the file loads with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from cribo_utils.eval.cli import EvalConfigError

#: Settings that define the features and the classifier's shape (an ``--evaluate`` run must match them).
FEATURE_SETTINGS = (
    "pretrained_weights",
    "checkpoint_key",
    "arch",
    "patch_size",
    "dataset",
    "data_path",
    "image_size",
    "n_last_blocks",
    "avgpool_patchtokens",
    "num_labels",
)
#: Settings that also define the training (a resumed run must match them too).
TRAINING_SETTINGS = (
    "epochs",
    "base_lr",
    "lr",
    "batch_size_per_gpu",
    "world_size",
    "train_aug",
    "cache_features",
    "seed",
    "val_freq",
)
_STATE_KEYS = ("epoch", "state_dict", "optimizer", "scheduler", "history", "settings")


def probe_settings(
    args: argparse.Namespace,
    train_aug: bool,
    cache_features: bool,
    lr: float,
    num_labels: int,
) -> dict[str, Any]:
    """Everything that defines a probe run (recorded in the checkpoint and the results JSON; the caller adds
    ``feature_dim`` once the features exist)."""
    from cribo_utils.eval.features import resolve_image_sizes
    from cribo_utils.runtime import distributed

    world_size = distributed.get_world_size()
    return {
        "pretrained_weights": args.pretrained_weights,
        "checkpoint_key": args.checkpoint_key,
        "arch": args.arch,
        "patch_size": args.patch_size,
        "dataset": args.dataset,
        "data_path": args.data_path if args.dataset != "synthetic" else None,
        "image_size": resolve_image_sizes(args)[1],
        "n_last_blocks": args.n_last_blocks,
        "avgpool_patchtokens": args.avgpool_patchtokens,
        "num_labels": num_labels,
        "epochs": args.epochs,
        "base_lr": args.lr,
        "lr": lr,
        "batch_size_per_gpu": args.batch_size_per_gpu,
        "world_size": world_size,
        "global_batch_size": args.batch_size_per_gpu * world_size,
        "train_aug": train_aug,
        "cache_features": cache_features,
        "seed": args.seed,
        "val_freq": args.val_freq,
    }


def read_probe_checkpoint(path: Path, required: bool) -> dict[str, Any] | None:
    """The probe's checkpoint at ``path``, or None when there is none (and ``required`` is false).

    Raises:
        EvalConfigError: ``required`` (``--evaluate``) and no checkpoint, or a file that is not a probe
            checkpoint (one line naming it).
    """
    if not path.is_file():
        if required:
            raise EvalConfigError(
                f"--evaluate needs a trained probe, but {path} does not exist; run the same command without "
                "--evaluate first (or point --output_dir at the folder that holds it)"
            )
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (any unreadable file gets the same one-line answer)
        raise EvalConfigError(
            f"{path} cannot be read as a linear-probe checkpoint ({error}); delete it"
        ) from None
    missing = [key for key in _STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise EvalConfigError(f"{path} is not a linear-probe checkpoint (no {', '.join(missing)}); delete it")
    return state


def check_resumable(
    state: dict[str, Any], settings: dict[str, Any], path: Path, evaluate_only: bool = False
) -> None:
    """Refuse a checkpoint written with other settings than this run's, naming every difference.

    Args:
        state: from :func:`read_probe_checkpoint`.
        settings: this run's :func:`probe_settings`.
        path: the checkpoint (for the message).
        evaluate_only: compare only :data:`FEATURE_SETTINGS` (``--evaluate`` trains nothing).
    Raises:
        EvalConfigError: the differing settings, and how to start afresh.
    """
    keys = FEATURE_SETTINGS if evaluate_only else FEATURE_SETTINGS + TRAINING_SETTINGS
    recorded = state["settings"]
    differences = [
        f"{key} {recorded.get(key)!r} -> {settings.get(key)!r}"
        for key in keys
        if recorded.get(key) != settings.get(key)
    ]
    if differences:
        raise EvalConfigError(
            f"{path} was written with other settings ({'; '.join(differences)}); rerun with its settings to "
            "resume, or use another --output_dir (or delete the file) to start afresh"
        )
