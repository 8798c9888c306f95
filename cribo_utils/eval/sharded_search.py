"""Exact top-k cosine search over a memory sharded across ranks (dense NN retrieval, protocol A.4).

Each rank holds only its contiguous part of the memory: rows ``[offset_r, offset_r + m_r)`` of the global
order, so the features of an M-entry memory cost ``M / W`` per process instead of ``M`` (10 million ViT-S
patches are 15 GB of float32). A search is a collective: every rank calls :meth:`ShardedIndex.search`
the same number of times, with its own (possibly empty) batch of queries.

1. The queries of all ranks are gathered: ``Q = cat_r Q_r`` (sum_r Q_r rows).
2. Each rank finds the top-k of every query in its shard with a local index and turns its row numbers
   into global ids (``+ offset_r``); a shard with fewer than k rows pads with (-inf, -1).
3. The W candidate lists are gathered and merged: for query q the answer is the k best of the W * k
   candidates, ties broken by the smaller global id; each rank keeps the rows of its own queries.

The merge is exact: the global top-k of q is contained in the union of the shards' top-k. Because ties
are broken by global id and the shards are contiguous in global order, the neighbours do not depend on
W (up to the rounding of the similarities themselves).

Local indexes: :class:`TorchShardIndex` (exact; chunked matrix products and ``topk`` on the compute
device, so a GPU node searches on its GPU) and the faiss ones in :mod:`cribo_utils.eval.dense_nn`
(``IndexFlatIP``, or ``IndexIVFFlat`` for an approximate search), used through the same protocol.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import torch
from torch import Tensor

from cribo_utils.runtime import distributed

logger = logging.getLogger(__name__)

#: Bytes of one (query chunk x memory chunk) similarity block of the torch search.
SIMILARITY_BLOCK_BYTES = 256 * 2**20


class LocalIndex(Protocol):
    """What :class:`ShardedIndex` needs from the index of one shard."""

    def __len__(self) -> int: ...

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]: ...


def merge_top_k(similarities: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best candidates per row, by decreasing similarity, ties broken by increasing id.

    Args:
        similarities: (Q, C) candidate similarities (-inf for padding).
        ids: (Q, C) int64 candidate ids (-1 for padding).
        k: neighbours kept, at most C.
    Returns:
        ``(similarities (Q, k), ids (Q, k))``.
    """
    by_id = ids.masked_fill(ids < 0, torch.iinfo(torch.int64).max).argsort(dim=1, stable=True)
    similarities, ids = similarities.gather(1, by_id), ids.gather(1, by_id)
    order = similarities.argsort(dim=1, descending=True, stable=True)[:, :k]
    return similarities.gather(1, order), ids.gather(1, order)


