"""Per-iteration and per-epoch schedules (learning rate, weight decay, teacher momentum, temperatures)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """DINO's cosine schedule with a linear warm-up, one value per iteration.

    warm-up: ``linspace(start_warmup_value, base_value, W)`` for the first ``W = warmup_epochs * iters``
    iterations; then, for ``t = 0 .. n-1`` with ``n = epochs * iters - W``,
    ``v_t = final + (base - final) * (1 + cos(pi * t / n)) / 2``
    (so the last value is slightly above ``final``, as in the reference).

    Returns:
        Array of shape ``(epochs * iters_per_epoch,)``.
    """
    total = epochs * iters_per_epoch
    warmup_iters = min(warmup_epochs * iters_per_epoch, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    steps = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def teacher_temperature(warmup_temp: float, final_temp: float, warmup_epochs: int, epoch: int) -> float:
    """Teacher temperature of an epoch: linear warm-up indexed by epoch, then constant.

    ``tau(e) = linspace(warmup_temp, final_temp, warmup_epochs)[e]`` for ``e < warmup_epochs``, else
    ``final_temp`` (so ``final_temp`` is first reached at ``e = warmup_epochs - 1``; ``warmup_epochs = 0``
    means no warm-up; a run shorter than the warm-up simply stops inside it).

    Args:
        warmup_temp: temperature at epoch 0 (0.04).
        final_temp: temperature after the warm-up (0.07).
        warmup_epochs: W_e (30, or 50 for ViT-B).
        epoch: e >= 0.

    Returns:
        tau(e).
    """
    if epoch < 0:
        raise ValueError(f"teacher_temperature: epoch must be >= 0, got {epoch}.")
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_temp, final_temp, warmup_epochs)[epoch])
    return float(final_temp)
