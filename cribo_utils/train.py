"""The CrIBo training loop: the only place that decides the order of the steps.

One iteration (method doc Sec. 1): schedules -> teacher forward -> joint clustering -> retrieval in the
bank (before the update) -> bank push -> teacher heads -> student forward -> loss -> backward -> clip /
freeze -> optimiser step -> EMA. The maths lives in the modules this file calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cribo_utils import distributed
from cribo_utils.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    save_training_checkpoint,
    with_prefix,
    without_prefix,
)
from cribo_utils.clustering import joint_cluster, object_representations, positional_alpha
from cribo_utils.logger import MetricLogger, setup_logging
from cribo_utils.loss import OBJECTIVES, CrIBoLoss
from cribo_utils.memory_bank import CentroidMemoryBank
from cribo_utils.neighbours import find_cycle_consistent_neighbours
from cribo_utils.optim import build_optimizer, cancel_gradients_last_layer, clip_gradients, get_params_groups
from cribo_utils.parser import ConfigError, describe_preset, release_batch_note, validate_args
from cribo_utils.progress import Progress, format_seconds
from cribo_utils.resources import check_memory
from cribo_utils.schedules import cosine_schedule
from data.datasets import DatasetLayoutError
from data.loading import (
    PerSampleSeededDataset,
    ResumableDistributedSampler,
    UnreadableSampleError,
    mix_seed,
    set_worker_signal_handlers,
)
from models.student_teacher import build_student_teacher, update_teacher

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written on SIGTERM/SIGUSR1; requeue and resume.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLossError(RuntimeError):
    """The loss (or, at a checkpoint, a weight) became NaN or infinite; the last good checkpoint is kept."""


# Failures that end a run with a one-line message (main_cribo.py prints it and exits with status 1):
# the message says what happened and what to do, so a traceback would only hide it.
TRAINING_ERRORS: tuple[type[BaseException], ...] = (
    NonFiniteLossError,
    CheckpointError,
    DatasetLayoutError,
    UnreadableSampleError,
    distributed.CollectiveFailure,
)


class StepTimer:
    """Accumulates wall time per named part of a step (synchronising CUDA so GPU time is attributed)."""

    def __init__(self, enabled: bool = False, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self.device = device
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class TrainingParts:
    """Everything the loop needs, built once by :func:`build_training_parts`."""

    args: argparse.Namespace
    env: distributed.DistEnv
    device: torch.device
    student: nn.Module  # the plain module (parameters, EMA, checkpoints)
    student_ddp: nn.Module  # what the forward goes through (DDP-wrapped when W > 1)
    teacher: nn.Module
    loss: CrIBoLoss
    bank: CentroidMemoryBank
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast_dtype: torch.dtype | None
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    momentum_schedule: np.ndarray
    iters_per_epoch: int
    loader: torch.utils.data.DataLoader | None = None
    sampler: ResumableDistributedSampler | None = None
    dataset: PerSampleSeededDataset | None = None
    stop_signal: list[int] = field(default_factory=list)


def resolve_device(args: argparse.Namespace, env: distributed.DistEnv) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device("cuda", env.local_rank)


def resolve_precision(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward passes (``None``: fp32). Losses always run in fp32."""
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if (device.type == "cuda" and args.use_fp16) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise SystemExit("--precision fp16 needs a GPU; use --precision bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_pretrain_loader(
    args: argparse.Namespace, env: distributed.DistEnv
) -> tuple[torch.utils.data.DataLoader, ResumableDistributedSampler, PerSampleSeededDataset]:
    from data.augmentations import TwoViewTransform
    from data.datasets import build_pretrain_dataset

    transform = TwoViewTransform(
        image_size=args.image_size,
        patch_size=args.patch_size,
        global_crops_scale=tuple(args.global_crops_scale),
        local_crops_number=args.local_crops_number,
        local_crops_scale=tuple(args.local_crops_scale),
        local_crops_size=args.local_crops_size,
        hue=args.hue_jitter,
        grayscale_p=args.grayscale_p,
        blur_radius_max=args.blur_radius_max,
        augment_on=args.augment_on,
    )
    base = build_pretrain_dataset(  # the wrapper below skips unreadable files and counts them per sample
        args.dataset_type,
        args.data_path,
        transform=None,
        synthetic_kwargs={
            "image_size": args.synthetic_image_size,
            "num_train": args.synthetic_num_train,
            "num_val": args.synthetic_num_val,
            "seed": args.seed,
            "object_colours": args.synthetic_object_colours,
            "level": args.synthetic_level,
            "colourings": 2 if args.synthetic_recolour_views else 1,
        },
        skip_bad_files=False,
    )
    dataset = PerSampleSeededDataset(
        base, seed=args.seed, transform=transform, skip_bad_files=args.skip_bad_files
    )
    try:
        sampler = ResumableDistributedSampler(
            len(dataset), args.batch_size_per_gpu, env.world_size, env.rank, seed=args.seed, shuffle=True
        )
    except ValueError as error:
        raise ConfigError(f"--data_path {args.data_path or '(synthetic)'}: {error}") from error
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=False,
        worker_init_fn=set_worker_signal_handlers if args.num_workers > 0 else None,
    )
    return loader, sampler, dataset


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
    student, teacher = build_student_teacher(args)
    student.to(device)
    teacher.to(device)
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


