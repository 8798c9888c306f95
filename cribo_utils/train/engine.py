"""The CrIBo training loop: builds the parts, resumes, runs the epochs and checkpoints; the only place that
decides the order of things (one step: :mod:`cribo_utils.train.step`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
from torch import nn

from cribo_utils.method.loss import CrIBoLoss
from cribo_utils.method.memory_bank import CentroidMemoryBank
from cribo_utils.method.schedules import cosine_schedule
from cribo_utils.runtime import distributed
from cribo_utils.runtime.logger import EPOCH_LOG, ITERATION_LOG, MetricLogger, TrainingLogs, setup_logging
from cribo_utils.runtime.progress import Progress, format_seconds
from cribo_utils.train.checkpoint import CheckpointError, find_resume_checkpoint
from cribo_utils.train.compilation import compile_backbones
from cribo_utils.train.flag_configs import network_config, run_shape
from cribo_utils.train.health import NonFiniteLossError
from cribo_utils.train.loader import build_pretrain_loader
from cribo_utils.train.nn_loss_schedule import (
    check_nn_loss_can_start,
    describe_nn_loss_start,
    epoch_line,
    uses_memory_bank,
)
from cribo_utils.train.optim import build_optimizer, get_params_groups
from cribo_utils.train.parser import check_output_dir, describe_preset, release_batch_note, validate_args
from cribo_utils.train.parts import TrainingParts, resolve_device, resolve_precision
from cribo_utils.train.preemption import (
    EXIT_PREEMPTED,
    Preempted,
    install_preemption_handlers,
    restore_signal_handlers,
    stop_requested,
)
from cribo_utils.train.resources import check_memory
from cribo_utils.train.state import (
    args_as_plain_dict,
    check_same_networks,
    load_initial_backbones,
    restore_state,
    save,
    seed_from_released_checkpoint,
    state_digest,
)
from cribo_utils.train.step import training_step
from cribo_utils.weights.errors import CheckpointFormatError, DownloadError
from data.datasets import DatasetLayoutError
from data.loading import UnreadableSampleError, mix_seed
from models.student_teacher import build_student_teacher

logger = logging.getLogger(__name__)


# Failures that end a run with a one-line message (main_cribo.py prints it and exits with status 1):
# the message says what happened and what to do, so a traceback would only hide it.
TRAINING_ERRORS: tuple[type[BaseException], ...] = (
    NonFiniteLossError,
    CheckpointError,
    DatasetLayoutError,
    UnreadableSampleError,
    distributed.CollectiveFailure,
    CheckpointFormatError,  # --start_checkpoint_path / --init_backbone: a file of another layout (or none)
    DownloadError,  # --start_checkpoint_path / --init_backbone: a name or URL that could not be fetched
)


def build_training_parts(
    args: argparse.Namespace,
    env: distributed.DistEnv,
    dataset_size: int | None = None,
    with_loader: bool = True,
) -> TrainingParts:
    """Networks, loss, bank, optimiser, schedules and (optionally) the data loader."""
    device = resolve_device(args, env)
    loader = sampler = dataset = None
    if with_loader:
        loader, sampler, dataset = build_pretrain_loader(args, env)
        iters_per_epoch = sampler.iters_per_epoch
    else:
        assert dataset_size is not None
        iters_per_epoch = max(1, dataset_size // (args.batch_size_per_gpu * env.world_size))
    check_nn_loss_can_start(args, iters_per_epoch, env.world_size)

    torch.manual_seed(mix_seed(args.seed))  # identical initial weights on every rank
    student, teacher = build_student_teacher(network_config(args))
    student.to(device)
    teacher.to(device)
    if getattr(args, "compile", False):
        compile_backbones(student, teacher)
    student_ddp: nn.Module = student
    if env.world_size > 1:
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
        teacher.load_state_dict(student.state_dict())  # DDP broadcast rank 0's student; match it exactly
    torch.manual_seed(mix_seed(args.seed, env.rank))
    embed_dim = student.backbone.embed_dim

    warmups_off = args.epochs <= 2  # the reference switches every warm-up off for very short runs
    loss = CrIBoLoss(
        out_dim=args.out_dim,
        out_dim_c=args.out_dim_c,
        warmup_teacher_temp=args.warmup_teacher_temp,
        teacher_temp=args.teacher_temp,
        warmup_teacher_temp_c=args.warmup_teacher_temp_c,
        teacher_temp_c=args.teacher_temp_c,
        warmup_teacher_temp_epochs=0 if warmups_off else args.warmup_teacher_temp_epochs,
        nepochs=args.epochs,
        student_temp=0.1,
        student_temp_c=args.student_temp_c,
        objective=args.objective,
        centering_c=args.centering_c,
    ).to(device)
    bank = CentroidMemoryBank(args.queue_size, args.n_tokens, embed_dim).to(device)

    optimizer = build_optimizer(get_params_groups(student), args.optimizer)
    autocast_dtype = resolve_precision(args, device)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None

    global_batch = args.batch_size_per_gpu * env.world_size
    warmup_epochs = 0 if warmups_off else args.warmup_epochs
    lr_schedule = cosine_schedule(
        args.lr * global_batch / 256.0, args.min_lr, args.epochs, iters_per_epoch, warmup_epochs=warmup_epochs
    )
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
    return TrainingParts(
        args=args,
        env=env,
        device=device,
        student=student,
        student_ddp=student_ddp,
        teacher=teacher,
        loss=loss,
        bank=bank,
        optimizer=optimizer,
        scaler=scaler,
        autocast_dtype=autocast_dtype,
        lr_schedule=lr_schedule,
        wd_schedule=wd_schedule,
        momentum_schedule=momentum_schedule,
        iters_per_epoch=iters_per_epoch,
        loader=loader,
        sampler=sampler,
        dataset=dataset,
    )


def log_run_summary(parts: TrainingParts) -> None:
    """The start-up summary: sizes and schedule, when the NN loss starts, the preset, released-batch note."""
    args, env = parts.args, parts.env
    n_params = sum(p.numel() for p in parts.student.parameters())
    n_backbone = sum(p.numel() for p in parts.student.backbone.parameters())
    bank_mb = 2 * args.n_tokens * args.queue_size * parts.student.backbone.embed_dim * 4 / 2**20
    global_batch = args.batch_size_per_gpu * env.world_size
    logger.info(
        "world size %d | device %s | precision %s | student %.1fM parameters (backbone %.1fM) | "
        "effective batch %d "
        "| peak lr %.2e (%.1e x %d / 256) | %d iterations/epoch x %d epochs | memory bank %d images, %.1f MB",
        env.world_size,
        parts.device,
        parts.autocast_dtype or "fp32",
        n_params / 1e6,
        n_backbone / 1e6,
        global_batch,
        args.lr * global_batch / 256,
        args.lr,
        global_batch,
        parts.iters_per_epoch,
        args.epochs,
        args.queue_size,
        bank_mb,
    )
    nn_line, nn_runs = describe_nn_loss_start(args, parts.iters_per_epoch, env.world_size)
    intended = nn_runs or not uses_memory_bank(args)  # an ablation without a bank is what was asked for
    logger.log(logging.INFO if intended else logging.WARNING, "%s", nn_line)
    for line in (describe_preset(args), release_batch_note(args, env.world_size)):
        if line is not None:
            logger.info("%s", line)


def train_cribo(args: argparse.Namespace) -> dict[str, float]:
    """Train CrIBo as configured by ``args``; returns the last epoch's averaged metrics.

    Raises:
        SystemExit: :data:`EXIT_PREEMPTED` after a checkpoint on SIGTERM / SIGUSR1; a
            :class:`~cribo_utils.train.parser.ConfigError` (one line) for an impossible configuration or one
            that does not fit in memory.
        NonFiniteLossError, CheckpointError, DatasetLayoutError, UnreadableSampleError, CollectiveFailure:
            (:data:`TRAINING_ERRORS`) a one-line message; the last good checkpoint is untouched.
    """
    stop_signal: list[int] = []
    previous_handlers = install_preemption_handlers(stop_signal)  # first: a signal during start-up counts too
    env: distributed.DistEnv | None = None
    collective_failed = False
    try:
        env = distributed.init_distributed(
            timeout_s=args.dist_timeout, dist_url=getattr(args, "dist_url", "env://")
        )
        check_output_dir(args.output_dir)
        setup_logging(args.output_dir, env.rank)
        validate_args(args, env.world_size)
        if args.check_memory:
            device = resolve_device(args, env)
            autocast_dtype = resolve_precision(args, device)
            check_memory(run_shape(args), device, activation_bytes=4 if autocast_dtype is None else 2)
        return _train(args, env, stop_signal)
    except TRAINING_ERRORS as error:
        logger.error("%s", error)
        raise
    except RuntimeError as error:
        if env is None or env.world_size == 1 or not distributed.is_collective_failure(error):
            raise
        collective_failed = True  # destroying a group with a dead peer can block: leave it to process exit
        failure = distributed.diagnose_collective_failure(
            error, wait_s=min(args.dist_timeout, 60.0), timeout_s=args.dist_timeout
        )
        logger.error("%s", failure)
        raise failure from error
    finally:
        restore_signal_handlers(previous_handlers)
        if not collective_failed:
            distributed.cleanup()


def _train(args: argparse.Namespace, env: distributed.DistEnv, stop_signal: list[int]) -> dict[str, float]:
    torch.manual_seed(mix_seed(args.seed, env.rank))
    if distributed.is_main_process():
        with open(os.path.join(args.output_dir, "args.json"), "w") as handle:
            json.dump(args_as_plain_dict(args), handle, indent=2)
    parts = build_training_parts(args, env)
    parts.stop_signal = stop_signal
    log_run_summary(parts)

    start_iteration = 0
    resumed = find_resume_checkpoint(args.output_dir)
    if resumed is not None:
        checkpoint, path = resumed
        check_same_networks(args, checkpoint, path)
        _, start_iteration = restore_state(parts, checkpoint)
        logger.info("resumed from %s at iteration %d", path, start_iteration)
        if args.init_backbone:
            logger.info("--init_backbone %s: not loaded again on resume", args.init_backbone)
    elif args.start_checkpoint_path:
        seed_from_released_checkpoint(parts, args.start_checkpoint_path)
    elif args.init_backbone:
        load_initial_backbones(parts, args.init_backbone)

    total_iters = args.epochs * parts.iters_per_epoch
    if args.max_iters:
        total_iters = min(total_iters, args.max_iters)
    logs = TrainingLogs(
        epochs=MetricLogger(os.path.join(args.output_dir, EPOCH_LOG), enabled=distributed.is_main_process()),
        iterations=MetricLogger(
            os.path.join(args.output_dir, ITERATION_LOG),
            enabled=distributed.is_main_process(),
            tensorboard_dir=os.path.join(args.output_dir, "tb") if args.tensorboard else None,
        ),
    )
    progress = Progress(
        total_iters,
        "train",
        enabled=distributed.is_main_process(),
        every=args.log_freq,
        items_per_step=args.batch_size_per_gpu * env.world_size,
        start=start_iteration,
    )
    iteration = start_iteration
    epoch_metrics: dict[str, float] = {}
    try:
        while iteration < total_iters:
            epoch = iteration // parts.iters_per_epoch
            try:
                epoch_metrics = train_one_epoch(parts, epoch, iteration, total_iters, logs, progress)
            except Preempted as stop:
                logger.warning(
                    "preemption signal %s: checkpoint written at iteration %d; exiting with code %d "
                    "so the job is requeued",
                    stop.signal_name,
                    stop.iteration,
                    EXIT_PREEMPTED,
                )
                logs.close()
                sys.exit(EXIT_PREEMPTED)
            iteration = min((epoch + 1) * parts.iters_per_epoch, total_iters)
    finally:
        progress.close()
    logs.close()
    logger.info(
        "training finished after %d iterations (%s)",
        iteration,
        format_seconds(time.perf_counter() - progress.start_time),
    )
    logger.info("final state digest (rank %d): %s", env.rank, json.dumps(state_digest(parts)))
    return epoch_metrics


def train_one_epoch(
    parts: TrainingParts,
    epoch: int,
    start_iteration: int,
    total_iters: int,
    logs: TrainingLogs,
    progress: Progress,
) -> dict[str, float]:
    """Run the iterations of ``epoch`` from ``start_iteration`` on; returns the epoch's averaged metrics.

    Raises:
        Preempted: after the checkpoint, when any rank received a preemption signal.
    """
    args = parts.args
    assert parts.sampler is not None and parts.loader is not None and parts.dataset is not None
    first_batch = start_iteration - epoch * parts.iters_per_epoch
    parts.sampler.set_epoch(epoch, start_batch=first_batch)
    parts.dataset.set_epoch(epoch)
    parts.student.train()
    parts.teacher.eval()
    sums: dict[str, float] = {}
    count = 0
    skipped_files = 0
    iteration = saved_at = start_iteration
    step_start = time.perf_counter()
    for views, targets, skipped in parts.loader:
        if iteration >= total_iters or iteration >= (epoch + 1) * parts.iters_per_epoch:
            break
        skipped_files += int(skipped.sum())
        metrics = training_step(parts, (views, targets), iteration, epoch)
        step_time = time.perf_counter() - step_start
        step_start = time.perf_counter()
        metrics["images_per_s"] = args.batch_size_per_gpu * parts.env.world_size / max(step_time, 1e-9)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
        iteration += 1
        progress.update(
            1,
            postfix=f"loss {metrics['loss']:.3f} | clusters {metrics['clusters_per_image']:.1f} "
            f"| nn {metrics['nn_fraction']:.2f}",
        )
        if iteration % args.log_freq == 0:
            logs.iterations.log({"iteration": iteration, "epoch": epoch, **metrics})
        preempted = stop_requested(parts.stop_signal, parts.env.world_size, parts.device)
        if preempted or (args.saveckp_freq_iters and iteration % args.saveckp_freq_iters == 0):
            save(parts, iteration // parts.iters_per_epoch, iteration)
            saved_at = iteration
        if preempted:  # every rank stops at the same iteration, whichever rank received the signal
            raise Preempted(iteration, parts.stop_signal)
    averages = average_across_ranks(sums, count, parts)
    skipped_files = total_across_ranks(skipped_files, parts)
    next_epoch = epoch + 1
    epoch_completed = iteration == next_epoch * parts.iters_per_epoch
    epoch_copy = (
        next_epoch if epoch_completed and args.saveckp_freq and next_epoch % args.saveckp_freq == 0 else None
    )
    if saved_at != iteration or epoch_copy is not None:  # never the same state twice: the backup stays older
        save(parts, iteration // parts.iters_per_epoch, iteration, epoch_copy)
    # DINO's epoch record: every averaged metric as train_<name> (train_loss, train_lr, train_wd, the terms).
    epoch_record = {f"train_{key}": value for key, value in averages.items()}
    logs.epochs.log(
        {"epoch": epoch, "iteration": iteration, **epoch_record, "train_skipped_files": skipped_files}
    )
    if skipped_files and distributed.is_main_process():
        logger.warning(
            "epoch %d: %d unreadable file(s) skipped and replaced by the next readable image (the "
            "warnings above name them); delete or replace them",
            epoch + 1,
            skipped_files,
        )
    if distributed.is_main_process():
        logger.info(
            "epoch %d/%d done: %s",
            next_epoch,
            args.epochs,
            epoch_line(averages, count, epoch, parts.bank, parts.args.objective),
        )
    return averages


def total_across_ranks(value: int, parts: TrainingParts) -> int:
    """Sum of an integer count over all ranks."""
    if parts.env.world_size == 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=parts.device)
    return int(distributed.all_reduce_sum(total).item())


def average_across_ranks(sums: dict[str, float], count: int, parts: TrainingParts) -> dict[str, float]:
    """Mean of each metric over this epoch's iterations and all ranks."""
    if not sums:
        return {}
    keys = sorted(sums)
    totals = torch.tensor([sums[key] for key in keys] + [float(count)], dtype=torch.float64)
    if parts.env.world_size > 1:
        totals = totals.to(parts.device)
        distributed.all_reduce_sum(totals)
    totals = totals.cpu()
    return {key: float(totals[i] / totals[-1]) for i, key in enumerate(keys)}
