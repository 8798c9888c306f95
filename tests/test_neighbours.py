"""Tests for cribo_utils/method/neighbours.py: hand-made cycle cases and chunked == brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cribo_utils.method.memory_bank import CentroidMemoryBank
from cribo_utils.method.neighbours import find_cycle_consistent_neighbours

CHUNK_SIZES = [1, 2, 3, 65536]


def basis(index: int, dim: int = 12) -> torch.Tensor:
    return F.one_hot(torch.tensor(index), dim).float()


def current_objects() -> tuple[torch.Tensor, torch.Tensor]:
    """Four objects: view 1 = e_0..e_3, view 2 = e_4..e_7 (dims 8..11 are left for junk)."""
    return torch.stack([basis(i) for i in range(4)]), torch.stack([basis(4 + i) for i in range(4)])


def bank_holding(view1: torch.Tensor, view2: torch.Tensor) -> CentroidMemoryBank:
    """A bank whose valid part is junk (orthogonal to every query) plus the given entries, wrapped around
    the end of the slot ring so that the search crosses the ring boundary."""
    bank = CentroidMemoryBank(queue_size=6, n_tokens=2, dim=12)
    junk = torch.stack([basis(8 + i % 4) for i in range(10)])
    bank.push(junk, junk, torch.full((5,), 2))  # slots 0..9
    bank.push(view1, view2, torch.ones(view1.shape[0], dtype=torch.long))  # wraps to slots 10, 11, 0, 1
    assert bank.num_objects == 4 + view1.shape[0] and int(bank.slot_head) < 4
    return bank


def brute_force(
    c1: torch.Tensor, c2: torch.Tensor, bank: CentroidMemoryBank
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Literal Sec. 8 with the whole valid bank as one matrix and a Python loop for the cycle test."""
    slots = bank.valid_slots()
    q1, q2 = F.normalize(bank.view(1), dim=1), F.normalize(bank.view(2), dim=1)
    n1, n2 = F.normalize(c1.float(), dim=1), F.normalize(c2.float(), dim=1)
    j1 = (n1 @ q1.T).argmax(dim=1)
    j2 = (n2 @ q2.T).argmax(dim=1)
    m1, m2 = [], []
    for i in range(c1.shape[0]):
        m1.append(int(torch.argmax(n2 @ q2[j1[i]])) == i)
        m2.append(int(torch.argmax(n1 @ q1[j2[i]])) == i)
    return slots[j1], slots[j2], torch.tensor(m1), torch.tensor(m2)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_exact_copies_are_all_accepted_and_returned_raw(chunk_size: int) -> None:
    c1, c2 = current_objects()
    bank = bank_holding(3.0 * c1, 0.5 * c2)  # scaled copies: the search is on cosine, neighbours are raw
    result = find_cycle_consistent_neighbours(c1, c2, bank, chunk_size=chunk_size)
    assert result.mask1.tolist() == [True] * 4 and result.mask2.tolist() == [True] * 4
    assert torch.equal(result.neighbours1, 3.0 * c1) and torch.equal(result.neighbours2, 0.5 * c2)
    assert torch.equal(result.index1, result.index2)
    assert torch.equal(bank.gather_slots(1, result.index1), 3.0 * c1)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_swapping_two_view2_slots_fails_exactly_those_in_both_directions(chunk_size: int) -> None:
    c1, c2 = current_objects()
    swapped = c2[[0, 2, 1, 3]]
    result = find_cycle_consistent_neighbours(c1, c2, bank_holding(c1, swapped), chunk_size=chunk_size)
    assert result.mask1.tolist() == [True, False, False, True]
    assert result.mask2.tolist() == [True, False, False, True]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_mismatched_view2_slot_fails_direction_1_only(chunk_size: int) -> None:
    """Entry 0 = (e_0, e_5 + 0.1 e_4). Direction 1: j1(0) = entry 0 (cos 1), whose view 2 is nearest to
    c2_1 = e_5 (cos 0.995 vs 0.0995): m1_0 False. Direction 2: c2_0 = e_4 has cos 0.0995 with entry 0
    and 0 with every other slot, so j2(0) = entry 0 and its view 1 e_0 points back to object 0: m2_0 True.
    Object 1 still finds its own exact copy first (cos 1 > 0.995)."""
    c1, c2 = current_objects()
    view2 = c2.clone()
    view2[0] = basis(5) + 0.1 * basis(4)
    result = find_cycle_consistent_neighbours(c1, c2, bank_holding(c1, view2), chunk_size=chunk_size)
    assert result.mask1.tolist() == [False, True, True, True]
    assert result.mask2.tolist() == [True, True, True, True]
    assert torch.equal(result.neighbours2[0], view2[0])  # found from view 2, returned in its view-2 slot


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_mismatched_view1_slot_fails_direction_2_only(chunk_size: int) -> None:
    c1, c2 = current_objects()
    view1 = c1.clone()
    view1[0] = basis(1) + 0.1 * basis(0)
    result = find_cycle_consistent_neighbours(c1, c2, bank_holding(view1, c2), chunk_size=chunk_size)
    assert result.mask1.tolist() == [True, True, True, True]
    assert result.mask2.tolist() == [False, True, True, True]
    assert torch.equal(result.neighbours1[0], view1[0])


