"""SLURM preemption: SIGTERM / SIGUSR1 are recorded, every rank agrees to stop at the next iteration
boundary, a checkpoint is written and the process exits with :data:`EXIT_PREEMPTED` to be requeued."""

from __future__ import annotations

import signal
from typing import Any

import torch

from cribo_utils.runtime import distributed

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written on SIGTERM/SIGUSR1; requeue and resume.

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def install_preemption_handlers(stop_signal: list[int]) -> dict[int, Any]:
    """SIGTERM / SIGUSR1 (SLURM sends them before the time limit or on preemption) are recorded in
    ``stop_signal``; the loop then writes a checkpoint at the next iteration boundary and exits with
    :data:`EXIT_PREEMPTED`. Returns the previous handlers (for :func:`restore_signal_handlers`)."""

    def handler(signum: int, _frame: Any) -> None:
        stop_signal.append(signum)

    previous: dict[int, Any] = {}
    for signum in PREEMPTION_SIGNALS:
        previous[signum] = signal.signal(signum, handler)
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers that :func:`install_preemption_handlers` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class Preempted(Exception):
    """Raised by the epoch loop once the preemption checkpoint is written; ends the run with
    :data:`EXIT_PREEMPTED`.

    Attributes:
        iteration: iterations done (the checkpoint's, where the requeued job resumes).
        signal_name: the first preemption signal this process received ("(on another rank)" when only
            another rank received one).
    """

    def __init__(self, iteration: int, stop_signal: list[int]) -> None:
        self.iteration = iteration
        self.signal_name = signal.Signals(stop_signal[0]).name if stop_signal else "(on another rank)"
        super().__init__(f"preempted by {self.signal_name} after iteration {iteration}")


def stop_requested(stop_signal: list[int], world_size: int, device: torch.device) -> bool:
    """True on every rank if any rank received a preemption signal (an all-reduce when ``world_size > 1``)."""
    flag = torch.tensor([1.0 if stop_signal else 0.0])
    if world_size > 1:
        flag = flag.to(device)
        distributed.all_reduce_sum(flag)
    return bool(flag.item() > 0)
