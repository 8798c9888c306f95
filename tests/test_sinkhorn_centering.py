"""Sinkhorn centring of the object targets (``--centering_c sinkhorn``) against a probability-space
Sinkhorn-Knopp written out in the test, its invariants, the loss terms built on it, and two gloo ranks."""

from __future__ import annotations

import pytest
import torch
from ddp_helpers import run_distributed

from cribo_utils.method.loss import CrIBoLoss, sinkhorn_potential
from cribo_utils.runtime import distributed
from cribo_utils.train.parser import resolve_args


def reference_sinkhorn_targets(scores: torch.Tensor, iterations: int) -> torch.Tensor:
    """DINOv2's teacher Sinkhorn-Knopp, one prototype and one object at a time, in float64.

    ``Q = exp(s)^T / sum``; then ``iterations`` times: each prototype row to mass 1/K, each object column
    to mass 1/B; finally every column times B, so each object's target sums to 1."""
    exp = torch.exp(scores.double() - scores.double().max()).T.clone()  # (K, B)
    prototypes, objects = exp.shape
    exp /= exp.sum()
    for _ in range(iterations):
        for k in range(prototypes):
            exp[k] = exp[k] / exp[k].sum() / prototypes
        for i in range(objects):
            exp[:, i] = exp[:, i] / exp[:, i].sum() / objects
    return (exp * objects).T


def sinkhorn_targets(scores: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    return torch.softmax(scores + sinkhorn_potential(scores, iterations), dim=1)


def cross_entropy(targets: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """``-sum_j T_j log softmax(s / tau_s)_j`` for one row, float64."""
    log_probs = torch.log_softmax(student_logits.double() / student_temp, dim=-1)
    return -(targets.double() * log_probs).sum()


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_potential_gives_the_written_out_sinkhorn_knopp(iterations: int) -> None:
    scores = torch.randn(12, 5, generator=torch.Generator().manual_seed(iterations)) * 3
    expected = reference_sinkhorn_targets(scores, iterations)
    assert torch.allclose(sinkhorn_targets(scores, iterations).double(), expected, atol=1e-6)
    # and they are not the plain softmax: the balance moved them
    assert not torch.allclose(torch.softmax(scores, dim=1).double(), expected, atol=1e-3)


def test_targets_spread_evenly_over_the_prototypes_once_converged() -> None:
    # Every object prefers prototype 0 by far: the plain softmax puts all of them there.
    scores = torch.randn(24, 6, generator=torch.Generator().manual_seed(1))
    scores[:, 0] += 8.0
    assert torch.softmax(scores, dim=1)[:, 0].mean() > 0.99
    targets = sinkhorn_targets(scores, iterations=200)
    assert torch.allclose(targets.sum(dim=1), torch.ones(24), atol=1e-5)
    assert torch.allclose(targets.sum(dim=0), torch.full((6,), 24 / 6), atol=1e-3)


def test_targets_ignore_offsets_per_prototype_and_converge_to_ignore_offsets_per_object() -> None:
    """Like the mean centring, a constant added to one prototype's logits for every object changes nothing.
    A constant added to all logits of one object weighs that object more in the first prototype step (as
    in DINOv2), so it only cancels once the iterations have converged."""
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(10, 4, generator=generator)
    per_prototype = torch.randn(1, 4, generator=generator) * 5
    per_object = torch.randn(10, 1, generator=generator) * 5
    assert torch.allclose(sinkhorn_targets(scores + per_prototype), sinkhorn_targets(scores), atol=1e-5)
    assert not torch.allclose(sinkhorn_targets(scores + per_object), sinkhorn_targets(scores), atol=1e-3)
    converged = sinkhorn_targets(scores + per_object, 500)
    assert torch.allclose(converged, sinkhorn_targets(scores, 500), atol=1e-4)


def test_very_sharp_scores_stay_finite() -> None:
    """Logits over the preset's tau_c = 0.01 reach hundreds: the log-domain updates must not overflow."""
    scores = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)) * 400
    targets = sinkhorn_targets(scores)
    assert torch.isfinite(targets).all()
    assert torch.allclose(targets.sum(dim=1), torch.ones(16), atol=1e-5)


def test_no_rows_gives_a_zero_potential() -> None:
    assert torch.equal(sinkhorn_potential(torch.zeros(0, 5)), torch.zeros(1, 5))


