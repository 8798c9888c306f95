"""The mechanism metrics (cribo_utils/eval/mechanism.py) against slow, obviously correct versions, on
fabricated partitions and scenes whose answers are known, and the label maps that travel with the views."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cribo_utils.eval.mechanism import (
    NeighbourTally,
    adjusted_rand_index,
    cluster_purity,
    object_labels,
    patch_majority_labels,
)
from data.augmentations import TwoViewTransform


def _ari_by_pairs(a: list[int], b: list[int]) -> float:
    """ARI from the 2 x 2 pair-confusion counts (a formula independent of the contingency one)."""
    together_a = together_b = both = 0
    pairs = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        pairs += 1
        same_a, same_b = a[i] == a[j], b[i] == b[j]
        together_a += same_a
        together_b += same_b
        both += same_a and same_b
    tp, fp, fn = both, together_a - both, together_b - both
    tn = pairs - tp - fp - fn
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def test_ari_equals_the_pair_counting_formula_on_random_partitions() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 40), generator=generator)
    b = torch.randint(0, 3, (6, 40), generator=generator)
    b[0] = a[0] % 3  # one row that agrees strongly
    expected = torch.tensor([_ari_by_pairs(x.tolist(), y.tolist()) for x, y in zip(a, b, strict=True)])
    assert torch.allclose(adjusted_rand_index(a, b), expected.double(), atol=1e-12)


def test_ari_is_one_for_the_same_partition_relabelled_and_near_zero_for_shuffled_labels() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (3, 500), generator=generator)
    relabelled = (labels + 2) % 4 + 7  # a permutation of the ids, shifted
    assert torch.allclose(adjusted_rand_index(labels, relabelled), torch.ones(3, dtype=torch.float64))
    shuffled = labels[:, torch.randperm(500, generator=generator)]
    assert adjusted_rand_index(labels, shuffled).abs().max() < 0.02
    # both trivial partitions: identical, so 1
    ones, singletons = torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None]
    assert adjusted_rand_index(ones, ones).item() == 1.0
    assert adjusted_rand_index(singletons, singletons).item() == 1.0
    assert adjusted_rand_index(ones, singletons).item() == 0.0


def test_purity_by_hand_and_object_parts_are_not_penalised() -> None:
    instances = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2]])
    parts = torch.tensor([[0, 0, 3, 3, 1, 1, 2, 2]])  # background split in two: still pure
    straddling = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2]])  # cluster 1 holds one background token
    assert cluster_purity(parts, instances).item() == 1.0
    assert cluster_purity(straddling, instances).item() == pytest.approx(7 / 8)
    generator = torch.Generator().manual_seed(2)
    clusters = torch.randint(0, 6, (4, 30), generator=generator)
    truth = torch.randint(0, 3, (4, 30), generator=generator)
    expected = [
        sum(
            max(sum(1 for c, t in zip(cs, ts, strict=True) if c == k and t == i) for i in range(3))
            for k in range(6)
        )
        / 30
        for cs, ts in zip(clusters.tolist(), truth.tolist(), strict=True)
    ]
    assert torch.allclose(cluster_purity(clusters, truth), torch.tensor(expected, dtype=torch.float64))


def test_patch_majority_labels_by_loop() -> None:
    generator = torch.Generator().manual_seed(3)
    maps = torch.randint(0, 4, (2, 8, 12), generator=generator)
    got = patch_majority_labels(maps, 4)
    for b, row, col in itertools.product(range(2), range(2), range(3)):
        block = maps[b, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].flatten()
        counts = torch.bincount(block, minlength=4)
        assert got[b, row * 3 + col].item() == int(torch.argmax(counts))  # argmax: first of the tied


def test_object_labels_follow_the_valid_clusters_in_training_order() -> None:
    clusters1 = torch.tensor([[0, 0, 1, 2], [1, 1, 0, 0]])
    clusters2 = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 1]])
    labels1 = torch.tensor([[5, 5, 1, 0], [2, 2, 3, 3]])
    labels2 = torch.tensor([[5, 1, 1, 4], [0, 0, 3, 2]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    got = object_labels(clusters1, clusters2, labels1, labels2, valid, n_clusters=3)
    # image 0: cluster 0 -> (5, 5), cluster 1 -> (1, 1), cluster 2 -> (0, 4: majority over both is 0 tie->0)
    # image 1: cluster 0 -> (3, 3), cluster 1 -> (2, 2); cluster 2 is not an object
    assert got.view1.tolist() == [5, 1, 0, 3, 2]
    assert got.view2.tolist() == [5, 1, 4, 3, 2]
    assert got.both.tolist() == [5, 1, 0, 3, 2]


def test_neighbour_tally_rates_by_hand() -> None:
    tally = NeighbourTally()
    accepted = torch.tensor([True, True, False, True, False])
    correct = torch.tensor([True, False, True, True, False])
    foreground = torch.tensor([True, True, True, False, False])
    query_class = torch.tensor([1, 2, 1, 0, 0])
    tally.add(accepted, correct, foreground, query_class)
    bank_classes = torch.tensor([0, 0, 1, 2])  # p_bank = (1/2, 1/4, 1/4)
    summary = tally.summary(bank_classes)
    assert summary["acceptance"] == pytest.approx(3 / 5)
    assert summary["acceptance_foreground"] == pytest.approx(2 / 3)
    assert summary["precision"] == pytest.approx(2 / 3)
    assert summary["precision_foreground"] == pytest.approx(1 / 2)
    assert summary["precision_foreground_before_check"] == pytest.approx(2 / 3)
    # foreground query classes (1, 2, 1): p_query = (0, 2/3, 1/3)
    assert summary["chance_foreground"] == pytest.approx(2 / 3 * 1 / 4 + 1 / 3 * 1 / 4)
    assert summary["background_share_of_accepted"] == pytest.approx(1 / 3)


def test_label_maps_travel_with_the_views_and_draw_no_random_number() -> None:
    size = 128
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    columns = np.tile(np.arange(size, dtype=np.uint8), (size, 1))  # label = original column index
    transform = TwoViewTransform(image_size=64, patch_size=16, global_crops_scale=(0.3, 1.0))
    for seed in range(6):
        torch.manual_seed(seed)
        crops, positions = transform(image)
        torch.manual_seed(seed)
        crops_again, positions_again, labels = transform(image, label_map=columns)
        for view in range(2):
            assert torch.equal(crops[view], crops_again[view])
            assert torch.equal(positions[view], positions_again[view])
            # the cut column labels agree with the patch centres' x coordinates (flip included)
            patch_means = labels[view].double().reshape(4, 16, 4, 16).mean(dim=(1, 3)).flatten()
            assert torch.allclose(patch_means, positions[view][0].double(), atol=1.5)


def test_mechanism_benchmark_on_scenes_with_known_answers(tmp_path: Path) -> None:
    """Clusters equal to the instance masks score ARI 1 and purity 1; the script runs end to end."""
    from benchmarks import mechanism

    settings = mechanism.run_settings(mechanism.get_args_parser().parse_args([]), {})
    settings.image_size = 64
    views = mechanism.make_views(settings, "val", 6, scene_seed=5, seed=0)
    instances = torch.cat([views.instances[0], views.instances[1]], dim=1)
    assert adjusted_rand_index(instances, instances).min().item() == 1.0
    assert cluster_purity(instances, instances).min().item() == 1.0
    # every view of a scene shows the scene's instances, and classes follow instances
    assert (views.classes > 0).eq(views.instances > 0).all()
    out = tmp_path / "mechanism.json"
    summary = mechanism.main(
        [
            "--random_seeds",
            "1",
            "--num_bank",
            "16",
            "--num_queries",
            "8",
            "--batch_sizes",
            "4",
            "--out",
            str(out),
        ]
    )
    row = summary["rows"]["random init 0"]
    assert 0 < row["purity"] <= 1 and -1 <= row["ari_instances"] <= 1
    # instance-oracle tokens: the clustering's ceiling is near-pure whatever the network
    assert row["oracle_purity"] >= 0.9 and row["oracle_purity"] >= row["tile_purity"]
    for key in mechanism.CEILING_KEYS:
        assert 0 <= row[key] <= 1, key
    assert row["mask_object_colour_ratio"] > 0
    assert json.loads(out.read_text())["rows"]["random init 0"]["batch_4"].keys() >= {
        "acceptance",
        "precision",
    }


def test_target_statistics_by_hand() -> None:
    from cribo_utils.eval.mechanism import target_statistics

    # four objects in four images: classes (1, 1, 2, 2); prototypes (0, 0, 1, 0)
    targets = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.6, 0.4]])
    stats = target_statistics(targets, torch.tensor([1, 1, 2, 2]), torch.arange(4))
    mean = targets.double().mean(dim=0)
    assert stats["prototypes"] == pytest.approx(float(torch.exp(-(mean * mean.log()).sum())))
    # same-class pairs (ordered): (0,1),(1,0) share; (2,3),(3,2) do not -> 1/2
    assert stats["same_prototype_same_class"] == pytest.approx(0.5)
    # other-class pairs: (0,2),(1,2) differ, (0,3),(1,3) share, both orders -> 1/2
    assert stats["same_prototype_other_class"] == pytest.approx(0.5)
    collapsed = target_statistics(
        torch.tensor([[1.0, 0.0]] * 3), torch.tensor([1, 2, 3]), torch.tensor([0, 0, 1])
    )
    assert collapsed["prototypes"] == pytest.approx(1.0)
    assert (
        collapsed["same_prototype_other_class"] == 1.0
        and collapsed["same_prototype_same_class"] != collapsed["same_prototype_same_class"]
    )  # NaN: no same-class pair in other images
    # targets that follow the class: same-class pairs always share the prototype, other-class pairs never
    bound = target_statistics(
        torch.eye(3)[torch.tensor([0, 0, 1, 1, 2, 2])], torch.tensor([1, 1, 2, 2, 3, 3]), torch.arange(6)
    )
    assert bound["same_prototype_same_class"] == 1.0 and bound["same_prototype_other_class"] == 0.0
    assert bound["prototypes"] == pytest.approx(3.0)


def test_explained_share_against_counted_entropies() -> None:
    import math

    from cribo_utils.eval.mechanism import explained_share

    factor = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    # prototypes that name the factor (any relabelling) explain all of it; a constant prototype nothing
    assert explained_share(factor * 7 + 3, factor) == pytest.approx(1.0)
    assert explained_share(torch.zeros(8, dtype=torch.long), factor) == pytest.approx(0.0)
    # a finer partition of the factor still explains all of it; a coarser one part of it, counted by hand
    assert explained_share(torch.arange(8), factor) == pytest.approx(1.0)
    coarse = torch.tensor([0, 0, 0, 0, 1, 1, 1, 0])  # factor values 0 and 1 merged
    h_factor = -(3 / 8 * math.log(3 / 8) * 2 + 2 / 8 * math.log(2 / 8))
    h_coarse = -(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8))
    assert explained_share(coarse, factor) == pytest.approx(h_coarse / h_factor)  # H(f | a) = share of (0,1)
    # independent: two prototypes split every factor value evenly
    balanced = explained_share(torch.tensor([0, 1] * 6), torch.tensor([0, 0, 1, 1, 2, 2] * 2))
    assert balanced == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(explained_share(torch.tensor([0, 1]), torch.tensor([4, 4])))
    with pytest.raises(ValueError, match="explained_share"):
        explained_share(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_sinkhorn_targets_are_balanced_per_training_batch_of_images() -> None:
    """Under --centering_c sinkhorn the benchmark balances the objects of both views of batch_size images
    together, as a training step does, and no others."""
    from types import SimpleNamespace

    from benchmarks.mechanism import sinkhorn_targets
    from cribo_utils.method.loss import sinkhorn_potential

    images = torch.tensor([0, 0, 1, 2, 3, 3, 4])  # objects of view 1; view 2 rows repeat them
    scores = torch.randn(14, 5, generator=torch.Generator().manual_seed(0)) * 3
    targets = sinkhorn_targets(scores, SimpleNamespace(image_of_object=images), batch_size=2)
    step = torch.cat([images, images]) // 2
    for index in range(3):
        rows = step == index
        expected = torch.softmax(scores[rows] + sinkhorn_potential(scores[rows]), dim=1)
        assert torch.allclose(targets[rows], expected, atol=1e-6)
    one_batch = sinkhorn_targets(scores, SimpleNamespace(image_of_object=images), batch_size=8)
    assert not torch.allclose(one_batch, targets, atol=1e-3)


def test_pool_by_labels_against_a_loop() -> None:
    from cribo_utils.eval.mechanism import pool_by_labels

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 10, 5, generator=generator)
    labels = torch.randint(0, 4, (3, 10), generator=generator)
    labels[1] = torch.where(labels[1] == 2, 0, labels[1])  # image 1 lacks label 2
    objects, present = pool_by_labels(tokens, labels)
    expected = [
        tokens[b][labels[b] == label].mean(dim=0)
        for b in range(3)
        for label in range(4)
        if (labels[b] == label).any()
    ]
    assert present.shape == (3, 4) and not present[1, 2] and int(present.sum()) == len(expected)
    torch.testing.assert_close(objects, torch.stack(expected))


def test_nearest_class_precision_by_hand() -> None:
    from cribo_utils.eval.mechanism import nearest_class_precision

    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    bank_classes = torch.tensor([1, 2, 0, 1])
    # queries: near bank 0 (class 1, right), near bank 1 (class 2; query 1: wrong), near bank 3 (class 1:
    # right, scale does not matter: cosine), a background query (skipped)
    queries = torch.tensor([[2.0, 0.1], [0.1, 3.0], [0.0, -0.5], [1.0, 0.0]])
    query_classes = torch.tensor([1, 1, 1, 0])
    result = nearest_class_precision(queries, query_classes, bank, bank_classes, chunk=2)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["chance"] == pytest.approx(2 / 4)  # every foreground query is class 1; half the bank is
    no_foreground = nearest_class_precision(queries, torch.zeros(4, dtype=torch.long), bank, bank_classes)
    assert np.isnan(no_foreground["precision"]) and np.isnan(no_foreground["chance"])


def test_ceiling_colour_ratio_and_precision_on_fabricated_objects() -> None:
    """Objects whose features are their colours retrieve by colour (ratio near 0); features independent of
    colour give a ratio near 1; features equal to the one-hot class retrieve the class every time."""
    from types import SimpleNamespace

    from benchmarks.mechanism import ceiling_metrics

    generator = torch.Generator().manual_seed(0)

    def objects(count: int, features: str) -> SimpleNamespace:
        colours = torch.rand(count, 3, generator=generator)
        classes = torch.randint(0, 5, (count,), generator=generator)  # 0 = background
        one_hot = torch.nn.functional.one_hot(classes, 5).float()
        # a large constant coordinate makes every norm nearly equal, so cosine ranks by colour distance
        as_features = torch.cat([colours, torch.full((count, 1), 10.0)], dim=1)
        table = {
            "colour": as_features,
            "random": torch.randn(count, 8, generator=generator),
            "class": one_hot,
        }
        return SimpleNamespace(
            mask_objects=table[features],
            mask_classes=classes,
            mask_colours=colours,
            patches=one_hot,
            patch_classes=classes,
        )

    by_colour = ceiling_metrics(objects(2000, "colour"), objects(300, "colour"))
    assert by_colour["mask_object_colour_ratio"] < 0.2
    unrelated = ceiling_metrics(objects(2000, "random"), objects(300, "random"))
    assert 0.85 < unrelated["mask_object_colour_ratio"] < 1.15
    assert unrelated["mask_object_precision_among_objects"] == pytest.approx(0.25, abs=0.08)
    by_class = ceiling_metrics(objects(2000, "class"), objects(300, "class"))
    assert by_class["mask_object_precision_foreground"] == 1.0 == by_class["patch_precision_foreground"]
    assert by_class["mask_object_chance_among_objects"] == pytest.approx(0.25, abs=0.03)
    # the one-hot class is linear: both probes read it; random features hold no class: chance
    assert by_class["mask_object_linear_probe"] == 1.0 == by_class["patch_linear_probe_foreground"]
    assert by_class["patch_precision_among_foreground"] == 1.0
    assert by_class["patch_chance_among_foreground"] == pytest.approx(0.25, abs=0.03)
    assert unrelated["mask_object_linear_probe"] == pytest.approx(0.25, abs=0.08)
    assert unrelated["linear_probe_chance"] == pytest.approx(0.25, abs=0.08)


def _xor_classes(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Six Gaussian features and two classes given by the sign of x0 * x1 (not linear in the features)."""
    features = torch.randn(count, 6, generator=generator)
    xor = ((features[:, 0] > 0) ^ (features[:, 1] > 0)).long()
    return features, xor


