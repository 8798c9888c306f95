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
#: Host bytes of one evaluation process besides the memory (Python, torch, the network, the batches): the
#: 8-image pipeline run of ``benchmarks/bench_dense_nn.py`` (ViT-S/16, 512 px) peaked at 1.06 GB; rounded up.
RUNTIME_BYTES = 3 * 2**29
#: Host bytes allowed per data-loading worker process (decoded images, prefetched batches).
WORKER_BYTES = 2**29
FEATURE_BYTES = {"fp32": 4, "fp16": 2}
# faiss's exhaustive search computes its inner products in blocks of 4096 queries x 1024 entries.
_FAISS_BLOCK_BYTES = 4096 * 1024 * 4


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
    index: str = "torch",
    world_size: int = 1,
    processes_per_node: int = 1,
    memory_dtype: str = "fp32",
    index_on_gpu: bool = False,
    nlist: int | None = None,
    num_workers: int = 0,
    queries_per_search: int | None = None,
) -> dict[str, int]:
    """Peak bytes of the evaluation, per process and per node, before anything is built.

    With M entries, W processes, D dims, b = 2 (fp16) or 4 (fp32) bytes per stored value and
    L = min(C, p^2, 8) expected (class, count) pairs per entry of c + n bytes, one process holds on the host:

    - ``features``: its extraction buffer ``ceil(M / W) * D * b``;
    - ``index``: 0 for ``torch`` (on the CPU its parts are views of that buffer; on a GPU they are in GPU
      memory); for faiss a float32 copy ``ceil(M / W) * D * 4``, counted twice because faiss grows its
      storage by doubling while the shard is added in chunks, plus for ``ivf`` 8-byte ids per entry and the
      quantiser's training sample ``min(M, 256 nlist) * D * 4``;
    - ``labels``: the whole memory's labels ``M * L * (c + n)``, three times while the batches' parts, their
      padded copies and the joined table coexist (and, when W > 1, the int32 copies of the broadcast,
      ``4 * M * L * 4``);
    - ``search``: ``torch``: one similarity block B
      (:data:`cribo_utils.eval.sharded_search.SIMILARITY_BLOCK_BYTES`) and 15 % more for the buffers of the
      product and of the top-k, plus the block's memory rows in float32, ``B D / max(Q, D)`` for Q queries per
      search (B when Q is not given): once for the BLAS's packed copy of that operand (some CPUs' BLAS
      kernels pack it, others do not), and once more for fp16, whose rows are first upcast into a copy;
      faiss: its own blocks of 4096 x 1024 products (16 MiB);
    - ``runtime``: :data:`RUNTIME_BYTES` plus :data:`WORKER_BYTES` per data-loading worker.

    A ``torch`` index on a GPU holds ``gpu = ceil(M / W) * D * b + M * L * (c + n) + search`` there.

    Returns:
        dict with the parts above, ``process`` (their sum), ``total`` (times the processes of a node) and
        ``gpu``, in bytes.
    """
    from cribo_utils.eval.sharded_search import SIMILARITY_BLOCK_BYTES

    width = min(num_classes, patch_size**2, _EXPECTED_CLASSES_PER_PATCH)
    pair_bytes = _smallest_int_dtype(num_classes - 1).itemsize + _smallest_int_dtype(patch_size**2).itemsize
    label_bytes = size * width * pair_bytes
    shard_rows = math.ceil(size / world_size)
    feature_bytes = shard_rows * dim * FEATURE_BYTES[memory_dtype]
    if index == "torch":
        index_bytes = 0
    else:
        index_bytes = 2 * shard_rows * dim * 4
        if index == "ivf":
            sample_rows = min(size, 256 * (nlist or max(1, min(int(4 * math.sqrt(size)), size // 39))))
            index_bytes += shard_rows * 8 + sample_rows * dim * 4
    labels_peak = 3 * label_bytes + (4 * size * width * 4 if world_size > 1 else 0)
    runtime = RUNTIME_BYTES + num_workers * WORKER_BYTES
    search = SIMILARITY_BLOCK_BYTES * 23 // 20 if index == "torch" else _FAISS_BLOCK_BYTES
    if index == "torch":
        block_rows_copies = 2 if memory_dtype == "fp16" else 1
        search += block_rows_copies * SIMILARITY_BLOCK_BYTES * dim // max(queries_per_search or dim, dim)
    process = feature_bytes + index_bytes + labels_peak + search + runtime
    gpu = feature_bytes + label_bytes + search if index == "torch" and index_on_gpu else 0
    return {
        "features": feature_bytes,
        "index": index_bytes,
        "labels": labels_peak,
        "search": search,
        "runtime": runtime,
        "process": process,
        "total": processes_per_node * process,
        "gpu": gpu,
    }


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
    memory_dtype: str = "fp32",
    index_on_gpu: bool = False,
    nlist: int | None = None,
    num_workers: int = 0,
    queries_per_search: int | None = None,
) -> dict[str, int]:
    """Fail early when the evaluation would not fit in host RAM (:func:`estimate_memory_bytes`).

    Args:
        plan: the memory plan.
        dim: feature width D.
        num_classes: C.
        patch_size: p.
        index: one of ``INDEX_KINDS``.
        requested_size: the ``--memory_size`` flag (for the message).
        available: bytes available (default: the host's, from
            :func:`cribo_utils.train.resources.available_memory`, which honours cgroup limits).
        memory_dtype: ``"fp32"`` or ``"fp16"`` storage of the features.
        index_on_gpu: the ``torch`` index lives in GPU memory.
        nlist: IVF lists (None: the default).
        num_workers: data-loading workers per process.
        queries_per_search: query patches of one search over all processes (``batch x S^2 x W``).
    Returns:
        The estimate.
    Raises:
        MemoryError: with both numbers and a ``--memory_size`` that would fit.
    """
    local_processes = processes_per_node()
    estimate = estimate_memory_bytes(
        plan.size,
        dim,
        num_classes,
        patch_size,
        index,
        distributed.get_world_size(),
        local_processes,
        memory_dtype,
        index_on_gpu,
        nlist,
        num_workers,
        queries_per_search,
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
        memory_part = estimate["features"] + estimate["index"] + estimate["labels"]
        spare = available / local_processes - (estimate["process"] - memory_part)
        fitting = int(plan.size * 0.8 * max(spare, 0) / max(memory_part, 1))
        flag = (
            f"--memory_size {requested_size}"
            if requested_size
            else f"--memory_size unset (every patch: {plan.size})"
        )
        gib = 2.0**30
        raise MemoryError(
            f"{flag}: the dense-NN memory of {plan.size} patches x {dim} dims needs about "
            f"{estimate['total'] / gib:.1f} GiB of RAM on this node ({local_processes} process(es), each "
            f"holding its feature shard {estimate['features'] / gib:.1f} GiB ({memory_dtype}) + index copy "
            f"{estimate['index'] / gib:.1f} GiB + labels {estimate['labels'] / gib:.1f} GiB + search and "
            f"runtime {(estimate['search'] + estimate['runtime']) / gib:.1f} GiB), but only "
            f"{available / gib:.1f} GiB are available ({source}). Use --memory_size {max(1, fitting)} or "
            "less, --memory_dtype fp16 (half the features), or spread the run over more nodes (each process "
            "holds 1/W of the memory)."
        )
    logger.info(
        "dense-NN memory: %d entries, about %.2f GiB of RAM per node (%.2f GiB available)",
        plan.size,
        estimate["total"] / 2**30,
        available / 2**30,
    )
    return estimate