def test_empty_bank_gives_no_neighbour() -> None:
    c1, c2 = current_objects()
    result = find_cycle_consistent_neighbours(c1, c2, CentroidMemoryBank(queue_size=4, n_tokens=2, dim=12))
    assert not result.mask1.any() and not result.mask2.any()
    assert torch.count_nonzero(result.neighbours1) == 0 and result.neighbours2.shape == (4, 12)
    assert result.index1.tolist() == [-1] * 4


def test_no_current_object() -> None:
    c1, c2 = current_objects()
    result = find_cycle_consistent_neighbours(torch.zeros(0, 12), torch.zeros(0, 12), bank_holding(c1, c2))
    assert result.mask1.shape == (0,) and result.neighbours1.shape == (0, 12)


def random_bank_and_queries(seed: int) -> tuple[torch.Tensor, torch.Tensor, CentroidMemoryBank]:
    """Several pushes (wrapped ring); half of the current objects have noisy copies in the bank, so the
    masks contain both values."""
    generator = torch.Generator().manual_seed(seed)
    dim, n_tokens = 16, 3
    c1 = torch.randn(20, dim, generator=generator)
    c2 = torch.randn(20, dim, generator=generator)
    bank = CentroidMemoryBank(queue_size=12, n_tokens=n_tokens, dim=dim)
    for step in range(5):
        counts = torch.randint(0, n_tokens + 1, (4,), generator=generator)
        n = int(counts.sum())
        noisy = torch.randint(0, 20, (n,), generator=generator)
        scale = 0.3 * (step + 1)
        bank.push(
            c1[noisy] + scale * torch.randn(n, dim, generator=generator),
            c2[noisy] + scale * torch.randn(n, dim, generator=generator),
            counts,
        )
    return c1, c2, bank


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_search_equals_brute_force(seed: int) -> None:
    c1, c2, bank = random_bank_and_queries(seed)
    index1, index2, mask1, mask2 = brute_force(c1, c2, bank)
    assert mask1.any() and not mask1.all() and mask2.any() and not mask2.all()
    for chunk_size in (1, 3, 7, 16, 1000):
        result = find_cycle_consistent_neighbours(c1, c2, bank, chunk_size=chunk_size)
        assert torch.equal(result.index1, index1) and torch.equal(result.index2, index2)
        assert torch.equal(result.mask1, mask1) and torch.equal(result.mask2, mask2)
        assert torch.equal(result.neighbours1, bank.gather_slots(1, index1))
        assert torch.equal(result.neighbours2, bank.gather_slots(2, index2))


def test_half_precision_queries_are_searched_in_float32() -> None:
    c1, c2, bank = random_bank_and_queries(3)
    c1, c2 = c1.half(), c2.half()
    result = find_cycle_consistent_neighbours(c1, c2, bank, chunk_size=5)
    index1, index2, mask1, mask2 = brute_force(c1.float(), c2.float(), bank)
    assert torch.equal(result.index1, index1) and torch.equal(result.mask2, mask2)
    assert result.neighbours1.dtype == torch.float32


def test_shape_errors() -> None:
    bank = CentroidMemoryBank(queue_size=4, n_tokens=2, dim=12)
    with pytest.raises(ValueError, match="bank has 12"):
        find_cycle_consistent_neighbours(torch.zeros(3, 5), torch.zeros(3, 5), bank)
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        find_cycle_consistent_neighbours(torch.zeros(3, 12), torch.zeros(2, 12), bank)
