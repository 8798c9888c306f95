"""Cycle-consistent cross-image nearest neighbours from the memory bank (CrIBo, docs/method.md, Sec. 8).

With ``x^`` the L2-normalised ``x``, current objects ``c^1_i``, ``c^2_i`` (i < M, this rank only) and
valid bank slots ``q^1_r``, ``q^2_r``:

    j1(i) = argmax_r <c^1_i^, q^1_r^>          m1_i = [ argmax_l <q^2_{j1(i)}^, c^2_l^> == i ]
    j2(i) = argmax_r <c^2_i^, q^2_r^>          m2_i = [ argmax_l <q^1_{j2(i)}^, c^1_l^> == i ]

The back-search runs over all M current objects of this rank's batch. A retrieved object is accepted
only if its own other view points back to the query's other view.

The bank is searched chunk by chunk with a running arg-max, in float32, dividing each chunk's scores by
the bank vectors' norms: no normalised copy of the bank (not even of a chunk) and no similarity matrix
larger than (M, chunk_size) is ever built (the reference materialises (M, bank) in fp16 under autocast,
where near-ties flip the top-1, docs/differences.md, difference 11).
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


def _chunked_argmax(
    queries1: torch.Tensor, queries2: torch.Tensor, bank: CentroidMemoryBank, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 bank slot per query and view: ``j_v(i) = argmax_r <queries_v[i], q^v_r^>``.

    Args:
        queries1: (M, D) normalised float32 view-1 queries.
        queries2: (M, D) normalised float32 view-2 queries.
        bank: non-empty memory bank.
        chunk_size: slots per chunk.

    Returns:
        ``(j1, j2)``, (M,) long slot indices each. Exact ties keep the earlier slot in iteration order.
    """
    num_objects = queries1.shape[0]
    best = [torch.full((num_objects,), -float("inf"), device=queries1.device) for _ in range(2)]
    index = [torch.zeros(num_objects, dtype=torch.long, device=queries1.device) for _ in range(2)]
    for chunk in bank.iter_chunks(chunk_size):
        for v, (queries, keys) in enumerate(((queries1, chunk.view1), (queries2, chunk.view2))):
            keys = keys.to(device=queries.device, dtype=torch.float32)  # a view: the bank is float32
            # <q, k / max(||k||, eps)> = <q, k> / max(||k||, eps) (F.normalize's eps): dividing the
            # (M, n) scores instead of normalising the keys never writes an (n, D) copy of the bank.
            scores = (queries @ keys.T).div_(torch.linalg.vector_norm(keys, dim=1).clamp_min_(1e-12))
            chunk_best, chunk_arg = scores.max(dim=1)
            del scores  # free this block before the next one is allocated
            better = chunk_best > best[v]
            best[v] = torch.where(better, chunk_best, best[v])
            index[v] = torch.where(better, chunk.slots.to(queries.device)[chunk_arg], index[v])
    return index[0], index[1]


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
        chunk_size: bank slots per similarity block; peak extra memory is about M * chunk_size floats.

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
        queries1 = F.normalize(c1.float(), dim=1)
        queries2 = F.normalize(c2.float(), dim=1)
        j1, j2 = _chunked_argmax(queries1, queries2, bank, chunk_size)

        # Cycle: the neighbour's other-view slot must point back to the query among all current objects.
        back1 = F.normalize(bank.gather_slots(2, j1).to(device).float(), dim=1)
        back2 = F.normalize(bank.gather_slots(1, j2).to(device).float(), dim=1)
        own = torch.arange(num_objects, device=device)
        mask1 = (back1 @ queries2.T).argmax(dim=1) == own
        mask2 = (back2 @ queries1.T).argmax(dim=1) == own

    return NeighbourResult(
        neighbours1=bank.gather_slots(1, j1).to(device),
        neighbours2=bank.gather_slots(2, j2).to(device),
        mask1=mask1,
        mask2=mask2,
        index1=j1,
        index2=j2,
    )
