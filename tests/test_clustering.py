"""Tests for cribo_utils/method/clustering.py: the joint two-view clustering of docs/method.md, Sec. 4.

The fast, batched implementation is compared with a slow, literal, per-image reference written here
(Python loops over images, clusters and tokens, float64, the (P, P, K) masked construction of the
positional cost), plus hand-computed values and behavioural checks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from cribo_utils.method.clustering import (
    ClusteringResult,
    draw_seed_indices,
    joint_cluster,
    masked_position_distances,
    min_max_normalize,
    object_representations,
    positional_alpha,
    positional_cost,
    sinkhorn,
    sinkhorn_labels,
    update_centroids,
    update_column_marginal,
)

# ----------------------------------------------------------------------------------------------
# Slow, literal reference of Sec. 4 (one image at a time, float64)
# ----------------------------------------------------------------------------------------------


def reference_positional_cost(positions: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Literal Sec. 4.2 on one image: positions (P, 2), membership (P, K) 0/1 -> G (P, K).

    Builds the full (n, m, k) tensor "distance from n to m if m is a member of k and the distance is
    > 0", takes the minimum over m, fills the empty entries with the mean (placeholders at 0) and
    divides by the maximum.
    """
    n_tokens, n_clusters = membership.shape
    distance = ((positions[:, None, :] - positions[None, :, :]) ** 2).sum(-1).sqrt()  # (n, m)
    distance_nmk = distance[:, :, None].expand(n_tokens, n_tokens, n_clusters)
    member_nmk = (membership[None, :, :] > 0).expand(n_tokens, n_tokens, n_clusters)
    candidate = member_nmk & (distance_nmk > 0)
    masked = torch.where(candidate, distance_nmk, torch.full_like(distance_nmk, math.inf))
    raw = masked.min(dim=1).values
    is_empty = ~candidate.any(dim=1)
    raw[is_empty] = 0.0
    fallback = raw.mean()
    raw[is_empty] = fallback
    return raw / raw.max() if raw.max() > 0 else raw


def brute_force_positional_cost(positions: list[tuple[float, float]], labels: list[int], n_clusters: int):
    """Sec. 4.2 with plain Python loops over tokens, clusters and members (labels -1 = no cluster)."""
    n_tokens = len(positions)
    raw = [[0.0] * n_clusters for _ in range(n_tokens)]
    empty = [[False] * n_clusters for _ in range(n_tokens)]
    for n in range(n_tokens):
        for k in range(n_clusters):
            candidates = [
                math.dist(positions[n], positions[m])
                for m in range(n_tokens)
                if labels[m] == k and math.dist(positions[n], positions[m]) > 0
            ]
            if candidates:
                raw[n][k] = min(candidates)
            else:
                empty[n][k] = True
    mean = sum(sum(row) for row in raw) / (n_tokens * n_clusters)
    filled = [[mean if empty[n][k] else raw[n][k] for k in range(n_clusters)] for n in range(n_tokens)]
    peak = max(max(row) for row in filled)
    return torch.tensor([[value / peak if peak > 0 else 0.0 for value in row] for row in filled])


def reference_sinkhorn(cost: torch.Tensor, column: torch.Tensor, lam: float, iterations: int) -> torch.Tensor:
    """Literal Sinkhorn-Knopp on one image: cost (P, K), column (K,)."""
    plan = torch.exp(-lam * cost)
    plan = plan / plan.sum()
    row = torch.full((cost.shape[0],), 1.0 / cost.shape[0], dtype=cost.dtype)
    for _ in range(iterations):
        plan = plan * (row / plan.sum(dim=1))[:, None]
        plan = plan * (column / plan.sum(dim=0))[None, :]
    plan[torch.isnan(plan)] = 1e-8
    return plan


def first_argmax_one_hot(plan: torch.Tensor) -> torch.Tensor:
    """Hard assignment: 1 at the first column holding the row maximum (loop over tokens)."""
    hard = torch.zeros_like(plan)
    for n in range(plan.shape[0]):
        row_max = plan[n].max()
        k = [j for j in range(plan.shape[1]) if plan[n, j] == row_max][0]
        hard[n, k] = 1.0
    return hard