def test_loss_with_sinkhorn_centring_matches_the_loop_form() -> None:
    """``L_obj`` and ``L_nn`` with ``U = sm(t / tau_c + beta)`` and ``V = sm(q / tau_c + beta)``, ``beta``
    balanced over the 2M current objects only (the neighbours' rows are targets, not part of the balance)."""
    generator = torch.Generator().manual_seed(4)
    objects, out_c, temp_c, student_temp = 6, 5, 0.08, 0.1
    student_cls, teacher_cls = torch.randn(4, 7, generator=generator), torch.randn(4, 7, generator=generator)
    student_obj = torch.randn(2, objects, out_c, generator=generator)
    teacher_obj = torch.randn(2, objects, out_c, generator=generator)
    teacher_nn = torch.randn(2, objects, out_c, generator=generator)
    masks = torch.tensor([[True, False, True, True, False, False], [False, False, True, False, True, True]])
    loss = CrIBoLoss(7, out_c, 0.04, 0.07, temp_c, temp_c, 0, 10, centering_c="sinkhorn")
    loss.center_c.fill_(3.0)  # unused by the Sinkhorn centring
    values = loss(student_cls, teacher_cls, student_obj, teacher_obj, teacher_nn, masks, epoch=5)

    current = reference_sinkhorn_targets(teacher_obj.reshape(-1, out_c) / temp_c, 3).view(2, objects, out_c)
    # the neighbours' targets: the same per-prototype weights, i.e. each row reweighted and renormalised
    weights = current[0, 0] / torch.softmax(teacher_obj[0, 0].double() / temp_c, dim=0)
    neighbours = torch.softmax(teacher_nn.double() / temp_c, dim=-1) * weights
    neighbours = neighbours / neighbours.sum(dim=-1, keepdim=True)
    expected_obj = sum(
        cross_entropy(current[v, i], student_obj[1 - v, i], student_temp)
        for v in range(2)
        for i in range(objects)
    ) / (2 * objects)
    expected_nn = 0.0
    for v in range(2):  # direction v: the neighbour found from view v, predicted from the other view
        accepted = [i for i in range(objects) if masks[v, i]]
        terms = [cross_entropy(neighbours[v, i], student_obj[1 - v, i], student_temp) for i in accepted]
        expected_nn += 0.5 * sum(terms) / len(accepted)
    assert float(values["loss_obj"]) == pytest.approx(float(expected_obj), abs=1e-5)
    assert float(values["loss_nn"]) == pytest.approx(float(expected_nn), abs=1e-5)
    # the mean centring gives other values on the same inputs (the flag is not ignored)
    mean = CrIBoLoss(7, out_c, 0.04, 0.07, temp_c, temp_c, 0, 10)
    mean_values = mean(student_cls, teacher_cls, student_obj, teacher_obj, teacher_nn, masks, epoch=5)
    assert abs(float(mean_values["loss_obj"]) - float(expected_obj)) > 1e-3
    # the object centre is still kept up to date (resuming with the other centring starts from it)
    expected_centre = 0.9 * 3.0 + 0.1 * teacher_obj.reshape(-1, out_c).mean(0, keepdim=True)
    assert torch.allclose(loss.center_c, expected_centre)


def test_unknown_centring_is_refused_by_the_loss_and_the_parser() -> None:
    with pytest.raises(ValueError, match="centering_c"):
        CrIBoLoss(7, 5, 0.04, 0.07, 0.04, 0.07, 0, 10, centering_c="median")
    assert resolve_args([]).centering_c == "mean"
    assert resolve_args(["--centering_c", "sinkhorn"]).centering_c == "sinkhorn"
    with pytest.raises(SystemExit):
        resolve_args(["--centering_c", "median"])


def _rank_rows(rank: int) -> torch.Tensor:
    counts = {0: 7, 1: 0, 2: 3}
    return torch.randn(counts[rank], 5, generator=torch.Generator().manual_seed(rank)) * 4


def _potential_of_this_rank() -> torch.Tensor:
    return sinkhorn_potential(_rank_rows(distributed.get_rank()))


@pytest.mark.slow
def test_potential_on_three_ranks_equals_one_process_on_all_rows() -> None:
    """The balance is over the objects of every rank (one of them has none), as one process sees them all."""
    per_rank = run_distributed(_potential_of_this_rank, world_size=3)
    all_rows = torch.cat([_rank_rows(rank) for rank in range(3)])
    expected = reference_sinkhorn_targets(all_rows, 3)
    for rank in range(3):
        assert torch.allclose(per_rank[rank], per_rank[0], atol=1e-6)
        assert torch.allclose(torch.softmax(all_rows + per_rank[rank], dim=1).double(), expected, atol=1e-5)