def test_linear_probe_reads_a_linear_class_and_not_a_nonlinear_one() -> None:
    """A class that is a half-space is read (train and test near 1); the XOR of two signs is a class that
    nearest neighbours find and no linear probe can (about 0.5): the case the probe exists to tell apart."""
    from cribo_utils.eval.mechanism import cosine_nearest, linear_probe_accuracy

    generator = torch.Generator().manual_seed(0)
    train, xor_train = _xor_classes(4000, generator)
    test, xor_test = _xor_classes(1000, generator)
    linear_train, linear_test = (train[:, 2] > 0.3).long() + 1, (test[:, 2] > 0.3).long() + 1
    linear = linear_probe_accuracy(train, linear_train, test, linear_test)
    assert linear["test"] > 0.97 and linear["train"] > 0.97
    assert linear["chance"] == pytest.approx(float((linear_test == 1).double().mean()))
    nonlinear = linear_probe_accuracy(train, xor_train, test, xor_test)
    assert 0.4 < nonlinear["test"] < 0.6 and nonlinear["train"] < 0.6
    # nearest neighbours in the two coordinates that carry it read the XOR class
    nearest = cosine_nearest(test[:, :2], train[:, :2])
    assert float((xor_train[nearest] == xor_test).double().mean()) > 0.9