def reference_joint_cluster(
    tokens1, tokens2, positions1, positions2, n_clusters, alpha, seeds, mode, n_iter=5, update_c=True
):
    """Literal Sec. 4 on every image, with the batch coupling of ``mode="batch"`` done explicitly."""
    batch_size, n_view1, _ = tokens1.shape
    images = []
    for b in range(batch_size):
        joint = torch.cat([tokens1[b], tokens2[b]]).double()
        joint = joint / joint.norm(dim=1, keepdim=True)
        pos = torch.cat([positions1[b], positions2[b]], dim=1).T.double()  # (P, 2)
        membership = torch.zeros(joint.shape[0], n_clusters, dtype=torch.float64)
        for k in range(n_clusters):
            membership[int(seeds[b, k]), k] = 1.0
        images.append(
            dict(
                z=joint,
                pos=pos,
                A=membership,
                mu=joint[seeds[b]].clone(),
                c=torch.full((n_clusters,), 1.0 / n_clusters, dtype=torch.float64),
            )
        )
    for _ in range(n_iter):
        costs = []
        for image in images:
            similarity = image["z"] @ image["mu"].T
            costs.append(-similarity + alpha * reference_positional_cost(image["pos"], image["A"]))
        if mode == "batch":
            low = min(cost.min() for cost in costs)
            high = max(cost.max() for cost in costs)
            costs = [(cost - low) / (high - low) for cost in costs]
        else:
            costs = [(cost - cost.min()) / (cost.max() - cost.min()) for cost in costs]
        for image, cost in zip(images, costs, strict=True):
            plan = reference_sinkhorn(cost, image["c"], 20.0, 5)
            image["A"] = first_argmax_one_hot(plan)
            if update_c:
                sizes = image["A"].sum(dim=0)
                image["c"] = (sizes + 0.01) / (sizes + 0.01).sum()
            mu = torch.zeros_like(image["mu"])
            for k in range(n_clusters):
                members = image["z"][image["A"][:, k] > 0]
                if len(members):
                    total = members.sum(dim=0)
                    mu[k] = total / total.norm()
            image["mu"] = mu
    out = dict(labels=[], assign1=[], assign2=[], valid=[], mu=[], objects1=[], objects2=[])
    for b, image in enumerate(images):
        hard = image["A"]
        out["labels"].append(hard.argmax(dim=1))
        blocks = []
        for block in (hard[:n_view1].clone(), hard[n_view1:].clone()):
            for k in range(n_clusters):
                size = block[:, k].sum()
                if size > 0:
                    block[:, k] /= size
            blocks.append(block)
        out["assign1"].append(blocks[0])
        out["assign2"].append(blocks[1])
        valid = (hard[:n_view1].sum(0) > 0) & (hard[n_view1:].sum(0) > 0)
        out["valid"].append(valid)
        out["mu"].append(image["mu"])
        for k in range(n_clusters):
            if valid[k]:
                out["objects1"].append(tokens1[b][hard[:n_view1, k] > 0].double().mean(dim=0))
                out["objects2"].append(tokens2[b][hard[n_view1:, k] > 0].double().mean(dim=0))
    return {key: torch.stack(value) for key, value in out.items()}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def random_inputs(batch_size, n_view1, n_view2, dim, seed, integer_positions=False):
    generator = torch.Generator().manual_seed(seed)
    tokens1 = torch.randn(batch_size, n_view1, dim, generator=generator) * 3
    tokens2 = torch.randn(batch_size, n_view2, dim, generator=generator) * 3
    if integer_positions:  # many identical coordinates, within and across views
        positions1 = torch.randint(0, 4, (batch_size, 2, n_view1), generator=generator).float() * 16
        positions2 = torch.randint(0, 4, (batch_size, 2, n_view2), generator=generator).float() * 16
    else:
        positions1 = torch.rand(batch_size, 2, n_view1, generator=generator) * 200
        positions2 = torch.rand(batch_size, 2, n_view2, generator=generator) * 200 + 30
    return tokens1, tokens2, positions1, positions2


def grid_positions(side: int, step: float, offset: tuple[float, float]) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([cols.flatten() * step + offset[0], rows.flatten() * step + offset[1]]).float()


