"""The searchable memory: faiss local indexes, the per-rank local index of a shard, and the memory itself.

Each rank indexes its own shard (torch, or faiss ``exact`` / ``ivf``); searches go through
:class:`cribo_utils.eval.sharded_search.ShardedIndex`, which merges the exact top-k across ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cribo_utils.eval.dense_nn.config import INDEX_KINDS, MEMORY_DTYPES, DenseNNConfig
from cribo_utils.eval.dense_nn.labels import PatchLabels
from cribo_utils.eval.dense_nn.plan import MemoryPlan
from cribo_utils.eval.dense_nn.sharding import _ASSEMBLY_CHUNK_ROWS, _comm_device
from cribo_utils.eval.sharded_search import LocalIndex, ShardedIndex, TorchShardIndex
from cribo_utils.runtime import distributed


def _import_faiss() -> Any:
    # faiss logs every instruction-set variant it fails to load at INFO level; only its warnings matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "--index exact / ivf need faiss, an optional extra: pip install faiss-cpu (or cribo[faiss]); "
            "--index torch (the default) needs nothing else"
        ) from error
    return faiss


def default_nlist(size: int) -> int:
    """IVF lists: ``4 sqrt(M)``, at most ``M / 39`` (faiss wants >= 39 training points per list)."""
    return max(1, min(int(4 * math.sqrt(size)), size // 39))


class PatchIndex:
    """faiss inner-product index over unit-norm memory features: cosine similarity search.

    Args:
        dim: D.
        kind: ``"exact"`` (``IndexFlatIP``) or ``"ivf"`` (``IndexIVFFlat`` with a flat inner-product
            quantiser; needs :meth:`train`).
        nlist: IVF lists.
        nprobe: IVF lists visited per query (clamped to ``nlist``).
    """

    def __init__(self, dim: int, kind: str = "exact", nlist: int = 1, nprobe: int = 1) -> None:
        faiss = _import_faiss()
        self.dim = dim
        self.kind = kind
        self.nlist = nlist
        self.nprobe = min(nprobe, nlist)
        if kind == "exact":
            self.index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            # The IVF index does not own its quantiser: keep a reference so that it outlives the index.
            self.quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(self.quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.nprobe = self.nprobe
        else:
            raise ValueError(f"--index {kind!r} is not one of {', '.join(INDEX_KINDS)}")

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, sample: Tensor) -> None:
        """Train the IVF coarse quantiser (k-means) on (n, D) unit vectors, ``n >= nlist``."""
        if sample.shape[0] < self.nlist:
            raise ValueError(
                f"--nlist {self.nlist} needs at least as many memory entries; the memory has "
                f"{sample.shape[0]}. Lower --nlist or use --index exact."
            )
        self.index.train(np.ascontiguousarray(sample.float().cpu().numpy()))

    def add(self, features: Tensor) -> None:
        """Append (n, D) unit vectors; their ids continue from :meth:`__len__`."""
        if features.shape[0]:
            self.index.add(np.ascontiguousarray(features.float().cpu().numpy()))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k inner products.

        Args:
            queries: (Q, D) unit vectors.
            k: neighbours.
        Returns:
            (similarities (Q, k) float32 descending, ids (Q, k) int64), on the CPU; id -1 where an IVF
            search found fewer than k candidates.
        """
        similarities, ids = self.index.search(np.ascontiguousarray(queries.float().cpu().numpy()), k)
        return torch.from_numpy(similarities), torch.from_numpy(ids)


@dataclass
class DenseMemory:
    """The searchable memory: the index (features), the labels in the same order, and the plan."""

    index: ShardedIndex
    labels: PatchLabels
    plan: MemoryPlan
    image_indices: Sequence[int] = ()

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class MemoryShard:
    """This rank's part of the memory, in global item order: features (m, D) float32 and labels (m, L)."""

    features: Tensor
    labels: PatchLabels


def _ivf_training_sample(shard: MemoryShard, sizes: list[int], nlist: int, seed: int) -> Tensor:
    """A seeded sample of ``min(M, 256 nlist)`` memory rows, in global order, gathered from every rank."""
    total = sum(sizes)
    count = min(total, 256 * nlist)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    offset = sum(sizes[: distributed.get_rank()])
    local_rows = chosen[(chosen >= offset) & (chosen < offset + shard.features.shape[0])] - offset
    local = shard.features[local_rows].to(_comm_device())
    return distributed.all_gather_varlen(local).cpu()


def _local_index(
    shard: MemoryShard, sizes: list[int], cfg: DenseNNConfig, device: torch.device
) -> LocalIndex:
    """This rank's index of its own shard: torch (on ``device``) or faiss (IVF: globally trained lists)."""
    dim = shard.features.shape[1]
    if cfg.index == "torch":
        local: TorchShardIndex | PatchIndex = TorchShardIndex(dim, device, MEMORY_DTYPES[cfg.memory_dtype])
    else:
        nlist = (cfg.nlist or default_nlist(sum(sizes))) if cfg.index == "ivf" else 1
        local = PatchIndex(dim, cfg.index, nlist, cfg.nprobe)
        if not local.is_trained:
            # Every rank trains the same quantiser on the same global sample, so the lists agree.
            local.train(_ivf_training_sample(shard, sizes, nlist, cfg.seed))
    for start in range(0, shard.features.shape[0], _ASSEMBLY_CHUNK_ROWS):
        local.add(shard.features[start : start + _ASSEMBLY_CHUNK_ROWS])
    return local
