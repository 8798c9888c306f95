"""Scoring: predict every validation image, accumulate the confusion matrix, and the whole protocol.

:func:`evaluate_memory` scores a built memory (protocol A.6); :func:`evaluate_dense_nn` builds the memory
and scores it, returning the scores with every protocol parameter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from cribo_utils.eval.dense_nn.config import DenseNNConfig
from cribo_utils.eval.dense_nn.datasets import ResizedPairs
from cribo_utils.eval.dense_nn.memory import build_memory
from cribo_utils.eval.dense_nn.predict import backbone_attribute, dense_feature_dim, predict
from cribo_utils.eval.dense_nn.search import DenseMemory
from cribo_utils.eval.dense_nn.sharding import _comm_device, _max_batches_per_rank, _progress, _shard_loader
from cribo_utils.eval.metrics import ConfusionMatrixAccumulator
from cribo_utils.runtime import distributed

logger = logging.getLogger(__name__)


def evaluate_memory(
    backbone: nn.Module,
    memory: DenseMemory,
    val_dataset: Any,
    num_classes: int,
    cfg: DenseNNConfig,
    device: torch.device | str = "cpu",
) -> ConfusionMatrixAccumulator:
    """Predict every validation image of this rank's shard; return the all-reduced confusion matrix.

    Args:
        backbone: eval-mode ViT.
        memory: the memory.
        val_dataset: yields (PIL image, PIL mask) pairs; resized to ``cfg.input_size`` here.
        num_classes: C.
        cfg: protocol parameters.
        device: compute device.
    Returns:
        The accumulator holding the confusion matrix of the whole validation set.
    """
    device = torch.device(device)
    backbone.eval()
    loader = _shard_loader(ResizedPairs(val_dataset, cfg.input_size), cfg, device)
    accumulator = ConfusionMatrixAccumulator(num_classes, cfg.ignore_index, device=_comm_device())
    if len(memory) < cfg.num_neighbours:
        logger.warning(
            "the memory holds only %d entries; using k = %d instead of --num_neighbours %d",
            len(memory),
            len(memory),
            cfg.num_neighbours,
        )
    local_batches = 0
    for images, masks in _progress(loader, cfg, "dense-NN validation"):
        prediction = predict(backbone, images.to(device, non_blocking=True), memory, cfg)
        accumulator.update(prediction, masks.to(prediction.device))
        local_batches += 1
    # The sharded search is a collective: a rank with fewer batches joins the others' remaining searches.
    dim = dense_feature_dim(backbone)
    for _ in range(local_batches, _max_batches_per_rank(len(val_dataset), cfg.batch_size)):
        memory.index.search(torch.zeros(0, dim), min(cfg.num_neighbours, len(memory)))
    accumulator.all_reduce()
    return accumulator


def dataset_classes(dataset: Any) -> tuple[int, list[str]]:
    """(C, class names) of a segmentation dataset (``num_classes`` and ``class_names`` attributes)."""
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"{type(dataset).__name__} has no `num_classes`; pass num_classes explicitly")
    names = getattr(dataset, "class_names", None) or [str(c) for c in range(num_classes)]
    return int(num_classes), list(names)


def evaluate_dense_nn(
    backbone: nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    cfg: DenseNNConfig,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The whole protocol: memory from ``train_dataset``, label transfer and mIoU on ``val_dataset``.

    Args:
        backbone: eval-mode ViT (``forward_features``, ``embed_dim``, ``patch_size``).
        train_dataset: yields (PIL image, PIL mask) pairs (no transform; the protocol's is applied here).
        val_dataset: the same for validation.
        cfg: protocol parameters.
        device: compute device.
        num_classes: C (default: ``val_dataset.num_classes``).
        class_names: C names (default: ``val_dataset.class_names``).
    Returns:
        dict with the scores of :func:`cribo_utils.eval.metrics.segmentation_scores` (fractions in [0, 1]; the
        identity class mapping), the confusion matrix, the memory plan and every protocol parameter.
    """
    if num_classes is None:
        num_classes, default_names = dataset_classes(val_dataset)
        class_names = class_names or default_names
    start_time = time.perf_counter()
    memory = build_memory(backbone, train_dataset, cfg, num_classes, device)
    accumulator = evaluate_memory(backbone, memory, val_dataset, num_classes, cfg, device)
    scores = accumulator.compute(class_names, with_hungarian=True)
    plan = memory.plan
    results: dict[str, Any] = {
        **scores,
        "class_mapping": "identity",
        "num_classes": num_classes,
        "num_train_images": plan.num_images,
        "num_val_images": len(val_dataset),
        "patch_size": backbone_attribute(backbone, "patch_size"),
        "patches_per_image": plan.patches_per_image,
        "patches_kept_per_image": plan.patches_kept_per_image,
        "memory_entries": len(memory),
        "label_width": memory.labels.width,
        "memory_ignore_pixels": "class 0" if cfg.ignore_to_background else "dropped",
        "nlist": getattr(memory.index.local, "nlist", None) if cfg.index == "ivf" else None,
        "nprobe_used": getattr(memory.index.local, "nprobe", None) if cfg.index == "ivf" else None,
        "memory_entries_per_rank": memory.index.shard_sizes,
        "world_size": distributed.get_world_size(),
        "seconds": time.perf_counter() - start_time,
        "confusion_matrix": accumulator.confusion.cpu().tolist(),
        "protocol": {**asdict(cfg), "crop_scale": list(cfg.crop_scale), "crop_ratio": list(cfg.crop_ratio)},
    }
    logger.info(
        "dense-NN retrieval: mIoU %.2f (present classes %.2f), pixel accuracy %.2f over %d images",
        100 * results["miou"],
        100 * results["miou_present"],
        100 * results["pixel_accuracy"],
        len(val_dataset),
    )
    return results