# ----------------------------------------------------------------------------------------------
# Whole algorithm against the literal reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["image", "batch"])
@pytest.mark.parametrize(
    ("batch_size", "n_view1", "n_view2", "n_clusters", "dim", "alpha", "integer_positions"),
    [
        (1, 9, 9, 3, 5, 1.0, False),
        (3, 16, 16, 4, 8, 1.0, False),
        (2, 16, 16, 6, 12, 2.0, True),
        (4, 12, 10, 5, 7, 0.5, False),
        (2, 25, 25, 8, 16, 1.0, False),
    ],
)
def test_joint_cluster_matches_literal_reference(
    mode, batch_size, n_view1, n_view2, n_clusters, dim, alpha, integer_positions
):
    seed = 7 * batch_size + n_clusters
    tokens1, tokens2, positions1, positions2 = random_inputs(
        batch_size, n_view1, n_view2, dim, seed, integer_positions
    )
    seeds = draw_seed_indices(batch_size, n_view1 + n_view2, n_clusters, torch.Generator().manual_seed(seed))
    result = joint_cluster(
        tokens1,
        tokens2,
        positions1,
        positions2,
        n_clusters,
        alpha,
        cost_normalization=mode,
        seed_indices=seeds,
    )
    expected = reference_joint_cluster(
        tokens1, tokens2, positions1, positions2, n_clusters, alpha, seeds, mode
    )

    assert isinstance(result, ClusteringResult)
    torch.testing.assert_close(result.labels, expected["labels"], rtol=0, atol=0)
    torch.testing.assert_close(result.valid, expected["valid"], rtol=0, atol=0)
    torch.testing.assert_close(result.counts, expected["valid"].sum(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(result.assign1.double(), expected["assign1"], rtol=0, atol=1e-6)
    torch.testing.assert_close(result.assign2.double(), expected["assign2"], rtol=0, atol=1e-6)
    joint = F.normalize(torch.cat([tokens1, tokens2], dim=1), dim=-1)
    centroids = update_centroids(joint, result.labels, n_clusters)
    torch.testing.assert_close(centroids.double(), expected["mu"], rtol=0, atol=1e-5)
    objects1 = object_representations(tokens1, result.assign1, result.valid)
    objects2 = object_representations(tokens2, result.assign2, result.valid)
    torch.testing.assert_close(objects1.double(), expected["objects1"], rtol=0, atol=1e-5)
    torch.testing.assert_close(objects2.double(), expected["objects2"], rtol=0, atol=1e-5)


def test_joint_cluster_matches_reference_without_c_update_and_single_iteration():
    tokens1, tokens2, positions1, positions2 = random_inputs(3, 16, 16, 8, seed=3)
    seeds = draw_seed_indices(3, 32, 5, torch.Generator().manual_seed(3))
    for n_iter, update_c in ((1, True), (3, False)):
        result = joint_cluster(
            tokens1,
            tokens2,
            positions1,
            positions2,
            5,
            1.0,
            n_iter=n_iter,
            update_c=update_c,
            seed_indices=seeds,
        )
        expected = reference_joint_cluster(
            tokens1, tokens2, positions1, positions2, 5, 1.0, seeds, "image", n_iter=n_iter, update_c=update_c
        )
        torch.testing.assert_close(result.labels, expected["labels"], rtol=0, atol=0)


def test_generator_makes_runs_reproducible_and_equals_injected_seeds():
    tokens1, tokens2, positions1, positions2 = random_inputs(2, 16, 16, 8, seed=1)
    first = joint_cluster(
        tokens1, tokens2, positions1, positions2, 6, 1.0, generator=torch.Generator().manual_seed(5)
    )
    second = joint_cluster(
        tokens1, tokens2, positions1, positions2, 6, 1.0, generator=torch.Generator().manual_seed(5)
    )
    seeds = draw_seed_indices(2, 32, 6, torch.Generator().manual_seed(5))
    injected = joint_cluster(tokens1, tokens2, positions1, positions2, 6, 1.0, seed_indices=seeds)
    assert torch.equal(first.labels, second.labels)
    assert torch.equal(first.labels, injected.labels)


# ----------------------------------------------------------------------------------------------
# Positional cost
# ----------------------------------------------------------------------------------------------


def test_positional_cost_hand_values():
    # Three tokens on a line at x = 0, 1, 3.
    positions = torch.tensor([[[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]])
    # Clusters {0, 1} and {2}: raw = [[1, 3], [1, 2], [2, empty]], mean 9/6 = 1.5, max 3.
    cost = positional_cost(positions, torch.tensor([[0, 0, 1]]), 2)
    expected = torch.tensor([[[1.0, 3.0], [1.0, 2.0], [2.0, 1.5]]]) / 3.0
    torch.testing.assert_close(cost, expected)
    # Seeds only (token 1 in no cluster): raw = [[empty, 3], [1, 2], [3, empty]] -> mean 1.5, max 3.
    cost = positional_cost(positions, torch.tensor([[0, -1, 1]]), 2)
    expected = torch.tensor([[[1.5, 3.0], [1.0, 2.0], [3.0, 1.5]]]) / 3.0
    torch.testing.assert_close(cost, expected)


@pytest.mark.parametrize("integer_positions", [False, True])
def test_positional_cost_matches_brute_force_and_literal_construction(integer_positions):
    generator = torch.Generator().manual_seed(11)
    batch_size, n_tokens, n_clusters = 3, 20, 7
    if integer_positions:
        positions = torch.randint(0, 3, (batch_size, 2, n_tokens), generator=generator).float() * 5
    else:
        positions = torch.rand(batch_size, 2, n_tokens, generator=generator) * 50
        positions[:, :, 10:13] = positions[:, :, 0:3]  # identical coordinates across the two "views"
    # Labels in [-1, 5): cluster 5 and 6 are empty, -1 is "no cluster"; make one singleton cluster.
    labels = torch.randint(-1, 5, (batch_size, n_tokens), generator=generator)
    labels[:, 4] = 4
    labels[:, 5:] = torch.where(labels[:, 5:] == 4, 3, labels[:, 5:])
    labels[:, :4] = torch.where(labels[:, :4] == 4, 2, labels[:, :4])
    cost = positional_cost(positions, labels, n_clusters)
    distances = masked_position_distances(positions)
    assert torch.equal(positional_cost(None, labels, n_clusters, distances=distances), cost)
    for b in range(batch_size):
        points = [tuple(map(float, point)) for point in positions[b].T]
        expected = brute_force_positional_cost(points, labels[b].tolist(), n_clusters)
        torch.testing.assert_close(cost[b].double(), expected.double(), rtol=0, atol=1e-6)
        membership = (
            F.one_hot(labels[b].clamp_min(0), n_clusters).double() * (labels[b] >= 0).double()[:, None]
        )
        literal = reference_positional_cost(positions[b].T.double(), membership)
        torch.testing.assert_close(cost[b].double(), literal, rtol=0, atol=1e-6)


def test_masked_distances_exclude_self_and_identical_coordinates():
    positions = torch.tensor([[[0.0, 0.0, 3.0], [0.0, 0.0, 4.0]]])
    distances = masked_position_distances(positions)
    expected = torch.tensor([[[math.inf, math.inf, 5.0], [math.inf, math.inf, 5.0], [5.0, 5.0, math.inf]]])
    torch.testing.assert_close(distances, expected)


def test_positional_cost_all_coincident_positions_is_zero_not_nan():
    positions = torch.zeros(2, 2, 6)
    cost = positional_cost(positions, torch.tensor([[0, 0, 1, 1, 2, 2]] * 2), 3)
    assert torch.equal(cost, torch.zeros(2, 6, 3))


# ----------------------------------------------------------------------------------------------
# Sinkhorn, normalisation, marginals
# ----------------------------------------------------------------------------------------------


def test_sinkhorn_invariants_and_reference():
    generator = torch.Generator().manual_seed(2)
    batch_size, n_tokens, n_clusters = 3, 40, 6
    cost = torch.rand(batch_size, n_tokens, n_clusters, generator=generator)
    column = torch.rand(batch_size, n_clusters, generator=generator) + 0.1
    column = column / column.sum(dim=1, keepdim=True)

    initial = sinkhorn(cost, column, 20.0, n_iterations=0)
    torch.testing.assert_close(initial.sum(dim=(1, 2)), torch.ones(batch_size))
    torch.testing.assert_close(initial[0], torch.exp(-20 * cost[0]) / torch.exp(-20 * cost[0]).sum())

    plan = sinkhorn(cost, column, 20.0, 5)
    torch.testing.assert_close(plan.sum(dim=1), column, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(plan.sum(dim=(1, 2)), torch.ones(batch_size), rtol=1e-6, atol=1e-6)
    for b in range(batch_size):
        expected = reference_sinkhorn(cost[b].double(), column[b].double(), 20.0, 5)
        torch.testing.assert_close(plan[b].double(), expected, rtol=1e-5, atol=1e-9)

    def row_error(iterations: int) -> float:
        rows = sinkhorn(cost.double(), column.double(), 20.0, iterations).sum(dim=2)
        return float((rows * n_tokens - 1).abs().max())

    errors = [row_error(iterations) for iterations in (1, 5, 50, 500)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-6


@pytest.mark.parametrize("iterations", [0, 1, 5, 20])
def test_sinkhorn_labels_are_the_argmax_of_the_reference_plan(iterations):
    # The labels-only path skips the row scaling; the argmax must still be the plan's, which with
    # lopsided column marginals is not the cheapest cluster of every token (checked, so the test bites).
    generator = torch.Generator().manual_seed(5)
    batch_size, n_tokens, n_clusters = 4, 64, 8
    cost = torch.rand(batch_size, n_tokens, n_clusters, generator=generator, dtype=torch.float64)
    column = torch.rand(batch_size, n_clusters, generator=generator, dtype=torch.float64) ** 3 + 0.01
    column = column / column.sum(dim=1, keepdim=True)
    labels = sinkhorn_labels(cost, column, 20.0, iterations)
    assert labels.shape == (batch_size, n_tokens) and labels.dtype == torch.long
    expected = torch.stack(
        [reference_sinkhorn(cost[b], column[b], 20.0, iterations).argmax(dim=1) for b in range(batch_size)]
    )
    assert torch.equal(labels, expected)
    assert torch.equal(labels, sinkhorn(cost, column, 20.0, iterations).argmax(dim=2))
    if iterations:
        assert (labels != cost.argmin(dim=2)).float().mean() > 0.1


def test_sinkhorn_constant_cost_is_uniform_and_nan_becomes_small():
    plan = sinkhorn(torch.full((1, 4, 2), 0.3), torch.full((1, 2), 0.5))
    torch.testing.assert_close(plan, torch.full((1, 4, 2), 1 / 8))
    cost = torch.rand(2, 4, 3)
    cost[0, 1, 2] = float("nan")
    plan = sinkhorn(cost, torch.full((2, 3), 1 / 3))
    assert torch.equal(plan[0], torch.full((4, 3), 1e-8))
    assert torch.isfinite(plan[1]).all() and (plan[1] > 1e-6).all()


def test_min_max_normalize_per_image_and_batch():
    cost = torch.tensor([[[0.0, 2.0]], [[1.0, 5.0]], [[3.0, 3.0]]])
    torch.testing.assert_close(
        min_max_normalize(cost, "image"), torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]], [[0.0, 0.0]]])
    )
    torch.testing.assert_close(min_max_normalize(cost, "batch"), cost / 5.0)
    with pytest.raises(ValueError, match="cost_normalization"):
        min_max_normalize(cost, "global")


def test_update_column_marginal_formula():
    column = update_column_marginal(torch.tensor([[0, 0, 0, 2], [1, 1, 1, 1]]), 3)
    expected = torch.tensor([[3.01, 0.01, 1.01], [0.01, 4.01, 0.01]]) / 4.03
    torch.testing.assert_close(column, expected)


def test_update_centroids_normalised_sum_and_zero_for_empty():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    centroids = update_centroids(tokens, torch.tensor([[0, 0, 2]]), 3)
    expected = torch.tensor([[[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 0.0], [0.6, 0.8]]])
    torch.testing.assert_close(centroids, expected)


# ----------------------------------------------------------------------------------------------
# Output structure and object representations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_output_structure(alpha):
    batch_size, n_view, n_clusters = 4, 16, 6
    tokens1, tokens2, positions1, positions2 = random_inputs(batch_size, n_view, n_view, 8, seed=4)
    result = joint_cluster(
        tokens1,
        tokens2,
        positions1,
        positions2,
        n_clusters,
        alpha,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.assign1.shape == (batch_size, n_view, n_clusters) and result.assign1.dtype == torch.float32
    assert result.assign2.shape == (batch_size, n_view, n_clusters)
    assert result.labels.shape == (batch_size, 2 * n_view) and result.labels.dtype == torch.long
    assert result.valid.dtype == torch.bool and result.counts.dtype == torch.long
    # Every token belongs to exactly one cluster, the one named by its label.
    joint = torch.cat([result.assign1, result.assign2], dim=1)
    assert ((joint > 0).sum(dim=2) == 1).all()
    assert torch.equal(joint.argmax(dim=2), result.labels)
    for assign in (result.assign1, result.assign2):
        sums = assign.sum(dim=1)
        non_empty = (assign > 0).any(dim=1)
        torch.testing.assert_close(sums[non_empty], torch.ones(int(non_empty.sum())))
        assert (sums[~non_empty] == 0).all()
        # Equal weights 1 / n_k on the members of a column.
        sizes = (assign > 0).sum(dim=1, keepdim=True).clamp_min(1).float()
        torch.testing.assert_close(assign, (assign > 0).float() / sizes)
    in_view1 = (result.assign1 > 0).any(dim=1)
    in_view2 = (result.assign2 > 0).any(dim=1)
    assert torch.equal(result.valid, in_view1 & in_view2)
    assert torch.equal(result.counts, result.valid.sum(dim=1))
    assert (result.counts <= n_clusters).all()


def test_object_representations_are_member_means_in_order():
    batch_size, n_view, n_clusters, dim = 3, 16, 5, 8
    tokens1, tokens2, positions1, positions2 = random_inputs(batch_size, n_view, n_view, dim, seed=9)
    result = joint_cluster(
        tokens1, tokens2, positions1, positions2, n_clusters, 1.0, generator=torch.Generator().manual_seed(1)
    )
    objects1 = object_representations(tokens1, result.assign1, result.valid)
    objects2 = object_representations(tokens2, result.assign2, result.valid)
    expected1, expected2 = [], []
    for b in range(batch_size):
        for k in range(n_clusters):
            if result.valid[b, k]:
                expected1.append(tokens1[b][result.labels[b, :n_view] == k].mean(dim=0))
                expected2.append(tokens2[b][result.labels[b, n_view:] == k].mean(dim=0))
    assert objects1.shape == (int(result.counts.sum()), dim)
    torch.testing.assert_close(objects1, torch.stack(expected1))
    torch.testing.assert_close(objects2, torch.stack(expected2))


def test_object_representations_hand_order_and_student_gradient():
    # Image 0: clusters 0 and 2 valid; image 1: cluster 1 valid.
    tokens = torch.tensor([[[1.0], [3.0], [10.0]], [[5.0], [7.0], [9.0]]])
    assign = torch.tensor(
        [
            [[0.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 1.0]],
            [[0.0, 0.5, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    valid = torch.tensor([[True, False, True], [False, True, False]])
    teacher = object_representations(tokens, assign, valid)
    torch.testing.assert_close(teacher, torch.tensor([[2.0], [10.0], [6.0]]))
    student_tokens = tokens.clone().requires_grad_(True)
    student = object_representations(student_tokens, assign, valid)
    torch.testing.assert_close(student.detach(), teacher)
    student.sum().backward()
    # d(sum of objects)/d(token) = weight of the token in the valid objects.
    torch.testing.assert_close(
        student_tokens.grad, torch.tensor([[[0.5], [0.5], [1.0]], [[0.5], [0.5], [0.0]]])
    )
    with pytest.raises(ValueError, match="valid"):
        object_representations(tokens, assign, valid.float())


# ----------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_alpha_zero_recovers_well_separated_groups(seed):
    generator = torch.Generator().manual_seed(seed)
    batch_size, n_view, n_clusters, dim = 2, 24, 4, 16
    directions = torch.eye(dim)[:n_clusters] * 5
    groups = torch.randint(0, n_clusters, (batch_size, 2 * n_view), generator=generator)
    groups[:, : 2 * n_clusters] = torch.arange(n_clusters).repeat(2)  # every group in both views
    tokens = directions[groups] + 0.3 * torch.randn(batch_size, 2 * n_view, dim, generator=generator)
    positions = torch.rand(batch_size, 2, 2 * n_view, generator=generator) * 100
    result = joint_cluster(
        tokens[:, :n_view],
        tokens[:, n_view:],
        positions[..., :n_view],
        positions[..., n_view:],
        n_clusters,
        0.0,
        generator=generator,
    )
    for b in range(batch_size):
        # Same partition up to renaming: group -> label is a bijection.
        pairs = set(zip(groups[b].tolist(), result.labels[b].tolist(), strict=True))
        assert len(pairs) == n_clusters
        assert len({label for _, label in pairs}) == n_clusters
    assert (result.counts == n_clusters).all()


def test_constant_tokens_with_positional_cost_give_compact_clusters():
    batch_size, side, dim = 2, 8, 16
    positions1 = grid_positions(side, 10.0, (0.0, 0.0)).expand(batch_size, -1, -1)
    positions2 = grid_positions(side, 8.0, (13.0, 7.0)).expand(batch_size, -1, -1)
    tokens = torch.ones(batch_size, side * side, dim)
    for n_clusters in (4, 8):
        result = joint_cluster(
            tokens,
            tokens,
            positions1,
            positions2,
            n_clusters,
            1.0,
            generator=torch.Generator().manual_seed(0),
        )
        positions = torch.cat([positions1, positions2], dim=2).transpose(1, 2)
        ratios = []
        for b in range(batch_size):
            distance = torch.cdist(positions[b], positions[b])
            labels = result.labels[b]
            assert labels.unique().numel() > 1
            for k in labels.unique():
                member = labels == k
                size = int(member.sum())
                if size < 2:
                    continue
                intra = distance[member][:, member].sum() / (size * (size - 1))
                inter = distance[member][:, ~member].mean()
                assert intra < inter
                ratios.append(float(intra / inter))
        # A random partition gives a ratio near 1.
        assert sum(ratios) / len(ratios) < 0.7


def test_token_scale_invariance():
    generator = torch.Generator().manual_seed(3)
    tokens1, tokens2, positions1, positions2 = random_inputs(3, 16, 16, 8, seed=3)
    # Powers of two keep the normalised tokens bit-identical, so the comparison is exact.
    scale1 = 2.0 ** torch.randint(-8, 9, (3, 16, 1), generator=generator).float()
    scale2 = 2.0 ** torch.randint(-8, 9, (3, 16, 1), generator=generator).float()
    seeds = draw_seed_indices(3, 32, 5, torch.Generator().manual_seed(0))
    base = joint_cluster(tokens1, tokens2, positions1, positions2, 5, 1.0, seed_indices=seeds)
    scaled = joint_cluster(
        tokens1 * scale1, tokens2 * scale2, positions1, positions2, 5, 1.0, seed_indices=seeds
    )
    assert torch.equal(base.labels, scaled.labels)
    assert torch.equal(base.assign1, scaled.assign1) and torch.equal(base.valid, scaled.valid)
    # Random (non power of two) positive scales: same hard clustering.
    scale = torch.rand(3, 16, 1, generator=generator) * 50 + 0.02
    scaled = joint_cluster(tokens1 * scale, tokens2, positions1, positions2, 5, 1.0, seed_indices=seeds)
    assert torch.equal(base.labels, scaled.labels)


def test_image_normalisation_is_independent_of_batch_but_batch_mode_is_not():
    generator = torch.Generator().manual_seed(4)
    n_view, n_clusters, dim = 16, 4, 8
    # Image 0: tokens close to one direction, so its own cost range is narrow.
    anchor = torch.randn(dim, generator=generator)
    image0 = anchor + 0.3 * torch.randn(2 * n_view, dim, generator=generator)
    # Two different companions for image 0: random tokens, and the negated image 0 (wide range).
    companions = [torch.randn(2 * n_view, dim, generator=generator), -image0 * 4 + 0.1]
    positions = torch.rand(2, 2, 2 * n_view, generator=generator) * 100
    seeds = draw_seed_indices(2, 2 * n_view, n_clusters, torch.Generator().manual_seed(0))
    alone = {}
    for mode in ("image", "batch"):
        alone[mode] = joint_cluster(
            image0[None, :n_view],
            image0[None, n_view:],
            positions[:1, :, :n_view],
            positions[:1, :, n_view:],
            n_clusters,
            1.0,
            cost_normalization=mode,
            seed_indices=seeds[:1],
        )
    differs = False
    for companion in companions:
        tokens = torch.stack([image0, companion])
        for mode in ("image", "batch"):
            result = joint_cluster(
                tokens[:, :n_view],
                tokens[:, n_view:],
                positions[..., :n_view],
                positions[..., n_view:],
                n_clusters,
                1.0,
                cost_normalization=mode,
                seed_indices=seeds,
            )
            if mode == "image":
                assert torch.equal(result.labels[0], alone["image"].labels[0])
                assert torch.equal(result.assign1[0], alone["image"].assign1[0])
            else:
                differs |= not torch.equal(result.labels[0], alone["batch"].labels[0])
    # The reference's batch-global scaling couples the images of one GPU (docs/differences.md, difference 4).
    assert differs
    # A batch of one is the same in both modes.
    assert torch.equal(alone["image"].labels, alone["batch"].labels)


def test_ties_give_one_cluster_per_token():
    # Constant tokens and alpha = 0: every plan entry ties; argmax puts every token in cluster 0.
    tokens = torch.ones(2, 8, 4)
    positions = torch.rand(2, 2, 8)
    result = joint_cluster(
        tokens, tokens, positions, positions, 3, 0.0, generator=torch.Generator().manual_seed(0)
    )
    assert (result.labels == 0).all()
    torch.testing.assert_close(result.assign1.sum(dim=1), torch.tensor([[1.0, 0.0, 0.0]] * 2))
    assert torch.equal(result.counts, torch.tensor([1, 1]))


# ----------------------------------------------------------------------------------------------
# Memory, dtype, gradients, seeds, schedule, errors
# ----------------------------------------------------------------------------------------------


def test_no_tensor_of_size_b_p2_k_is_allocated():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor):
                    self.largest = max(self.largest, value.numel())
            return out

    batch_size, n_view, n_clusters, dim = 2, 24, 24, 8
    n_joint = 2 * n_view
    tokens1, tokens2, positions1, positions2 = random_inputs(batch_size, n_view, n_view, dim, seed=0)
    tracker = LargestOutput()
    with tracker:
        joint_cluster(tokens1, tokens2, positions1, positions2, n_clusters, 1.0, generator=torch.Generator())
    assert tracker.largest >= batch_size * n_joint * n_joint  # the tracker sees the distance matrix
    assert tracker.largest < batch_size * n_joint * n_joint * n_clusters // 4


def test_float32_no_grad_and_autocast_disabled():
    tokens1, tokens2, positions1, positions2 = random_inputs(2, 16, 16, 8, seed=5)
    seeds = draw_seed_indices(2, 32, 4, torch.Generator().manual_seed(0))
    base = joint_cluster(tokens1, tokens2, positions1, positions2, 4, 1.0, seed_indices=seeds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = joint_cluster(tokens1, tokens2, positions1, positions2, 4, 1.0, seed_indices=seeds)
    assert torch.equal(base.labels, under_autocast.labels)
    assert under_autocast.assign1.dtype == torch.float32
    grad_tokens = tokens1.clone().requires_grad_(True)
    result = joint_cluster(grad_tokens, tokens2, positions1, positions2, 4, 1.0, seed_indices=seeds)
    assert not result.assign1.requires_grad and torch.equal(result.labels, base.labels)
    half = joint_cluster(
        tokens1.bfloat16(), tokens2.bfloat16(), positions1, positions2, 4, 1.0, seed_indices=seeds
    )
    assert half.assign1.dtype == torch.float32


def test_draw_seed_indices_distinct_reproducible_and_uniform():
    seeds = draw_seed_indices(4000, 6, 2, torch.Generator().manual_seed(0))
    assert seeds.shape == (4000, 2) and seeds.dtype == torch.long
    assert (seeds[:, 0] != seeds[:, 1]).all()
    assert torch.equal(seeds, draw_seed_indices(4000, 6, 2, torch.Generator().manual_seed(0)))
    frequency = torch.bincount(seeds.flatten(), minlength=6).float() / 4000
    # Each of the 6 joint tokens (both views) is a seed with probability K / P = 1/3.
    torch.testing.assert_close(frequency, torch.full((6,), 1 / 3), rtol=0, atol=0.03)
    full = draw_seed_indices(3, 5, 5, torch.Generator().manual_seed(1))
    assert torch.equal(full.sort(dim=1).values, torch.arange(5).expand(3, 5))


def test_positional_alpha_runs_from_second_to_first_value():
    assert positional_alpha(0, 10, (1.0, 2.0)) == pytest.approx(2.0)
    assert positional_alpha(9, 10, (1.0, 2.0)) == pytest.approx(1.0)
    assert positional_alpha(1, 3, (0.0, 1.0)) == pytest.approx(0.5)
    assert positional_alpha(5, 300, (2.0, 2.0)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="epoch"):
        positional_alpha(10, 10, (1.0, 2.0))


def test_input_errors_are_clear():
    tokens1, tokens2, positions1, positions2 = random_inputs(2, 4, 4, 3, seed=0)
    with pytest.raises(ValueError, match="n_tokens"):
        joint_cluster(tokens1, tokens2, positions1, positions2, 9, 1.0)
    with pytest.raises(ValueError, match="positions2"):
        joint_cluster(tokens1, tokens2, positions1, positions2.transpose(1, 2), 3, 1.0)
    with pytest.raises(ValueError, match="cost_normalization"):
        joint_cluster(tokens1, tokens2, positions1, positions2, 3, 1.0, cost_normalization="gpu")
    with pytest.raises(ValueError, match="distinct"):
        joint_cluster(
            tokens1, tokens2, positions1, positions2, 2, 1.0, seed_indices=torch.tensor([[0, 0], [1, 2]])
        )
    with pytest.raises(ValueError, match="n_iter"):
        joint_cluster(tokens1, tokens2, positions1, positions2, 2, 1.0, n_iter=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    tokens1, tokens2, positions1, positions2 = random_inputs(3, 16, 16, 8, seed=6)
    seeds = draw_seed_indices(3, 32, 5, torch.Generator().manual_seed(0))
    cpu = joint_cluster(tokens1, tokens2, positions1, positions2, 5, 1.0, seed_indices=seeds)
    cuda = joint_cluster(
        tokens1.cuda(), tokens2.cuda(), positions1.cuda(), positions2.cuda(), 5, 1.0, seed_indices=seeds
    )
    assert torch.equal(cpu.labels, cuda.labels.cpu())
    with torch.autocast("cuda", dtype=torch.float16):
        autocast = joint_cluster(
            tokens1.cuda(), tokens2.cuda(), positions1.cuda(), positions2.cuda(), 5, 1.0, seed_indices=seeds
        )
    assert torch.equal(cpu.labels, autocast.labels.cpu())
    generated = joint_cluster(
        tokens1.cuda(),
        tokens2.cuda(),
        positions1.cuda(),
        positions2.cuda(),
        5,
        1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(cpu.labels, generated.labels.cpu())
