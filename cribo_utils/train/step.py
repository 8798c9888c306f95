"""One CrIBo optimisation step, in the order of docs/method.md, Sec. 1: schedules -> teacher forward -> joint
clustering -> retrieval in the bank (before the update) -> bank push -> teacher heads -> student forward ->
loss -> backward -> clip / freeze -> optimiser step -> EMA. The maths lives in the modules it calls."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cribo_utils.method.clustering import joint_cluster, positional_alpha
from cribo_utils.method.neighbours import find_cycle_consistent_neighbours
from cribo_utils.train.health import check_finite_loss
from cribo_utils.train.loader import augment_on_device
from cribo_utils.train.nn_loss_schedule import nn_loss_active, uses_memory_bank
from cribo_utils.train.optim import cancel_gradients_last_layer, clip_gradients
from cribo_utils.train.parts import TrainingParts, autocast
from data.loading import mix_seed
from models.object_pooling import object_representations_both_views, valid_object_index
from models.student_teacher import update_teacher


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
        local_crops = crops[2:]  # DINO's multi-crop (--local_crops_number): student [CLS] loss only
        local_images = (
            torch.cat([crop.to(device, non_blocking=True) for crop in local_crops]) if local_crops else None
        )

    with timer("augment"):
        images = augment_on_device(args, images, views)
        if local_images is not None:
            local_images = augment_on_device(args, local_images, views, first=2, count=len(local_crops))

    with timer("teacher_forward"), torch.no_grad(), autocast(parts):
        teacher_cls, teacher_tokens = parts.teacher.backbone.forward_features(images)

    with timer("clustering"), torch.no_grad():
        tokens = teacher_tokens.float()
        tokens1, tokens2 = tokens.split(batch_size)
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
            compiled=getattr(args, "compile", False),
        )
        # The number of objects M sets every later shape: reading it back is one of the step's three waits
        # for the device (with the bank's counts and the metrics); every later gather uses this index.
        valid_index = valid_object_index(clusters.valid, views=2)
        objects1, objects2 = object_representations_both_views(
            tokens, clusters.assign1, clusters.assign2, clusters.valid, valid_index
        ).unbind()

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
            images, clusters.assign1, clusters.assign2, clusters.valid, local_images, valid_index=valid_index
        )

    with timer("loss"):
        masks = None if neighbours is None else torch.stack([neighbours.mask1, neighbours.mask2])
        losses = parts.loss(
            student_cls_out, teacher_cls_out, student_obj, teacher_obj, teacher_nn, masks, epoch
        )
        loss = losses["loss"]
        # One read of device values for the finite-loss check and every metric of the step.
        with torch.no_grad():
            mask_sums = masks.sum(dim=1, dtype=loss.dtype) if masks is not None else loss.new_zeros(2)
            read = torch.stack((*losses.values(), *mask_sums)).tolist()
        values = dict(zip(losses, read[: len(losses)], strict=True))
        check_finite_loss(parts, values, iteration, epoch)

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

    # float32 quotients, as the tensors gave them before the metrics were read in one go
    num_objects = np.float32(objects1.shape[0])
    accepted = np.array(read[-2:], dtype=np.float32) / max(num_objects, np.float32(1.0))
    metrics = dict(values)
    metrics.update(
        lr=float(parts.lr_schedule[iteration]),
        wd=float(parts.wd_schedule[iteration]),
        momentum=float(parts.momentum_schedule[iteration]),
        clusters_per_image=float(num_objects / np.float32(batch_size)),
        nn_fraction=float(accepted[0]) if neighbours is not None else 0.0,
        nn_fraction_2=float(accepted[1]) if neighbours is not None else 0.0,
        nn_active=float(use_nn),
    )
    return metrics
