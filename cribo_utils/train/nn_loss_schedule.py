"""When the cross-image (memory-bank) loss runs: its first iteration, the configurations that would never
reach it, and the start-up and per-epoch lines that say so."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from cribo_utils.method.loss import OBJECTIVES
from cribo_utils.method.memory_bank import CentroidMemoryBank
from cribo_utils.train.parser import ConfigError

if TYPE_CHECKING:
    from cribo_utils.train.parts import TrainingParts


def uses_memory_bank(args: argparse.Namespace) -> bool:
    """Only the full CrIBo objective retrieves neighbours; the ablations (``--objective``) fill no bank."""
    return "loss_nn" in OBJECTIVES[args.objective]


def nn_loss_active(parts: TrainingParts, epoch: int) -> bool:
    """The cross-image loss starts at epoch 1, and only once the bank holds ``queue_size`` real images
    (the bank starts empty: no random vectors are ever retrieved as positives), whenever that is: see
    :func:`nn_loss_start_iteration` for the iteration this gives on a fresh run. Never without a bank."""
    return uses_memory_bank(parts.args) and epoch >= 1 and parts.bank.is_full


def nn_loss_start_iteration(queue_size: int, global_batch: int, iters_per_epoch: int) -> int:
    """Index (0-based) of the first iteration that uses the cross-image loss in a run started afresh.

    Each iteration retrieves before it pushes its ``global_batch`` images, so iteration ``i`` sees a full bank
    once ``i >= ceil(queue_size / global_batch)``; and the loss is off during epoch 0 (as in the reference).
    """
    return max(iters_per_epoch, math.ceil(queue_size / global_batch))


def check_nn_loss_can_start(args: argparse.Namespace, iters_per_epoch: int, world_size: int) -> None:
    """Refuse a ``--queue_size`` that the whole schedule (``--epochs``) never fills before its last iteration.

    The bank must hold ``queue_size`` real images before retrieval starts; a run that pushes fewer would
    train without its cross-image loss, silently. One-epoch runs are left alone: the loss is off in epoch 0
    whatever the bank (:func:`describe_nn_loss_start` says so). ``--max_iters`` only stops a run early (and
    may be raised on resume), so it is not held against the queue.

    Raises:
        ConfigError: naming ``--queue_size``, the images the run pushes and the largest queue that works.
    """
    global_batch = args.batch_size_per_gpu * world_size
    total_iters = args.epochs * iters_per_epoch
    if (
        not uses_memory_bank(args)
        or args.epochs < 2
        or nn_loss_start_iteration(args.queue_size, global_batch, iters_per_epoch) < total_iters
    ):
        return
    before_last = (total_iters - 1) * global_batch
    raise ConfigError(
        f"--queue_size {args.queue_size} is more than the {before_last} images this run pushes into the bank "
        f"before its last iteration ({args.epochs} epochs x {iters_per_epoch} iterations x {global_batch} "
        f"images = {total_iters * global_batch} in all), so the cross-image NN loss, which waits for a full "
        f"bank, would never run; set --queue_size {before_last} or less, or raise --epochs"
    )


def describe_nn_loss_start(
    args: argparse.Namespace, iters_per_epoch: int, world_size: int
) -> tuple[str, bool]:
    """The start-up line saying from which iteration the cross-image loss runs, and whether it runs at all.

    Iterations and epochs are counted from 1 here, as in ``log_iterations.txt`` (``iteration``: iterations
    done) and the per-epoch lines. Returns ``(line, runs)``; ``runs`` is False when this run stops before
    the start.
    """
    global_batch = args.batch_size_per_gpu * world_size
    total_iters = args.epochs * iters_per_epoch
    stop = min(total_iters, args.max_iters) if args.max_iters else total_iters
    fill = math.ceil(args.queue_size / global_batch)
    if not uses_memory_bank(args):
        return f"cross-image NN loss: off, no memory bank (--objective {args.objective})", False
    if args.epochs < 2:
        return (
            "cross-image NN loss: off for the whole run (it starts after the first epoch; --epochs 1)",
            False,
        )
    start = nn_loss_start_iteration(args.queue_size, global_batch, iters_per_epoch)
    line = (
        f"cross-image NN loss: on from iteration {start + 1}/{total_iters} (epoch "
        f"{start // iters_per_epoch + 1}/{args.epochs}): the bank is full after {fill} iteration(s) of "
        f"{global_batch} images (--queue_size {args.queue_size}) and the loss is off in the first epoch"
    )
    if start >= stop:
        return f"{line}; not reached in this run: --max_iters {args.max_iters} stops it before", False
    return line, True


def nn_loss_epoch_status(
    iterations_with_nn: int, iterations: int, epoch: int, bank: CentroidMemoryBank
) -> str:
    """Whether the cross-image loss ran in epoch ``epoch`` (0-based), for the per-epoch log line."""
    if iterations_with_nn == 0:
        reasons = ["the first epoch"] if epoch == 0 else []
        if not bank.is_full:
            reasons.append(f"bank {bank.num_images}/{bank.queue_size} images")
        return f"nn loss off ({'; '.join(reasons)})"
    return f"nn loss on in {iterations_with_nn}/{iterations} iterations"


EPOCH_LINE_KEYS = (
    "loss",
    "loss_img",
    "loss_obj",
    "loss_nn",
    "clusters_per_image",
    "nn_fraction",
    "images_per_s",
)


def epoch_line(
    averages: dict[str, float],
    iterations: int,
    epoch: int,
    bank: CentroidMemoryBank,
    objective: str = "cribo",
) -> str:
    """The per-epoch log line: the main averages, then whether the cross-image loss ran (an ablation
    ``--objective`` without the cross-image term says so instead of naming an empty bank)."""
    values = [f"{key} {value:.4g}" for key, value in averages.items() if key in EPOCH_LINE_KEYS]
    if "loss_nn" not in OBJECTIVES[objective]:
        return " | ".join([*values, f"nn loss off (no memory bank, --objective {objective})"])
    iterations_with_nn = round(averages.get("nn_active", 0.0) * iterations)
    return " | ".join([*values, nn_loss_epoch_status(iterations_with_nn, iterations, epoch, bank)])
