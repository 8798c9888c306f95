"""Data parallelism of the evaluation: which items each rank processes, and the collectives' helpers.

The memory items and the validation images are split into global batches and each rank takes a
contiguous run of whole batches (:func:`shard_range`), so every image lands in the same batch whatever the
world size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from cribo_utils.eval.dense_nn.config import DenseNNConfig
from cribo_utils.runtime import distributed

# Rows of features sent per broadcast when the memory is assembled from the ranks' shards.
_ASSEMBLY_CHUNK_ROWS = 65536


def shard_range(num_items: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous run of whole global batches: items ``[start, stop)``.

    Batch b covers items ``[b B, (b + 1) B)``; rank r takes batches ``[r nb / W, (r + 1) nb / W)``.
    """
    num_batches = math.ceil(num_items / batch_size)
    first = rank * num_batches // world_size
    last = (rank + 1) * num_batches // world_size
    return min(first * batch_size, num_items), min(last * batch_size, num_items)


def _shard_loader(dataset: Any, cfg: DenseNNConfig, device: torch.device) -> DataLoader:
    start, stop = shard_range(
        len(dataset), cfg.batch_size, distributed.get_rank(), distributed.get_world_size()
    )
    return DataLoader(
        torch.utils.data.Subset(dataset, range(start, stop)),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def _progress(loader: DataLoader, cfg: DenseNNConfig, description: str) -> Any:
    """Iterate ``loader`` with a throughput/ETA line on rank 0 (plain periodic lines when not a terminal)."""
    if not (cfg.progress and distributed.is_main_process()):
        return loader
    from cribo_utils.runtime.progress import Progress

    def iterate() -> Any:
        progress = Progress(len(loader), description, items_per_step=loader.batch_size or 1)
        for batch in loader:
            yield batch
            progress.update(1)
        progress.close()

    return iterate()


def _max_batches_per_rank(num_items: int, batch_size: int) -> int:
    """The largest number of batches any rank's :func:`shard_range` gives (the same on every rank)."""
    world_size = distributed.get_world_size()
    return max(
        math.ceil((stop - start) / batch_size)
        for start, stop in (
            shard_range(num_items, batch_size, rank, world_size) for rank in range(world_size)
        )
    )


def _comm_device() -> torch.device:
    """Device that collectives of the current backend accept (CUDA for NCCL)."""
    if distributed.is_dist() and str(torch.distributed.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank_sizes(local_size: int) -> list[int]:
    sizes = distributed.all_gather_fixed(torch.tensor([local_size], dtype=torch.long, device=_comm_device()))
    return [int(s) for s in sizes.tolist()]


def _broadcast_rows(
    local: Tensor, src: int, start: int, stop: int, dim_shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """Rows ``[start, stop)`` of rank ``src``'s tensor, on every rank (CPU result)."""
    device = _comm_device()
    if distributed.get_rank() == src:
        buffer = local[start:stop].to(device=device, dtype=dtype).contiguous()
    else:
        buffer = torch.empty(stop - start, *dim_shape, dtype=dtype, device=device)
    distributed.broadcast(buffer, src=src)
    return buffer.cpu()
