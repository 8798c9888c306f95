"""benchmarks/oracle_neighbours.py: its same-class retrieval against a slow reference, and a tiny training run
through its patches in which every accepted neighbour has the query's class (the patch and object classes are
``cribo_utils.eval.mechanism``'s, tested in test_mechanism.py)."""

from __future__ import annotations

import json

import torch

from benchmarks import oracle_neighbours as oracle


def _slow_retrieval(current: torch.Tensor, stored: torch.Tensor, classes, stored_classes) -> list[int | None]:
    found = []
    for vector, label in zip(current, classes.tolist(), strict=True):
        best, best_score = None, -2.0
        for r, (candidate, candidate_label) in enumerate(zip(stored, stored_classes.tolist(), strict=True)):
            score = float(torch.dot(vector / vector.norm(), candidate / candidate.norm()))
            if candidate_label == label and score > best_score:
                best, best_score = r, score
        found.append(best if label > 0 else None)
    return found


def test_the_oracle_returns_the_nearest_object_of_the_same_class_in_each_view() -> None:
    generator = torch.Generator().manual_seed(1)
    queue = oracle.OracleQueue(capacity=10)
    empty = queue.retrieve(torch.randn(3, 5), torch.randn(3, 5), torch.tensor([1, 2, 0]))
    assert not empty.mask1.any() and not empty.mask2.any()
    for _ in range(3):  # 12 objects pushed, the newest 10 kept
        queue.push(
            torch.randn(4, 5, generator=generator),
            torch.randn(4, 5, generator=generator),
            torch.randint(0, 3, (4,), generator=generator),
        )
    assert queue.view1.shape == (10, 5) and queue.classes.shape == (10,)
    classes = torch.tensor([0, 1, 2, 3, 1, 2])  # background, present classes, a class the queue lacks
    current1, current2 = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    result = queue.retrieve(current1, current2, classes)
    for view, (current, stored, found, neighbours, mask) in enumerate(
        (
            (current1, queue.view1, result.index1, result.neighbours1, result.mask1),
            (current2, queue.view2, result.index2, result.neighbours2, result.mask2),
        )
    ):
        expected = _slow_retrieval(current, stored, classes, queue.classes)
        assert mask.tolist() == [index is not None for index in expected], view
        for i, index in enumerate(expected):
            if index is not None:
                assert found[i] == index and torch.equal(neighbours[i], stored[index])
                assert queue.classes[index] == classes[i]


def test_push_keeps_the_newest_objects_first() -> None:
    queue = oracle.OracleQueue(capacity=3)
    queue.push(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([1, 1]))
    queue.push(torch.ones(2, 1), torch.ones(2, 1), torch.tensor([2, 2]))
    assert queue.classes.tolist() == [2, 2, 1] and queue.view1.flatten().tolist() == [1, 1, 0]


def test_a_tiny_run_through_the_patches_accepts_only_same_class_neighbours(monkeypatch, tmp_path) -> None:
    import main_cribo

    queue = oracle.install(capacity=64, patch=monkeypatch.setattr)
    seen = []
    retrieve = queue.retrieve

    def recording(objects1, objects2, classes):
        result = retrieve(objects1, objects2, classes)
        seen.append((classes, result, None if queue.classes is None else queue.classes.clone()))
        return result

    monkeypatch.setattr(queue, "retrieve", recording)
    flags = ["--epochs", "2", "--synthetic_num_train", "32", "--queue_size", "16", "--num_workers", "0"]
    main_cribo.main([*flags, "--output_dir", str(tmp_path / "run"), "--log_freq", "1"])
    assert len(seen) == 16  # one retrieval per step: 2 epochs of 8 steps
    accepted = 0
    for classes, result, stored in seen:
        assert not (result.mask1 & (classes == 0)).any()  # no background object is ever accepted
        if stored is not None:
            assert torch.equal(stored[result.index1[result.mask1]], classes[result.mask1])
            assert torch.equal(stored[result.index2[result.mask2]], classes[result.mask2])
            accepted += int(result.mask1.sum())
    assert accepted > 0 and any((classes > 0).any() for classes, _, _ in seen)
    last_epoch = json.loads((tmp_path / "run" / "log.txt").read_text().splitlines()[-1])
    assert last_epoch["train_nn_fraction"] > 0  # the loss used the oracle's neighbours