def autocast(parts: TrainingParts) -> contextlib.AbstractContextManager:
    if parts.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=parts.device.type, dtype=parts.autocast_dtype)


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

    Iterations and epochs are counted from 1 here, as in ``log.txt`` (``iteration``: iterations done) and
    the per-epoch lines. Returns ``(line, runs)``; ``runs`` is False when this run stops before the start.
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


def augment_on_device(args: argparse.Namespace, images: torch.Tensor, views: Any) -> torch.Tensor:
    """``--augment_on device``: the photometric stages of both global views, batched on ``images``'s device.

    ``views`` is the collated ``(crops, positions, params)`` of :class:`data.augmentations.TwoViewTransform`;
    with ``--augment_on workers`` it has no ``params`` and ``images`` (already normalised) are returned as is.
    """
    if len(views) < 3:
        return images
    from data.augmentations import blur_kernel_radius
    from data.batched_photometric import apply_photometric

    params = torch.cat([views[2][0], views[2][1]])  # host-side (2B, P): view 1, then view 2, as ``images``
    return apply_photometric(images, params, blur_kernel_radius(args.image_size, args.blur_radius_max))


def training_step(
    parts: TrainingParts, batch: Any, iteration: int, epoch: int, timer: StepTimer | None = None
) -> dict[str, float]:
    """One optimisation step on ``batch``; returns scalar metrics (local to this rank)."""
    args, device = parts.args, parts.device
    timer = timer or StepTimer(False)
    for index, group in enumerate(parts.optimizer.param_groups):
        group["lr"] = float(parts.lr_schedule[iteration])
        if index == 0:
            group["weight_decay"] = float(parts.wd_schedule[iteration])
    torch.manual_seed(mix_seed(args.seed, parts.env.rank, iteration))  # drop-path draws
    cluster_generator = torch.Generator(device=device).manual_seed(
        mix_seed(args.seed, parts.env.rank, iteration, 1)
    )

    with timer("data"):
        views, _ = batch
        crops, positions = views[0], views[1]
        batch_size = crops[0].shape[0]
        # copy each pinned view on its own: a CPU-side cat would make a pageable (synchronous) copy
        images = torch.cat([crops[0].to(device, non_blocking=True), crops[1].to(device, non_blocking=True)])
        positions1 = positions[0].to(device, non_blocking=True)
        positions2 = positions[1].to(device, non_blocking=True)

    with timer("augment"):
        images = augment_on_device(args, images, views)

    with timer("teacher_forward"), torch.no_grad(), autocast(parts):
        teacher_cls, teacher_tokens = parts.teacher.backbone.forward_features(images)

    with timer("clustering"), torch.no_grad():
        tokens1, tokens2 = teacher_tokens.float().split(batch_size)
        alpha = positional_alpha(epoch, args.epochs, args.pos_alpha)
        clusters = joint_cluster(
            tokens1,
            tokens2,
            positions1,
            positions2,
            n_clusters=args.n_tokens,
            alpha=alpha,
            n_iter=args.n_iter,
            sinkhorn_lambda=args.sinkhorn_lambda,
            sinkhorn_iterations=args.sinkhorn_iterations,
            update_c=args.update_c,
            cost_normalization=args.cost_normalization,
            generator=cluster_generator,
        )
        objects1 = object_representations(tokens1, clusters.assign1, clusters.valid)
        objects2 = object_representations(tokens2, clusters.assign2, clusters.valid)

    use_nn = nn_loss_active(parts, epoch)
    with timer("memory_bank"), torch.no_grad():
        neighbours = None
        if use_nn:
            neighbours = find_cycle_consistent_neighbours(
                objects1, objects2, parts.bank, chunk_size=args.retrieval_chunk_size
            )
        if uses_memory_bank(args):
            parts.bank.push(objects1, objects2, clusters.counts)

    with timer("teacher_heads"), torch.no_grad(), autocast(parts):
        neighbour_inputs = None if neighbours is None else (neighbours.neighbours1, neighbours.neighbours2)
        teacher_cls_out, teacher_obj, teacher_nn = parts.teacher.head_outputs(
            teacher_cls, (objects1, objects2), neighbour_inputs
        )

    with timer("student_forward"), autocast(parts):
        student_cls_out, student_obj = parts.student_ddp(
            images, clusters.assign1, clusters.assign2, clusters.valid
        )

    with timer("loss"):
        masks = None if neighbours is None else torch.stack([neighbours.mask1, neighbours.mask2])
        losses = parts.loss(
            student_cls_out, teacher_cls_out, student_obj, teacher_obj, teacher_nn, masks, epoch
        )
        loss = losses["loss"]
        check_finite_loss(parts, losses, iteration, epoch)

    with timer("backward"):
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.scaler is not None:
            parts.scaler.scale(loss).backward()
        else:
            loss.backward()

    with timer("optimizer"):
        if parts.scaler is not None:
            parts.scaler.unscale_(parts.optimizer)
        if args.clip_grad:
            clip_gradients(parts.student, args.clip_grad)
        cancel_gradients_last_layer(epoch, parts.student, args.freeze_last_layer)
        if parts.scaler is not None:
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        else:
            parts.optimizer.step()

    with timer("ema"), torch.no_grad():
        update_teacher(parts.student, parts.teacher, float(parts.momentum_schedule[iteration]))

    num_objects = objects1.shape[0]
    metrics = {key: float(value.detach()) for key, value in losses.items()}
    metrics.update(
        lr=float(parts.lr_schedule[iteration]),
        wd=float(parts.wd_schedule[iteration]),
        momentum=float(parts.momentum_schedule[iteration]),
        clusters_per_image=float(clusters.counts.float().mean()),
        nn_fraction=float(neighbours.mask1.float().sum() / max(num_objects, 1))
        if neighbours is not None
        else 0.0,
        nn_fraction_2=float(neighbours.mask2.float().sum() / max(num_objects, 1))
        if neighbours is not None
        else 0.0,
        nn_active=float(use_nn),
    )
    return metrics