def block_top_k(block: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of a similarity block, ties at the k-th value broken by the smaller column.

    ``topk`` chooses arbitrarily among equal values, and equal similarities are common (a conv net gives
    identical features to identical image regions); rows whose k-th value is tied with an unselected
    entry are therefore redone with a stable sort, so the result is the k best by (value desc, column asc).

    Args:
        block: (Q, n) similarities.
        k: at most n.
    Returns:
        ``(values (Q, k), columns (Q, k))``.
    """
    if k == 0 or k == block.shape[1]:
        return block.sort(dim=1, descending=True, stable=True) if k else block.topk(0, dim=1)
    # The k-th value is tied with an unselected entry exactly when the (k+1)-th largest equals it; reading
    # it from a top-(k+1) needs no (Q, n) temporary.
    values, columns = block.topk(k + 1, dim=1)
    tied = values[:, k] == values[:, k - 1]
    values, columns = values[:, :k], columns[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        exact_values, exact_columns = block[rows].sort(dim=1, descending=True, stable=True)
        values[rows], columns[rows] = exact_values[:, :k], exact_columns[:, :k]
    return values, columns


def _pad_to_k(similarities: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    missing = k - similarities.shape[1]
    if missing <= 0:
        return similarities, ids
    pad = (similarities.shape[0], missing)
    return (
        torch.cat([similarities, similarities.new_full(pad, -math.inf)], dim=1),
        torch.cat([ids, ids.new_full(pad, -1)], dim=1),
    )


class TorchShardIndex:
    """Exact inner-product search over this rank's (m, D) unit features, on ``device``.

    ``search`` computes ``S = queries @ features^T`` block by block (memory chunks of
    ``SIMILARITY_BLOCK_BYTES / (4 max(Q, D))`` rows, within each added part), keeps each block's top-k and
    merges them, so no (Q, m) matrix is ever formed. Products are always float32: a float16 index stores the
    features rounded to half precision (half the memory) and upcasts one block at a time.

    A part added with the index's own device and dtype is kept as is, without a copy (a view of the
    caller's tensor): a CPU index over a float16 extraction buffer costs no second copy of the shard.

    Args:
        dim: D.
        device: where the features live and the products run (the evaluation's device).
        dtype: storage dtype, float32 (the similarities of the faiss reference) or float16.
    """

    def __init__(
        self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype
        self._parts: list[Tensor] = []

    def add(self, features: Tensor) -> None:
        """Append (n, D) unit vectors; their local row numbers continue from ``len(self)``."""
        if features.shape[0]:
            self._parts.append(features.to(self.device, self.dtype))

    @property
    def features(self) -> Tensor:
        """(m, D) a concatenated copy of the stored features (for inspection; the search does not use it)."""
        if not self._parts:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat(self._parts)

    def __len__(self) -> int:
        return sum(part.shape[0] for part in self._parts)

    def nbytes(self) -> int:
        """Bytes of the stored features."""
        return sum(part.numel() * part.element_size() for part in self._parts)

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k inner products of (Q, D) queries: ``(similarities (Q, k'), local ids (Q, k'))``,
        k' = min(k, m), on this index's device, similarities descending (ties: smaller id first).

        The added parts are searched in place (never concatenated), so the search needs no second copy
        of the shard, only one similarity block."""
        queries = queries.to(self.device, torch.float32)
        k = min(k, len(self))
        best_similarities = torch.empty(queries.shape[0], 0, device=self.device)
        best_ids = torch.empty(queries.shape[0], 0, dtype=torch.long, device=self.device)
        if k == 0 or queries.shape[0] == 0:
            return best_similarities, best_ids
        # A block of memory rows is at most SIMILARITY_BLOCK_BYTES as similarities and as float32 rows.
        rows_per_block = max(k, SIMILARITY_BLOCK_BYTES // (4 * max(queries.shape[0], self.dim)))
        part_offset = 0
        for part in self._parts:
            for start in range(0, part.shape[0], rows_per_block):
                block = queries @ part[start : start + rows_per_block].float().T
                values, indices = block_top_k(block, min(k, block.shape[1]))
                del block  # before the next product: one block at a time
                best_similarities = torch.cat([best_similarities, values.float()], dim=1)
                best_ids = torch.cat([best_ids, indices + part_offset + start], dim=1)
                best_similarities, best_ids = merge_top_k(best_similarities, best_ids, k)
            part_offset += part.shape[0]
        return best_similarities, best_ids


class ShardedIndex:
    """A memory split into contiguous per-rank shards, searched exactly across ranks (see module doc).

    Args:
        local: this rank's index (rows ``[offset, offset + len(local))`` of the memory).
        shard_sizes: rows held by each rank, in rank order (identical on every rank).
        comm_device: the device collectives run on (CUDA for NCCL, CPU for gloo).
    """

    def __init__(self, local: LocalIndex, shard_sizes: list[int], comm_device: torch.device) -> None:
        if len(shard_sizes) != distributed.get_world_size():
            raise ValueError(f"{len(shard_sizes)} shard sizes for a world of {distributed.get_world_size()}")
        if len(local) != shard_sizes[distributed.get_rank()]:
            raise ValueError(
                f"the local index holds {len(local)} rows, expected {shard_sizes[distributed.get_rank()]}"
            )
        self.local = local
        self.shard_sizes = list(shard_sizes)
        self.offset = sum(shard_sizes[: distributed.get_rank()])
        self.comm_device = comm_device

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Global top-k of this rank's (Q_r, D) queries (collective: every rank calls it, Q_r may be 0).

        Returns:
            ``(similarities (Q_r, k), global ids (Q_r, k))`` on the CPU; ids -1 (similarity -inf) only when
            the whole memory, or an IVF probe, has fewer than k candidates.
        """
        if distributed.get_world_size() == 1:
            similarities, ids = self.local.search(queries, k)
            similarities, ids = _pad_to_k(similarities.cpu().float(), ids.cpu().long(), k)
            return similarities, ids
        counts = distributed.all_gather_fixed(torch.tensor([queries.shape[0]], device=self.comm_device))
        counts_list = [int(c) for c in counts.tolist()]
        all_queries = distributed.all_gather_varlen(queries.to(self.comm_device, torch.float32).contiguous())
        similarities, ids = self.local.search(all_queries, k)
        similarities, ids = _pad_to_k(similarities.float(), ids.long(), k)
        ids = torch.where(ids >= 0, ids + self.offset, ids)
        # (W * sum_r Q_r, k) -> (sum_r Q_r, W * k): every rank's candidates side by side.
        gathered_similarities = distributed.all_gather_fixed(similarities.to(self.comm_device).contiguous())
        gathered_ids = distributed.all_gather_fixed(ids.to(self.comm_device).contiguous())
        total = all_queries.shape[0]
        candidates_similarities = gathered_similarities.view(-1, total, k).permute(1, 0, 2).reshape(total, -1)
        candidates_ids = gathered_ids.view(-1, total, k).permute(1, 0, 2).reshape(total, -1)
        start = sum(counts_list[: distributed.get_rank()])
        stop = start + counts_list[distributed.get_rank()]
        merged = merge_top_k(candidates_similarities[start:stop].cpu(), candidates_ids[start:stop].cpu(), k)
        return merged
