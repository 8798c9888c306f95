"""Tests for cribo_utils/method/memory_bank.py against a literal copy of the reference's queue update."""

from __future__ import annotations

import pytest
import torch
from ddp_helpers import run_distributed

from cribo_utils.method.memory_bank import CentroidMemoryBank
from cribo_utils.runtime import distributed

# --------------------------------------------------------------------------------------------------
# Reference behaviour, written as literally as possible: prepend the new batch, truncate the old one.
# --------------------------------------------------------------------------------------------------


def reference_update(
    centroids_queue: torch.Tensor,
    cpv_queue: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's queue update (docs/method.md, Sec. 7): keep the first Q new images if G >= Q, then
    prepend new counts / objects to the newest Q - G old ones. Slots after the valid part keep stale data."""
    queue_size = cpv_queue.numel()
    n_new = counts.numel()
    if n_new >= queue_size:
        counts = counts[:queue_size]
        n_kept = int(counts.sum())
        c1, c2 = c1[:n_kept], c2[:n_kept]
        n_new = queue_size
    old_counts = cpv_queue[: queue_size - n_new]
    n_old_objects = int(old_counts.sum())
    new_cpv = torch.cat([counts, old_counts])
    valid = torch.cat([torch.stack([c1, c2]), centroids_queue[:, :n_old_objects]], dim=1)
    new_queue = centroids_queue.clone()
    new_queue[:, : valid.shape[1]] = valid
    return new_queue, new_cpv


def assert_matches_reference(bank: CentroidMemoryBank, queue: torch.Tensor, cpv: torch.Tensor) -> None:
    layout = bank.to_reference_layout()
    n_valid = int(cpv.sum())
    assert torch.equal(layout["cpv_queue_cpu"], cpv)
    assert torch.equal(layout["centroids_queue_cpu"][:, :n_valid], queue[:, :n_valid])
    assert torch.count_nonzero(layout["centroids_queue_cpu"][:, n_valid:]) == 0
    assert bank.num_objects == n_valid
    assert torch.equal(bank.view(1), queue[0, :n_valid]) and torch.equal(bank.view(2), queue[1, :n_valid])


def random_batch(
    generator: torch.Generator, n_images: int, n_tokens: int, dim: int, label: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objects whose values are unique (label + index), so any misplacement shows."""
    counts = torch.randint(0, n_tokens + 1, (n_images,), generator=generator)
    n_objects = int(counts.sum())
    base = label + torch.arange(n_objects, dtype=torch.float32)[:, None] + torch.zeros(n_objects, dim)
    c1 = base + torch.rand(n_objects, dim, generator=generator) * 0.1
    return c1, -c1 - 1000.0, counts


# --------------------------------------------------------------------------------------------------
# Single process
# --------------------------------------------------------------------------------------------------


def test_starts_empty() -> None:
    bank = CentroidMemoryBank(queue_size=4, n_tokens=3, dim=2)
    assert bank.is_empty and not bank.is_full and bank.num_images == 0 and bank.num_objects == 0
    assert list(bank.iter_chunks(5)) == []
    layout = bank.to_reference_layout()
    assert layout["centroids_queue_cpu"].shape == (2, 12, 2) and layout["cpv_queue_cpu"].shape == (4,)
    assert (
        torch.count_nonzero(layout["centroids_queue_cpu"]) == 0
        and torch.count_nonzero(layout["cpv_queue_cpu"]) == 0
    )


def test_hand_checked_fifo() -> None:
    """Q=3, K=2, D=1. Push A(2), B(1); then C(2), D(2): newest first C, D, A (B, the oldest, falls off)."""
    bank = CentroidMemoryBank(queue_size=3, n_tokens=2, dim=1)
    a0, a1, b0, c0, c1_, d0, d1 = 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0
    bank.push(torch.tensor([[a0], [a1], [b0]]), -torch.tensor([[a0], [a1], [b0]]), torch.tensor([2, 1]))
    layout = bank.to_reference_layout()
    assert layout["cpv_queue_cpu"].tolist() == [2, 1, 0]
    assert layout["centroids_queue_cpu"][0, :, 0].tolist() == [a0, a1, b0, 0, 0, 0]
    assert layout["centroids_queue_cpu"][1, :3, 0].tolist() == [-a0, -a1, -b0]
    bank.push(torch.tensor([[c0], [c1_], [d0], [d1]]), torch.zeros(4, 1), torch.tensor([2, 2]))
    layout = bank.to_reference_layout()
    assert layout["cpv_queue_cpu"].tolist() == [2, 2, 2]
    assert layout["centroids_queue_cpu"][0, :, 0].tolist() == [c0, c1_, d0, d1, a0, a1]
    assert bank.is_full and bank.num_objects == 6


@pytest.mark.parametrize(("queue_size", "n_tokens", "max_images"), [(5, 3, 3), (4, 2, 4), (7, 3, 2)])
def test_fifo_matches_reference_update_with_wraparound(
    queue_size: int, n_tokens: int, max_images: int
) -> None:
    dim = 3
    generator = torch.Generator().manual_seed(queue_size)
    bank = CentroidMemoryBank(queue_size, n_tokens, dim)
    ref_queue = torch.zeros(2, queue_size * n_tokens, dim)
    ref_cpv = torch.zeros(queue_size, dtype=torch.long)
    storage = bank.centroids.data_ptr()
    pushed = 0
    for step in range(25):  # many turnovers of both rings
        n_images = int(torch.randint(1, max_images + 1, (1,), generator=generator))
        c1, c2, counts = random_batch(generator, n_images, n_tokens, dim, label=100.0 * step)
        bank.push(c1, c2, counts)
        ref_queue, ref_cpv = reference_update(ref_queue, ref_cpv, c1, c2, counts)
        assert_matches_reference(bank, ref_queue, ref_cpv)
        pushed += n_images
        assert bank.num_images == min(queue_size, pushed)
        assert torch.equal(bank.counts_newest_first(), ref_cpv[: bank.num_images])
        assert bank.centroids.data_ptr() == storage  # updated in place, never rebuilt
    assert bank.is_full and int(bank.step) == 25


def test_images_without_objects_take_an_entry() -> None:
    bank = CentroidMemoryBank(queue_size=3, n_tokens=2, dim=1)
    bank.push(torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([0, 1, 0]))
    assert bank.num_images == 3 and bank.num_objects == 1 and bank.is_full
    assert bank.to_reference_layout()["cpv_queue_cpu"].tolist() == [0, 1, 0]
    bank.push(torch.tensor([[2.0], [3.0]]), torch.zeros(2, 1), torch.tensor([2]))
    assert bank.to_reference_layout()["cpv_queue_cpu"].tolist() == [2, 0, 1]
    assert bank.view(1)[:, 0].tolist() == [2.0, 3.0, 1.0]


def test_iter_chunks_cover_the_valid_wrapped_range_without_copies() -> None:
    generator = torch.Generator().manual_seed(1)
    bank = CentroidMemoryBank(queue_size=4, n_tokens=3, dim=2)
    for step in range(7):
        bank.push(*random_batch(generator, 2, 3, 2, label=10.0 * step))
    valid = bank.valid_slots()
    for chunk_size in (1, 2, 5, 100):
        chunks = list(bank.iter_chunks(chunk_size))
        slots = torch.cat([chunk.slots for chunk in chunks])
        assert sorted(slots.tolist()) == sorted(valid.tolist())
        for chunk in chunks:
            assert chunk.slots.numel() <= chunk_size
            assert torch.equal(
                chunk.slots, torch.arange(int(chunk.slots[0]), int(chunk.slots[0]) + chunk.slots.numel())
            )
            assert chunk.view1.untyped_storage().data_ptr() == bank.centroids.untyped_storage().data_ptr()
            assert torch.equal(chunk.view1, bank.gather_slots(1, chunk.slots))
            assert torch.equal(chunk.view2, bank.gather_slots(2, chunk.slots))
    with pytest.raises(ValueError, match="chunk_size"):
        next(bank.iter_chunks(0))


def test_overflow_keeps_a_random_ordered_subset_of_the_new_images() -> None:
    queue_size, n_tokens = 4, 2
    bank = CentroidMemoryBank(queue_size, n_tokens, dim=1, seed=3)
    bank.push(torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.tensor([1]))
    counts = torch.tensor([1, 2, 1, 2, 1, 2, 1, 2, 2, 1])  # G = 10 > Q = 4
    image_of_object = torch.repeat_interleave(torch.arange(10), counts)
    c1 = (image_of_object * 10 + torch.cat([torch.arange(int(n)) for n in counts])).float()[:, None]
    bank.push(c1, c1 + 0.5, counts)
    layout = bank.to_reference_layout()
    kept_counts = layout["cpv_queue_cpu"]
    kept_objects = layout["centroids_queue_cpu"][0, : int(kept_counts.sum()), 0]
    kept_images = (kept_objects[kept_objects % 10 == 0] // 10).long()
    assert bank.num_images == queue_size and kept_images.numel() == queue_size
    assert torch.all(kept_images[1:] > kept_images[:-1])  # relative order preserved, no duplicates
    assert torch.equal(kept_counts, counts[kept_images])  # every kept image with its own objects
    expected = torch.cat(
        [kept_images[i] * 10 + torch.arange(int(counts[kept_images[i]])) for i in range(4)]
    ).float()
    assert torch.equal(kept_objects, expected)
    assert -1.0 not in kept_objects.tolist()  # all old images evicted
    assert torch.equal(layout["centroids_queue_cpu"][1, : expected.numel(), 0], expected + 0.5)
    # Same seed and step -> same subset; the subset is drawn, not the first Q (which the reference keeps).
    twin = CentroidMemoryBank(queue_size, n_tokens, dim=1, seed=3)
    twin.step.fill_(1)
    twin.push(c1, c1 + 0.5, counts)
    assert torch.equal(twin.to_reference_layout()["centroids_queue_cpu"], layout["centroids_queue_cpu"])
    subsets = set()
    for seed in range(8):
        other = CentroidMemoryBank(queue_size, n_tokens, dim=1, seed=seed)
        other.push(c1, c1 + 0.5, counts)
        subsets.add(
            tuple(other.to_reference_layout()["cpv_queue_cpu"].tolist() + other.view(1)[:, 0].tolist())
        )
    assert len(subsets) > 1


def test_exactly_q_new_images_replace_the_bank() -> None:
    bank = CentroidMemoryBank(queue_size=3, n_tokens=1, dim=1)
    bank.push(torch.tensor([[9.0]]), torch.tensor([[9.0]]), torch.tensor([1]))
    bank.push(torch.tensor([[1.0], [2.0], [3.0]]), torch.zeros(3, 1), torch.tensor([1, 1, 1]))
    assert bank.view(1)[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_state_dict_round_trip_continues_identically() -> None:
    generator = torch.Generator().manual_seed(2)
    bank = CentroidMemoryBank(queue_size=4, n_tokens=3, dim=2, seed=5)
    for step in range(6):
        bank.push(*random_batch(generator, 3, 3, 2, label=10.0 * step))
    state = bank.state_dict()
    assert {"centroids", "image_start", "image_count", "slot_head", "image_head", "step"} <= set(state)
    restored = CentroidMemoryBank(queue_size=4, n_tokens=3, dim=2, seed=5)
    restored.load_state_dict(state)
    assert int(restored.step) == 6
    for step in range(6, 9):  # includes overflow pushes (6 images > Q), which depend on the step counter
        batch = random_batch(generator, 6 if step == 7 else 2, 3, 2, label=10.0 * step)
        bank.push(*batch)
        restored.push(*batch)
        for key, value in bank.to_reference_layout().items():
            assert torch.equal(restored.to_reference_layout()[key], value)
    with pytest.raises(RuntimeError, match="size mismatch"):
        CentroidMemoryBank(queue_size=5, n_tokens=3, dim=2).load_state_dict(state)


def test_load_reference_layout_round_trip() -> None:
    generator = torch.Generator().manual_seed(3)
    bank = CentroidMemoryBank(queue_size=5, n_tokens=2, dim=2)
    for step in range(3):
        bank.push(*random_batch(generator, 2, 2, 2, label=10.0 * step))
    layout = bank.to_reference_layout()
    loaded = CentroidMemoryBank(queue_size=5, n_tokens=2, dim=2)
    loaded.load_reference_layout(layout)
    assert loaded.num_images == bank.num_images and loaded.num_objects == bank.num_objects
    ref_queue, ref_cpv = layout["centroids_queue_cpu"], layout["cpv_queue_cpu"]
    for step in range(3, 9):
        batch = random_batch(generator, 2, 2, 2, label=10.0 * step)
        bank.push(*batch)
        loaded.push(*batch)
        ref_queue, ref_cpv = reference_update(ref_queue, ref_cpv, *batch)
        assert_matches_reference(loaded, ref_queue, ref_cpv)
        assert torch.equal(
            loaded.to_reference_layout()["centroids_queue_cpu"],
            bank.to_reference_layout()["centroids_queue_cpu"],
        )


def test_load_reference_random_initialised_bank() -> None:
    """The reference starts with uniform random vectors and every count = K: trusted as Q full images."""
    queue_size, n_tokens, dim = 4, 3, 2
    ref_queue = torch.rand(2, queue_size * n_tokens, dim)
    ref_cpv = torch.full((queue_size,), n_tokens, dtype=torch.int32)
    bank = CentroidMemoryBank(queue_size, n_tokens, dim)
    bank.load_reference_layout({"centroids_queue_cpu": ref_queue, "cpv_queue_cpu": ref_cpv})
    assert bank.is_full and bank.num_objects == queue_size * n_tokens
    assert torch.equal(bank.view(1), ref_queue[0]) and torch.equal(bank.view(2), ref_queue[1])
    ref_cpv = ref_cpv.long()
    generator = torch.Generator().manual_seed(4)
    for step in range(4):
        batch = random_batch(generator, 3, n_tokens, dim, label=10.0 * step)
        bank.push(*batch)
        ref_queue, ref_cpv = reference_update(ref_queue, ref_cpv, *batch)
        assert_matches_reference(bank, ref_queue, ref_cpv)


def test_load_reference_layout_trailing_zeros_are_empty() -> None:
    bank = CentroidMemoryBank(queue_size=4, n_tokens=2, dim=1)
    queue = torch.arange(8.0).reshape(1, 8, 1).repeat(2, 1, 1)
    bank.load_reference_layout({"centroids_queue_cpu": queue, "cpv_queue_cpu": torch.tensor([2, 0, 1, 0])})
    assert bank.num_images == 3 and bank.num_objects == 3 and not bank.is_full
    assert bank.view(1)[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert bank.counts_newest_first().tolist() == [2, 0, 1]


def test_input_validation() -> None:
    bank = CentroidMemoryBank(queue_size=4, n_tokens=2, dim=3)
    with pytest.raises(ValueError, match="sum\\(counts\\)"):
        bank.push(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="n_tokens=2"):
        bank.push(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"\(M, 3\)"):
        bank.push(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([2]))
    with pytest.raises(ValueError, match="--queue_size"):
        bank.load_reference_layout(
            {"centroids_queue_cpu": torch.zeros(2, 10, 3), "cpv_queue_cpu": torch.zeros(5)}
        )
    with pytest.raises(KeyError, match="cpv_queue_cpu"):
        bank.load_reference_layout({"centroids_queue_cpu": torch.zeros(2, 8, 3)})
    with pytest.raises(ValueError, match="--queue_size"):
        CentroidMemoryBank(queue_size=0, n_tokens=2, dim=3)


def test_push_casts_half_inputs_and_ignores_autograd() -> None:
    bank = CentroidMemoryBank(queue_size=2, n_tokens=2, dim=2)
    c1 = torch.randn(2, 2, requires_grad=True)
    bank.push(c1.half(), c1.half() * 2, torch.tensor([2]))
    assert bank.centroids.dtype == torch.float32 and not bank.centroids.requires_grad
    assert torch.equal(bank.view(1), c1.detach().half().float())


# --------------------------------------------------------------------------------------------------
# Two real gloo ranks
# --------------------------------------------------------------------------------------------------

QUEUE, TOKENS, DIM = 6, 3, 2


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per-step local batches of one rank; rank 1 has no object in step 1; step 3 overflows (G = 8 > Q)."""
    generator = torch.Generator().manual_seed(100 + rank)
    batches = []
    for step, n_images in enumerate([2, 2, 3, 4, 2]):
        c1, c2, counts = random_batch(generator, n_images, TOKENS, DIM, label=1000.0 * step + 100.0 * rank)
        if step == 1 and rank == 1:
            counts = torch.zeros_like(counts)
            c1, c2 = c1[:0], c2[:0]
        batches.append((c1, c2, counts))
    return batches


def _push_on_every_rank() -> list[dict[str, torch.Tensor]]:
    bank = CentroidMemoryBank(QUEUE, TOKENS, DIM, seed=7)
    states = []
    for c1, c2, counts in rank_batches(distributed.get_rank()):
        bank.push(c1, c2, counts)
        states.append({k: v.clone() for k, v in bank.state_dict().items()})
    return states


@pytest.mark.slow
def test_push_on_two_ranks_equals_single_process_push_of_concatenation() -> None:
    per_rank = run_distributed(_push_on_every_rank, world_size=2)
    single = CentroidMemoryBank(QUEUE, TOKENS, DIM, seed=7)
    for step, (batch0, batch1) in enumerate(zip(rank_batches(0), rank_batches(1), strict=True)):
        single.push(*(torch.cat([a, b]) for a, b in zip(batch0, batch1, strict=True)))
        for key, value in single.state_dict().items():
            assert torch.equal(per_rank[0][step][key], per_rank[1][step][key]), key  # bitwise identical
            assert torch.equal(per_rank[0][step][key], value), key
    assert single.is_full
