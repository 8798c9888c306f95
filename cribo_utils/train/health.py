"""Stop before a NaN spreads: the finite-loss check of every step and the finite-weights check of every
checkpoint, with one message that says what to try."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from cribo_utils.runtime import distributed

if TYPE_CHECKING:
    from cribo_utils.train.parts import TrainingParts


class NonFiniteLossError(RuntimeError):
    """The loss (or, at a checkpoint, a weight) became NaN or infinite; the last good checkpoint is kept."""


NON_FINITE_HINT = (
    "The last good checkpoint is kept. Try a lower --lr, --clip_grad 0.3, --norm_last_layer true "
    "or --precision fp32, then rerun to resume from it."
)


def check_finite_loss(
    parts: TrainingParts, losses: Mapping[str, torch.Tensor | float], iteration: int, epoch: int
) -> None:
    """Stop every rank together, before the backward pass, when any rank's loss is NaN or infinite.

    Args:
        parts: the training parts (world size, device).
        losses: the loss terms, ``"loss"`` among them, as tensors or as values already read back.
        iteration: the iteration, for the message.
        epoch: the epoch, for the message.
    Raises:
        NonFiniteLossError: naming the iteration, this rank's loss terms and a hint.
    """
    values = {
        key: float(value.detach()) if isinstance(value, torch.Tensor) else value
        for key, value in losses.items()
    }
    bad = 0.0 if math.isfinite(values["loss"]) else 1.0
    if parts.env.world_size > 1:  # so that no rank waits in the gradient all-reduce for one that stopped
        bad = distributed.all_reduce_sum(torch.tensor([bad], device=parts.device)).item()
    if bad > 0:
        terms = ", ".join(f"{key} {value:.4g}" for key, value in values.items())
        world_size = parts.env.world_size
        where = f" on {int(bad)} of {world_size} processes" if world_size > 1 else ""
        raise NonFiniteLossError(
            f"non-finite loss at iteration {iteration} (epoch {epoch}){where}: {terms}. " + NON_FINITE_HINT
        )


def check_finite_weights(parts: TrainingParts, iteration: int) -> None:
    """Refuse to checkpoint non-finite weights (an update can overflow even when the loss was finite).

    Raises:
        NonFiniteLossError: naming the iteration and the first non-finite parameter.
    """
    for name, tensor in (*parts.student.named_parameters(), *parts.teacher.named_parameters()):
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteLossError(
                f"non-finite weights after iteration {iteration} ({name}); the "
                "checkpoint is not written. " + NON_FINITE_HINT
            )
