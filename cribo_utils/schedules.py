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


def teacher_temperature(epoch: int, warmup_value: float, final_value: float, warmup_epochs: int) -> float:
    """Teacher temperature of epoch ``e``: ``linspace(warmup, final, W)[e]`` for ``e < W``, else ``final``."""
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_value, final_value, warmup_epochs)[epoch])
    return float(final_value)