NON_FINITE_HINT = (
    "The last good checkpoint is kept. Try a lower --lr, --clip_grad 0.3, --norm_last_layer true "
    "or --precision fp32, then rerun to resume from it."
)


def check_finite_loss(
    parts: TrainingParts, losses: dict[str, torch.Tensor], iteration: int, epoch: int
) -> None:
    """Stop every rank together, before the backward pass, when any rank's loss is NaN or infinite.

    Raises:
        NonFiniteLossError: naming the iteration, this rank's loss terms and a hint.
    """
    bad = torch.tensor([0.0 if math.isfinite(losses["loss"].item()) else 1.0])
    if parts.env.world_size > 1:  # so that no rank waits in the gradient all-reduce for one that stopped
        bad = distributed.all_reduce_sum(bad.to(parts.device)).cpu()
    if bad.item() > 0:
        terms = ", ".join(f"{key} {float(value.detach()):.4g}" for key, value in losses.items())
        world_size = parts.env.world_size
        where = f" on {int(bad.item())} of {world_size} processes" if world_size > 1 else ""
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


def args_as_plain_dict(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` with tuples as lists: what ``args.json`` and the checkpoint's ``args`` hold."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(args).items()}


def checkpoint_state(parts: TrainingParts, epoch: int, iteration: int) -> dict[str, Any]:
    """The plain-data checkpoint dictionary (see :mod:`cribo_utils.checkpoint`)."""
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
    from cribo_utils.checkpoint_formats import load_checkpoint_file

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


def stop_requested(parts: TrainingParts) -> bool:
    """True on every rank if any rank received a preemption signal."""
    flag = torch.tensor([1.0 if parts.stop_signal else 0.0])
    if parts.env.world_size > 1:
        flag = flag.to(parts.device)
        distributed.all_reduce_sum(flag)
    return bool(flag.item() > 0)


def save(parts: TrainingParts, epoch: int, iteration: int, epoch_copy: int | None = None) -> None:
    check_finite_weights(parts, iteration)
    if distributed.is_main_process():
        save_training_checkpoint(checkpoint_state(parts, epoch, iteration), parts.args.output_dir, epoch_copy)
    distributed.barrier()


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
            :class:`~cribo_utils.parser.ConfigError` (one line) for an impossible configuration or one that
            does not fit in memory.
        NonFiniteLossError, CheckpointError, DatasetLayoutError, UnreadableSampleError, CollectiveFailure:
            (:data:`TRAINING_ERRORS`) a one-line message; the last good checkpoint is untouched.
    """
    stop_signal: list[int] = []
    previous_handlers = install_preemption_handlers(stop_signal)  # first: a signal during start-up counts too
    env: distributed.DistEnv | None = None
    collective_failed = False
    try:
        env = distributed.init_distributed(timeout_s=args.dist_timeout)
        os.makedirs(args.output_dir, exist_ok=True)
        setup_logging(args.output_dir, env.rank)
        validate_args(args, env.world_size)
        if args.check_memory:
            device = resolve_device(args, env)
            autocast_dtype = resolve_precision(args, device)
            check_memory(args, device, activation_bytes=4 if autocast_dtype is None else 2)
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
        _, start_iteration = restore_state(parts, checkpoint)
        logger.info("resumed from %s at iteration %d", path, start_iteration)
    elif args.start_checkpoint_path:
        seed_from_released_checkpoint(parts, args.start_checkpoint_path)

    total_iters = args.epochs * parts.iters_per_epoch
    if args.max_iters:
        total_iters = min(total_iters, args.max_iters)
    metric_logger = MetricLogger(
        os.path.join(args.output_dir, "log.txt"),
        enabled=distributed.is_main_process(),
        tensorboard_dir=os.path.join(args.output_dir, "tb") if args.tensorboard else None,
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
            epoch_metrics = train_one_epoch(parts, epoch, iteration, total_iters, metric_logger, progress)
            iteration = min((epoch + 1) * parts.iters_per_epoch, total_iters)
            if parts.stop_signal and epoch_metrics.get("preempted"):
                iteration = int(epoch_metrics["next_iteration"])
                logger.warning(
                    "preemption signal %s: checkpoint written at iteration %d; exiting with code %d "
                    "so the job is requeued",
                    signal.Signals(parts.stop_signal[0]).name,
                    iteration,
                    EXIT_PREEMPTED,
                )
                metric_logger.close()
                sys.exit(EXIT_PREEMPTED)
    finally:
        progress.close()
    metric_logger.close()
    logger.info(
        "training finished after %d iterations (%s)",
        iteration,
        format_seconds(time.perf_counter() - progress.start_time),
    )
    logger.info("final state digest (rank %d): %s", env.rank, json.dumps(state_digest(parts)))
    return epoch_metrics


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


def train_one_epoch(
    parts: TrainingParts,
    epoch: int,
    start_iteration: int,
    total_iters: int,
    metric_logger: MetricLogger,
    progress: Progress,
) -> dict[str, float]:
    """Run the iterations of ``epoch`` from ``start_iteration`` on; returns the epoch's averaged metrics."""
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
            metric_logger.log({"iteration": iteration, "epoch": epoch, **metrics})
        preempted = stop_requested(parts)
        if preempted or (args.saveckp_freq_iters and iteration % args.saveckp_freq_iters == 0):
            save(parts, iteration // parts.iters_per_epoch, iteration)
            saved_at = iteration
        if preempted:
            return {"preempted": 1.0, "next_iteration": float(iteration)}
    averages = average_across_ranks(sums, count, parts)
    skipped_files = total_across_ranks(skipped_files, parts)
    next_epoch = epoch + 1
    epoch_completed = iteration == next_epoch * parts.iters_per_epoch
    epoch_copy = (
        next_epoch if epoch_completed and args.saveckp_freq and next_epoch % args.saveckp_freq == 0 else None
    )
    if saved_at != iteration or epoch_copy is not None:  # never the same state twice: the backup stays older
        save(parts, iteration // parts.iters_per_epoch, iteration, epoch_copy)
    epoch_record = {f"epoch_{key}": value for key, value in averages.items()}
    metric_logger.log(
        {"epoch": epoch, "iteration": iteration, **epoch_record, "epoch_skipped_files": skipped_files}
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
