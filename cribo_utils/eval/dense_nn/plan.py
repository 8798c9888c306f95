"""Memory plan: how many patches each (image, pass) keeps, the fixed training subset, and the RAM check.

Everything here is decided before any image is read, so inconsistent flags and a memory that cannot fit
in host RAM fail at once, with the flag that fixes them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cribo_utils.eval.dense_nn.labels import _smallest_int_dtype
from cribo_utils.runtime import distributed
from cribo_utils.train.resources import available_memory

logger = logging.getLogger(__name__)


# Expected (class, count) pairs per stored patch, for the RAM estimate made before the labels exist.
_EXPECTED_CLASSES_PER_PATCH = 8


@dataclass(frozen=True)
class MemoryPlan:
    """How the memory is filled.

    Attributes:
        num_images: training images used.
        passes: augmentation passes.
        patches_per_image: N = S^2 patches of one crop.
        patches_kept_per_image: n patches kept per (image, pass).
        size: entries in the memory, ``num_images * passes * n``.
    """

    num_images: int
    passes: int
    patches_per_image: int
    patches_kept_per_image: int

    @property
    def size(self) -> int:
        return self.num_images * self.passes * self.patches_kept_per_image


def plan_memory(num_images: int, passes: int, patches_per_image: int, memory_size: int | None) -> MemoryPlan:
    """``n = max(1, M // (images * passes))`` patches per image, or all N when M is None.

    Raises:
        ValueError: when n > N (the memory cannot be filled), naming the flags that fix it.
    """
    if num_images <= 0:
        raise ValueError("the training split is empty: check --data_path and --train_fraction")
    if memory_size is None:
        return MemoryPlan(num_images, passes, patches_per_image, patches_per_image)
    keep = max(1, memory_size // (num_images * passes))
    if keep > patches_per_image:
        needed_passes = math.ceil(memory_size / (num_images * patches_per_image))
        raise ValueError(
            f"--memory_size {memory_size} asks for {keep} patches per image, but a crop has only "
            f"{patches_per_image} patches ({num_images} training images x {passes} passes, see "
            f"--train_fraction and --augmentation_epochs). Use --augmentation_epochs {needed_passes} or "
            f"more, or --memory_size {num_images * passes * patches_per_image} or less."
        )
    return MemoryPlan(num_images, passes, patches_per_image, keep)


def training_subset_size(num_images: int, fraction: float) -> int:
    """Images in the training subset: all for ``fraction >= 1``, else ``max(1, round(fraction n))``."""
    return num_images if fraction >= 1.0 else max(1, round(fraction * num_images))


def training_subset(num_images: int, fraction: float, seed: int) -> Sequence[int]:
    """The fixed training subset: the first :func:`training_subset_size` entries of ``randperm(n, seed)``,
    sorted (``range(n)`` for the full split)."""
    count = training_subset_size(num_images, fraction)
    if count == num_images:
        return range(num_images)
    permutation = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return sorted(permutation[:count].tolist())


def estimate_memory_bytes(
    size: int,
    dim: int,
    num_classes: int,
    patch_size: int,
    index: str = "exact",
    world_size: int = 1,
    processes_per_node: int = 1,
) -> dict[str, int]:
    """Host bytes the memory needs on one node, before anything is built.

    Per process: its shard of the index (``M / W * D * 4``, plus 8-byte ids for IVF; for ``torch`` on a
    GPU this lives in GPU memory but is counted here anyway), the compact labels of the whole memory
    (``M * L * bytes``, L estimated as ``min(C, p^2, 8)``) and the process's extracted feature shard
    (``M / W * D * 4``); times the processes on the node.

    Returns:
        dict with ``features``, ``labels``, ``index`` (per process) and ``total`` (per node) in bytes.
    """
    width = min(num_classes, patch_size**2, _EXPECTED_CLASSES_PER_PATCH)
    label_bytes = (
        size
        * width
        * (_smallest_int_dtype(num_classes - 1).itemsize + _smallest_int_dtype(patch_size**2).itemsize)
    )
    shard_rows = math.ceil(size / world_size)
    index_bytes = shard_rows * dim * 4 + (shard_rows * 8 if index == "ivf" else 0)
    shard_bytes = shard_rows * dim * 4
    total = processes_per_node * (index_bytes + label_bytes + shard_bytes)
    return {"features": shard_bytes, "labels": label_bytes, "index": index_bytes, "total": total}


def processes_per_node() -> int:
    """Processes on this node: torchrun ``LOCAL_WORLD_SIZE``, SLURM ``SLURM_NTASKS_PER_NODE``, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def check_memory_fits(
    plan: MemoryPlan,
    dim: int,
    num_classes: int,
    patch_size: int,
    index: str,
    requested_size: int | None,
    available: int | None = None,
) -> dict[str, int]:
    """Fail early when the memory would not fit in host RAM.

    Args:
        plan: the memory plan.
        dim: feature width D.
        num_classes: C.
        patch_size: p.
        index: one of ``INDEX_KINDS``.
        requested_size: the ``--memory_size`` flag (for the message).
        available: bytes available (default: the host's, from
            :func:`cribo_utils.train.resources.available_memory`, which honours cgroup limits).
    Returns:
        The estimate of :func:`estimate_memory_bytes`.
    Raises:
        MemoryError: with both numbers and a ``--memory_size`` that would fit.
    """
    local_processes = processes_per_node()
    estimate = estimate_memory_bytes(
        plan.size, dim, num_classes, patch_size, index, distributed.get_world_size(), local_processes
    )
    source = "as given by the caller"
    if available is None:
        probe = available_memory(torch.device("cpu"))
        if probe is not None:
            available, source = probe
    if available is None:
        logger.warning("could not read the available memory; skipping the RAM check of the memory bank")
        return estimate
    if estimate["total"] > available:
        fitting = int(plan.size * 0.8 * available / estimate["total"])
        flag = (
            f"--memory_size {requested_size}"
            if requested_size
            else f"--memory_size unset (every patch: {plan.size})"
        )
        gib = 2.0**30
        raise MemoryError(
            f"{flag}: the dense-NN memory of {plan.size} patches x {dim} dims needs about "
            f"{estimate['total'] / gib:.1f} GiB of RAM on this node ({local_processes} process(es), each "
            f"holding its index shard {estimate['index'] / gib:.1f} GiB + labels "
            f"{estimate['labels'] / gib:.1f} GiB + its feature shard {estimate['features'] / gib:.1f} GiB), "
            f"but only {available / gib:.1f} GiB are available ({source}). Use "
            f"--memory_size {max(1, fitting)} or less, or spread the run over more nodes (each process holds "
            "1/W of the memory; --index ivf needs as much as exact)."
        )
    logger.info(
        "memory bank: %d entries, about %.2f GiB of %.2f GiB available",
        plan.size,
        estimate["total"] / 2**30,
        available / 2**30,
    )
    return estimate
