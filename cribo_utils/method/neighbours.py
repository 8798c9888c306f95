"""Cycle-consistent cross-image nearest neighbours from the memory bank (CrIBo, docs/method.md, Sec. 8).

With ``x^`` the L2-normalised ``x``, current objects ``c^1_i``, ``c^2_i`` (i < M, this rank only) and
valid bank slots ``q^1_r``, ``q^2_r``:

    j1(i) = argmax_r <c^1_i^, q^1_r^>          m1_i = [ argmax_l <q^2_{j1(i)}^, c^2_l^> == i ]
    j2(i) = argmax_r <c^2_i^, q^2_r^>          m2_i = [ argmax_l <q^1_{j2(i)}^, c^1_l^> == i ]

The back-search runs over all M current objects of this rank's batch. A retrieved object is accepted
only if its own other view points back to the query's other view.

The bank is searched chunk by chunk with a running arg-max, both views in one batched product, in float32,
dividing each chunk's scores by the bank vectors' norms: no normalised copy of the bank (not even of a
chunk) and no similarity block of more than M * chunk_size scores is ever built (the reference
materialises (M, bank) in fp16 under autocast, where near-ties flip the top-1,
docs/differences.md, difference 11).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cribo_utils.method.memory_bank import CentroidMemoryBank

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeighbourResult:
    """Neighbours of the current objects and their cycle-consistency masks.

    Attributes:
        neighbours1: (M, D) raw bank view-1 vectors ``q^1_{j1(i)}`` (found from view 1).
        neighbours2: (M, D) raw bank view-2 vectors ``q^2_{j2(i)}`` (found from view 2).
        mask1: (M,) bool, ``m1`` (all False when the bank is empty).
        mask2: (M,) bool, ``m2``.
        index1: (M,) long bank slots ``j1`` (-1 when the bank is empty).
        index2: (M,) long bank slots ``j2``.
    """

    neighbours1: torch.Tensor
    neighbours2: torch.Tensor
    mask1: torch.Tensor
    mask2: torch.Tensor
    index1: torch.Tensor
    index2: torch.Tensor


def _empty_result(num_objects: int, dim: int, device: torch.device) -> NeighbourResult:
    zeros = torch.zeros(num_objects, dim, device=device)
    no_mask = torch.zeros(num_objects, dtype=torch.bool, device=device)
    no_index = torch.full((num_objects,), -1, dtype=torch.long, device=device)
    return NeighbourResult(zeros, zeros.clone(), no_mask, no_mask.clone(), no_index, no_index.clone())


def _chunked_argmax(queries: torch.Tensor, bank: CentroidMemoryBank, chunk_size: int) -> torch.Tensor:
    """Top-1 bank slot per query and view: ``j_v(i) = argmax_r <queries[v, i], q^v_r^>``.

    Both views are searched together, one batched product per chunk of ``chunk_size / 2`` contiguous
    slots, so that a chunk's scores (2, M, chunk_size / 2) take what one view's (M, chunk_size) took.

    Args:
        queries: (2, M, D) normalised float32 queries, view 1 then view 2.
        bank: non-empty memory bank.
        chunk_size: bank vectors per chunk, half from each view.

    Returns:
        (2, M) long slot indices ``(j1, j2)``. Exact ties keep the earlier slot in iteration order.
    """
    best = index = None
    for start, stop in bank.chunk_ranges(max(1, chunk_size // 2)):
        keys = bank.slot_range(start, stop).to(device=queries.device, dtype=torch.float32)  # (2, n, D) view
        # <q, k / max(||k||, eps)> = <q, k> / max(||k||, eps) (F.normalize's eps): dividing the (2, M, n)
        # scores instead of normalising the keys never writes a copy of the bank.
        norms = torch.linalg.vector_norm(keys, dim=2).clamp_min_(1e-12)
        scores = torch.bmm(queries, keys.transpose(1, 2)).div_(norms.unsqueeze(1))
        chunk_best, chunk_arg = scores.max(dim=2)
        del scores  # free this block before the next one is allocated
        chunk_index = chunk_arg.add_(start) if start else chunk_arg
        if best is None or index is None:
            best, index = chunk_best, chunk_index
        else:
            better = chunk_best > best
            best = torch.where(better, chunk_best, best)
            index = torch.where(better, chunk_index, index)
    assert index is not None, "_chunked_argmax: the bank is empty"
    return index


@torch.no_grad()
def find_cycle_consistent_neighbours(
    c1: torch.Tensor, c2: torch.Tensor, bank: CentroidMemoryBank, chunk_size: int = 65536
) -> NeighbourResult:
    """Retrieve each object's nearest bank object per view and apply the cycle-consistency test.

    Equations in the module docstring (docs/method.md, Sec. 8). Call it before ``bank.push`` of the current
    batch, so that an object never retrieves itself.

    Args:
        c1: (M, D) teacher view-1 object representations of this rank (any float dtype).
        c2: (M, D) teacher view-2 representations, row i the same object as row i of ``c1``.
        bank: the memory bank (searched over its valid slots only).
        chunk_size: bank vectors per similarity block (half from each view); peak extra memory is about
            M * chunk_size floats.

    Returns:
        ``NeighbourResult``; with an empty bank, zero neighbours, all-False masks and index -1.
    """
    if c1.ndim != 2 or c1.shape != c2.shape:
        raise ValueError(
            f"find_cycle_consistent_neighbours: c1 {tuple(c1.shape)} and c2 {tuple(c2.shape)} must both "
            "be (M, D)."
        )
    if c1.shape[1] != bank.dim:
        raise ValueError(
            f"find_cycle_consistent_neighbours: objects have D={c1.shape[1]}, bank has {bank.dim}."
        )
    num_objects, device = c1.shape[0], c1.device
    if bank.is_empty or num_objects == 0:
        return _empty_result(num_objects, bank.dim, device)

    with torch.autocast(device_type=device.type, enabled=False):
        queries = F.normalize(torch.stack((c1, c2)).float(), dim=2)  # (2, M, D)
        index = _chunked_argmax(queries, bank, chunk_size)  # (2, M): j1, j2

        # Cycle: the neighbour's other-view slot must point back to the query among all current objects.
        # back[v] is compared with the queries of view v: back[0] = q^1_{j2}, back[1] = q^2_{j1}.
        back = F.normalize(bank.gather_views(index.flip(0)).to(device).float(), dim=2)
        points_back = torch.bmm(back, queries.transpose(1, 2)).argmax(dim=2)  # (2, M)
        masks = (points_back == torch.arange(num_objects, device=device)).flip(0)  # (m1, m2)
        neighbours = bank.gather_views(index).to(device)  # q^1_{j1}, q^2_{j2}

    return NeighbourResult(
        neighbours1=neighbours[0],
        neighbours2=neighbours[1],
        mask1=masks[0],
        mask2=masks[1],
        index1=index[0],
        index2=index[1],
    )
