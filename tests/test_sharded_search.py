"""cribo_utils.eval.sharded_search: block top-k with stable ties, the torch index, the exact cross-rank
merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cribo_utils.eval.sharded_search import ShardedIndex, TorchShardIndex, block_top_k, merge_top_k
from tests.ddp_helpers import run_distributed


def _unit(n: int, d: int, seed: int) -> Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _reference_top_k(queries: Tensor, memory: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Obviously correct: the full similarity matrix, sorted by (similarity desc, id asc)."""
    similarities = queries @ memory.T
    order = similarities.argsort(dim=1, descending=True, stable=True)[:, :k]
    return similarities.gather(1, order), order


def test_block_top_k_breaks_ties_by_the_smaller_column() -> None:
    block = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2], [0.3, 0.1, 0.7, 0.6, 0.0]])
    values, columns = block_top_k(block, 2)
    assert columns.tolist() == [[1, 0], [0, 1], [2, 3]]
    assert torch.equal(values, block.gather(1, columns))


@pytest.mark.parametrize("k", [0, 1, 3, 7, 8])
def test_block_top_k_equals_a_stable_sort_with_many_ties(k: int) -> None:
    generator = torch.Generator().manual_seed(0)
    block = (torch.rand(50, 8, generator=generator) * 4).round() / 4  # 5 distinct values: ties everywhere
    values, columns = block_top_k(block, k)
    expected = block.argsort(dim=1, descending=True, stable=True)[:, :k]  # (value desc, column asc)
    assert torch.equal(values, block.gather(1, expected)) and torch.equal(values, block.gather(1, columns))
    # The same entries (the order among equal values is left to merge_top_k, which sorts by id).
    assert columns.sort(dim=1).values.tolist() == expected.sort(dim=1).values.tolist()


def test_merge_top_k_orders_by_similarity_then_id_and_drops_padding() -> None:
    similarities = torch.tensor([[0.3, float("-inf"), 0.8, 0.3], [0.1, 0.1, 0.1, float("-inf")]])
    ids = torch.tensor([[7, -1, 9, 2], [5, 4, 6, -1]])
    merged_similarities, merged_ids = merge_top_k(similarities, ids, 3)
    assert merged_ids.tolist() == [[9, 2, 7], [4, 5, 6]]
    assert merged_similarities[0].tolist() == pytest.approx([0.8, 0.3, 0.3])


def test_torch_index_equals_bruteforce_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import cribo_utils.eval.sharded_search as search

    memory, queries = _unit(500, 16, 0), _unit(40, 16, 1)
    memory[250] = memory[10]  # an exact tie: the smaller id must come first
    queries[0] = memory[10]
    monkeypatch.setattr(search, "SIMILARITY_BLOCK_BYTES", 40 * 4 * 64)  # 64-row blocks
    index = TorchShardIndex(16)
    index.add(memory[:300])
    index.add(memory[300:])  # ids continue across add calls
    similarities, ids = index.search(queries, 10)
    expected_similarities, expected_ids = _reference_top_k(queries, memory, 10)
    assert torch.equal(ids, expected_ids) and ids[0, :2].tolist() == [10, 250]
    assert torch.allclose(similarities, expected_similarities, atol=1e-6)
    assert len(index) == 500 and index.nbytes() == 500 * 16 * 4


def test_single_process_sharded_index_pads_a_small_memory() -> None:
    memory = _unit(3, 8, 2)
    local = TorchShardIndex(8)
    local.add(memory)
    index = ShardedIndex(local, [3], torch.device("cpu"))
    similarities, ids = index.search(_unit(2, 8, 3), 5)
    assert ids.shape == (2, 5) and (ids[:, 3:] == -1).all() and torch.isinf(similarities[:, 3:]).all()


def _two_shard_search(memory: Tensor, queries: Tensor, k: int) -> dict[str, Tensor]:
    from cribo_utils.runtime import distributed

    rank = distributed.get_rank()
    sizes = [130, memory.shape[0] - 130]
    offset = sum(sizes[:rank])
    local = TorchShardIndex(memory.shape[1])
    local.add(memory[offset : offset + sizes[rank]])
    index = ShardedIndex(local, sizes, torch.device("cpu"))
    # Rank 0 asks 25 queries, then none; rank 1 asks 5, then 10: both take part in both searches.
    mine = [queries[:25], queries[25:25]] if rank == 0 else [queries[25:30], queries[30:40]]
    results = [index.search(batch, k) for batch in mine]
    return {
        "similarities": torch.cat([r[0] for r in results]),
        "ids": torch.cat([r[1] for r in results]),
        "held": torch.tensor(len(local)),
    }


@pytest.mark.slow
def test_two_shards_give_the_global_top_k() -> None:
    memory, queries = _unit(300, 16, 4), _unit(40, 16, 5)
    memory[200] = memory[20]  # a tie across the shard boundary: id 20 (rank 0) before 200 (rank 1)
    queries[3] = memory[20]
    results = run_distributed(_two_shard_search, memory, queries, 7, world_size=2, timeout_s=60)
    expected_similarities, expected_ids = _reference_top_k(queries, memory, 7)
    ids = torch.cat([results[0]["ids"], results[1]["ids"]])
    similarities = torch.cat([results[0]["similarities"], results[1]["similarities"]])
    assert torch.equal(ids, expected_ids) and ids[3, :2].tolist() == [20, 200]
    assert torch.allclose(similarities, expected_similarities, atol=1e-6)
    assert [int(r["held"]) for r in results] == [130, 170]