def test_linear_probe_scores_test_classes_unseen_in_training_as_wrong_and_handles_empty_sets() -> None:
    from cribo_utils.eval.mechanism import linear_probe_accuracy

    train = torch.tensor([[1.0, 0.0], [2.0, 0.1], [-1.0, 0.0], [-2.0, -0.1]])
    classes = torch.tensor([3, 3, 5, 5])
    test = torch.tensor([[1.5, 0.0], [-1.5, 0.0], [1.0, 1.0]])
    result = linear_probe_accuracy(train, classes, test, torch.tensor([3, 5, 7]))
    assert result["test"] == pytest.approx(2 / 3) and result["train"] == 1.0
    empty = linear_probe_accuracy(train[:0], classes[:0], test, torch.tensor([3, 5, 7]))
    assert all(np.isnan(value) for value in empty.values())


def test_neighbour_metrics_read_the_class_of_the_retrieved_bank_object_not_of_its_slot_number() -> None:
    """Objects whose features are their class (one-hot, plus a little noise) retrieve a bank object of
    their class every time: precision before the check is 1. The bank stores a push's images in reverse
    slot order, so reading the class of object row ``slot`` instead of the object in that slot scores
    near chance; images with different object counts make that permutation no identity."""
    from types import SimpleNamespace

    from benchmarks.mechanism import neighbour_metrics

    generator = torch.Generator().manual_seed(0)

    def objects(images: int) -> SimpleNamespace:
        counts = torch.randint(1, 5, (images,), generator=generator)
        classes = torch.randint(0, 5, (int(counts.sum()),), generator=generator)
        features = torch.nn.functional.one_hot(classes, 5).float()
        noise = lambda: 0.05 * torch.rand(features.shape, generator=generator)  # noqa: E731
        return SimpleNamespace(
            objects1=features + noise(),
            objects2=features + noise(),
            counts=counts,
            valid=torch.ones(images, 4, dtype=torch.bool),
            image_of_object=torch.repeat_interleave(torch.arange(images), counts),
            instance=(classes > 0).long(),
            cls=classes,
        )

    result = neighbour_metrics(objects(64), objects(32), batch_size=4)
    assert result["precision_foreground_before_check"] == 1.0
    assert result["precision_foreground"] == 1.0 and result["precision"] == 1.0
    assert result["chance_foreground"] == pytest.approx(0.2, abs=0.1)
