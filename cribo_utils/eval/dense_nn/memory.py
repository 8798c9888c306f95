"""Building the memory: sharded feature extraction, then assembly of the searchable memory on every rank.

Each rank extracts the features and labels of its memory items (:func:`extract_memory_shard`); the
features stay in that rank's index, the labels are broadcast to every rank (:func:`assemble_memory`).
:func:`build_memory` runs the whole build after the plan and RAM checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cribo_utils.eval.dense_nn.config import MEMORY_DTYPES, DenseNNConfig
from cribo_utils.eval.dense_nn.datasets import MemoryItems, memory_transform
from cribo_utils.eval.dense_nn.labels import PatchLabels, patch_class_counts, select_memory_patches
from cribo_utils.eval.dense_nn.plan import (
    MemoryPlan,
    check_memory_fits,
    plan_memory,
    training_subset,
    training_subset_size,
)
from cribo_utils.eval.dense_nn.predict import backbone_attribute, dense_feature_dim, patch_features
from cribo_utils.eval.dense_nn.search import DenseMemory, MemoryShard, _local_index
from cribo_utils.eval.dense_nn.sharding import (
    _ASSEMBLY_CHUNK_ROWS,
    _broadcast_rows,
    _comm_device,
    _progress,
    _rank_sizes,
    _shard_loader,
)
from cribo_utils.eval.sharded_search import ShardedIndex
from cribo_utils.runtime import distributed

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_memory_shard(
    backbone: nn.Module,
    items: MemoryItems,
    plan: MemoryPlan,
    patch_size: int,
    num_classes: int,
    cfg: DenseNNConfig,
    device: torch.device,
) -> MemoryShard:
    """Features and labels of this rank's memory items (a contiguous run of whole global batches).

    Args:
        backbone: eval-mode ViT.
        items: the (pass, image) items.
        plan: memory plan (patches kept per item).
        patch_size: p.
        num_classes: C.
        cfg: protocol parameters.
        device: compute device.
    Returns:
        The shard, on the CPU, features in ``cfg.memory_dtype``; row ``t * n + j`` is the j-th kept patch of
        the t-th local item.
    """
    loader = _shard_loader(items, cfg, device)
    num_local = len(loader.dataset)  # type: ignore[arg-type]
    keep = plan.patches_kept_per_image
    dim = dense_feature_dim(backbone)
    features = torch.empty(num_local * keep, dim, dtype=MEMORY_DTYPES[cfg.memory_dtype])
    label_parts: list[PatchLabels] = []
    row = 0
    for images, masks, noise in _progress(loader, cfg, "dense-NN memory"):
        images, masks, noise = images.to(device, non_blocking=True), masks.to(device), noise.to(device)
        tokens = patch_features(backbone, images, patch_size)
        counts = patch_class_counts(
            masks, patch_size, num_classes, cfg.ignore_index, cfg.ignore_to_background
        )
        if keep < plan.patches_per_image:
            chosen = select_memory_patches(counts, noise, keep)
            tokens = tokens.gather(1, chosen.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            counts = counts.gather(1, chosen.unsqueeze(-1).expand(-1, -1, counts.shape[-1]))
        rows = tokens.shape[0] * keep
        features[row : row + rows] = tokens.reshape(rows, dim).cpu()
        label_parts.append(
            PatchLabels.from_counts(counts.reshape(rows, num_classes), patch_size**2).to("cpu")
        )
        row += rows
    return MemoryShard(features, PatchLabels.concatenate(label_parts, num_classes, patch_size**2))


def _all_labels(labels: PatchLabels, sizes: list[int]) -> PatchLabels:
    """The labels of the whole memory on every rank, in global order (each rank's rows broadcast)."""
    if distributed.get_world_size() == 1:
        return labels
    width = labels.width
    class_parts, count_parts = [], []
    for src, size in enumerate(sizes):
        for start in range(0, size, _ASSEMBLY_CHUNK_ROWS):
            stop = min(size, start + _ASSEMBLY_CHUNK_ROWS)
            # int32 on the wire: gloo and NCCL do not all support int16.
            class_parts.append(_broadcast_rows(labels.classes, src, start, stop, (width,), torch.int32))
            count_parts.append(_broadcast_rows(labels.counts, src, start, stop, (width,), torch.int32))
    classes = torch.cat(class_parts) if class_parts else labels.classes.int()
    counts = torch.cat(count_parts) if count_parts else labels.counts.int()
    return PatchLabels(
        classes.to(labels.classes.dtype),
        counts.to(labels.counts.dtype),
        labels.num_classes,
        labels.pixels_per_patch,
    )


def assemble_memory(
    shard: MemoryShard,
    plan: MemoryPlan,
    cfg: DenseNNConfig,
    device: torch.device,
    image_indices: Sequence[int] = (),
) -> DenseMemory:
    """Index this rank's shard and gather the label table of the whole memory, in global item order.

    The features stay sharded: rank r indexes only its own rows ``[offset_r, offset_r + m_r)`` (its
    extracted items, contiguous in global order) and searches go through
    :class:`cribo_utils.eval.sharded_search.ShardedIndex`. The labels (a few bytes per entry) are broadcast so
    that every rank can read the labels of neighbours found on any shard. For IVF the quantiser is trained
    on a seeded sample of the whole memory, identical on every rank.

    Args:
        shard: this rank's features and labels.
        plan: memory plan.
        cfg: protocol parameters (index kind, nlist, nprobe, seed).
        device: where the torch index and the label table are kept (the queries' device).
        image_indices: training images used (recorded).
    Returns:
        The memory.
    """
    sizes = _rank_sizes(shard.features.shape[0])
    width = max(_rank_sizes(shard.labels.width))
    local = _local_index(shard, sizes, cfg, device)
    all_labels = _all_labels(shard.labels.padded(width), sizes)
    index = ShardedIndex(local, sizes, _comm_device())
    logger.info(
        "dense-NN memory shard of rank %d: rows [%d, %d) of %d (%s index)",
        distributed.get_rank(),
        index.offset,
        index.offset + len(local),
        len(index),
        cfg.index,
    )
    return DenseMemory(index, all_labels.to(device), plan, image_indices)


def build_memory(
    backbone: nn.Module,
    train_dataset: Any,
    cfg: DenseNNConfig,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> DenseMemory:
    """Check the plan and the RAM, extract this rank's memory items, then assemble the whole memory.

    Args:
        backbone: eval-mode ViT with ``embed_dim``, ``patch_size`` and ``forward_features``.
        train_dataset: yields (PIL image, PIL mask) pairs with class ids in [0, C) or ``cfg.ignore_index``.
        cfg: protocol parameters.
        num_classes: C.
        device: compute device.
    Returns:
        The memory, identical on every rank.
    Raises:
        ValueError: for inconsistent flags (before any work).
        MemoryError: when the memory would not fit in RAM (before any work).
    """
    device = torch.device(device)
    patch_size = backbone_attribute(backbone, "patch_size")
    cfg.validate(patch_size)
    side = cfg.input_size // patch_size
    num_images = training_subset_size(len(train_dataset), cfg.train_fraction)
    plan = plan_memory(num_images, cfg.augmentation_epochs, side * side, cfg.memory_size)
    check_memory_fits(
        plan,
        dense_feature_dim(backbone),
        num_classes,
        patch_size,
        cfg.index,
        cfg.memory_size,
        memory_dtype=cfg.memory_dtype,
        index_on_gpu=device.type == "cuda",
        nlist=cfg.nlist,
        num_workers=cfg.num_workers,
        queries_per_search=cfg.batch_size * side * side * distributed.get_world_size(),
    )
    image_indices = training_subset(len(train_dataset), cfg.train_fraction, cfg.seed)
    items = MemoryItems(
        train_dataset, image_indices, cfg.augmentation_epochs, memory_transform(cfg), side * side, cfg.seed
    )
    backbone.eval()
    start_time = time.perf_counter()
    shard = extract_memory_shard(backbone, items, plan, patch_size, num_classes, cfg, device)
    memory = assemble_memory(shard, plan, cfg, device, image_indices)
    logger.info(
        "dense-NN memory: %d entries (%d images x %d passes x %d patches), label width %d, %.1f s",
        len(memory),
        plan.num_images,
        plan.passes,
        plan.patches_kept_per_image,
        memory.labels.width,
        time.perf_counter() - start_time,
    )
    return memory
