"""Tests for cribo_utils/method/loss.py against loop-form formulas of docs/method.md, Sec. 6."""

from __future__ import annotations

import math

import pytest
import torch
from ddp_helpers import run_distributed

from cribo_utils.method.loss import (
    CrIBoLoss,
    cross_view_object_loss,
    image_level_loss,
    nearest_neighbour_loss,
    teacher_temperature,
    update_center,
)
from cribo_utils.runtime import distributed

OUT, OUT_C = 7, 5

# --------------------------------------------------------------------------------------------------
# Loop-form reference (float64, one row at a time)
# --------------------------------------------------------------------------------------------------


def row_cross_entropy(
    teacher_logits: torch.Tensor, teacher_temp: float, student_logits: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """H(softmax(t / tau_t), softmax(s / tau_s)) = -sum_j T_j log Q_j for one row, written out."""
    t = teacher_logits.double() / teacher_temp
    s = student_logits.double() / student_temp
    exp_t = [math.exp(float(t[j] - t.max())) for j in range(t.numel())]
    teacher = [e / sum(exp_t) for e in exp_t]
    log_normaliser = s.max() + torch.log(sum(torch.exp(s[j] - s.max()) for j in range(s.numel())))
    return -sum(teacher[j] * (s[j] - log_normaliser) for j in range(s.numel()))


def reference_image_loss(student, teacher, center, student_temp, teacher_temp):
    batch = student.shape[0] // 2
    total = 0.0
    for teacher_view, student_view in ((0, 1), (1, 0)):
        terms = [
            row_cross_entropy(
                teacher[teacher_view * batch + b] - center[0],
                teacher_temp,
                student[student_view * batch + b],
                student_temp,
            )
            for b in range(batch)
        ]
        total = total + sum(terms) / batch
    return total / 2


def reference_object_loss(student, teacher, center, student_temp, teacher_temp):
    n = student.shape[1]
    if n == 0:
        return torch.zeros((), dtype=torch.float64)
    total = 0.0
    for teacher_view, student_view in ((0, 1), (1, 0)):
        total = (
            total
            + sum(
                row_cross_entropy(
                    teacher[teacher_view, i] - center[0], teacher_temp, student[student_view, i], student_temp
                )
                for i in range(n)
            )
            / n
        )
    return total / 2


def reference_nn_loss(student, teacher_nn, masks, center, student_temp, teacher_temp):
    total = 0.0
    for teacher_view, student_view in ((0, 1), (1, 0)):
        accepted = [i for i in range(student.shape[1]) if bool(masks[teacher_view, i])]
        if accepted:
            total = total + sum(
                row_cross_entropy(
                    teacher_nn[teacher_view, i] - center[0],
                    teacher_temp,
                    student[student_view, i],
                    student_temp,
                )
                for i in accepted
            ) / len(accepted)
    return total / 2 if torch.is_tensor(total) else torch.zeros((), dtype=torch.float64)


def make_inputs(batch: int = 3, objects: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "student_cls": torch.randn(2 * batch, OUT, generator=generator),
        "teacher_cls": torch.randn(2 * batch, OUT, generator=generator),
        "student_obj": torch.randn(2, objects, OUT_C, generator=generator),
        "teacher_obj": torch.randn(2, objects, OUT_C, generator=generator),
        "teacher_nn": torch.randn(2, objects, OUT_C, generator=generator),
        "nn_masks": torch.rand(2, objects, generator=generator) > 0.4,
    }


def make_loss(warmup_epochs: int = 3, epochs: int = 10) -> CrIBoLoss:
    return CrIBoLoss(OUT, OUT_C, 0.04, 0.07, 0.05, 0.08, warmup_epochs, epochs)


def entropy(logits: torch.Tensor, temp: float) -> torch.Tensor:
    probs = torch.softmax(logits.double() / temp, dim=-1)
    return -(probs * probs.log()).sum(-1)


# --------------------------------------------------------------------------------------------------
# Terms against the loop form
# --------------------------------------------------------------------------------------------------


def test_terms_match_loop_form_with_nonzero_centres() -> None:
    x = make_inputs()
    center, center_c = torch.randn(1, OUT), torch.randn(1, OUT_C)
    assert torch.allclose(
        image_level_loss(x["student_cls"], x["teacher_cls"], center, 0.1, 0.04).double(),
        reference_image_loss(x["student_cls"], x["teacher_cls"], center, 0.1, 0.04),
        atol=1e-5,
    )
    assert torch.allclose(
        cross_view_object_loss(x["student_obj"], x["teacher_obj"], center_c, 0.2, 0.06).double(),
        reference_object_loss(x["student_obj"], x["teacher_obj"], center_c, 0.2, 0.06),
        atol=1e-5,
    )
    assert torch.allclose(
        nearest_neighbour_loss(
            x["student_obj"], x["teacher_nn"], x["nn_masks"], center_c, 0.2, 0.06
        ).double(),
        reference_nn_loss(x["student_obj"], x["teacher_nn"], x["nn_masks"], center_c, 0.2, 0.06),
        atol=1e-5,
    )


def test_forward_matches_loop_form_and_gradients() -> None:
    x = make_inputs(seed=1)
    loss = make_loss()
    loss.center.copy_(torch.randn(1, OUT))
    loss.center_c.copy_(torch.randn(1, OUT_C))
    old_center, old_center_c = loss.center.clone(), loss.center_c.clone()
    student_cls = x["student_cls"].requires_grad_()
    student_obj = x["student_obj"].requires_grad_()
    epoch = 1
    out = loss(
        student_cls, x["teacher_cls"], student_obj, x["teacher_obj"], x["teacher_nn"], x["nn_masks"], epoch
    )

    temp, temp_c = teacher_temperature(0.04, 0.07, 3, epoch), teacher_temperature(0.05, 0.08, 3, epoch)
    ref_student_cls = x["student_cls"].detach().double().requires_grad_()
    ref_student_obj = x["student_obj"].detach().double().requires_grad_()
    ref_img = reference_image_loss(ref_student_cls, x["teacher_cls"], old_center, 0.1, temp)
    ref_obj = reference_object_loss(ref_student_obj, x["teacher_obj"], old_center_c, 0.1, temp_c)
    ref_nn = reference_nn_loss(ref_student_obj, x["teacher_nn"], x["nn_masks"], old_center_c, 0.1, temp_c)
    for key, ref in (("loss_img", ref_img), ("loss_obj", ref_obj), ("loss_nn", ref_nn)):
        assert torch.allclose(out[key].double(), ref, atol=1e-5), key
    assert torch.allclose(out["loss"].double(), ref_img + ref_obj + ref_nn, atol=1e-5)

    out["loss"].backward()
    (ref_img + ref_obj + ref_nn).backward()
    assert torch.allclose(student_cls.grad.double(), ref_student_cls.grad, atol=1e-5)
    assert torch.allclose(student_obj.grad.double(), ref_student_obj.grad, atol=1e-5)

    # Centres updated after the loss, from the current teacher outputs only (no neighbour outputs).
    expected_center = 0.9 * old_center + 0.1 * x["teacher_cls"].mean(0, keepdim=True)
    expected_center_c = 0.9 * old_center_c + 0.1 * x["teacher_obj"].reshape(-1, OUT_C).mean(0, keepdim=True)
    assert torch.allclose(loss.center, expected_center, atol=1e-6)
    assert torch.allclose(loss.center_c, expected_center_c, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Values you can work out by hand
# --------------------------------------------------------------------------------------------------


def test_constant_student_logits_give_log_out_dim_for_every_term() -> None:
    x = make_inputs(seed=2)
    x["nn_masks"][:, 0] = True
    out = make_loss()(
        torch.full_like(x["student_cls"], 3.0),
        x["teacher_cls"],
        torch.full_like(x["student_obj"], -2.0),
        x["teacher_obj"],
        x["teacher_nn"],
        x["nn_masks"],
        epoch=0,
    )
    assert out["loss_img"].item() == pytest.approx(math.log(OUT), abs=1e-5)
    assert out["loss_obj"].item() == pytest.approx(math.log(OUT_C), abs=1e-5)
    assert out["loss_nn"].item() == pytest.approx(math.log(OUT_C), abs=1e-5)


def test_identical_student_and_teacher_distributions_give_the_teacher_entropy() -> None:
    """With C = 0, student logits = teacher logits * tau_s / tau_t (views swapped, because the terms are
    cross-view) give Q = T, so each term is the mean entropy of the teacher distributions."""
    x = make_inputs(seed=3)
    temp, temp_c = 0.04, 0.05  # epoch 0
    teacher_cls, teacher_obj = x["teacher_cls"], x["teacher_obj"]
    student_cls = torch.cat(teacher_cls.chunk(2)[::-1]) * 0.1 / temp
    student_obj = teacher_obj.flip(0) * 0.1 / temp_c
    teacher_nn = teacher_obj.clone()
    masks = torch.ones(2, teacher_obj.shape[1], dtype=torch.bool)
    out = make_loss()(student_cls, teacher_cls, student_obj, teacher_obj, teacher_nn, masks, epoch=0)
    assert out["loss_img"].item() == pytest.approx(entropy(teacher_cls, temp).mean().item(), abs=1e-5)
    assert out["loss_obj"].item() == pytest.approx(entropy(teacher_obj, temp_c).mean().item(), abs=1e-5)
    assert out["loss_nn"].item() == pytest.approx(entropy(teacher_obj, temp_c).mean().item(), abs=1e-5)


def test_masked_out_neighbours_change_neither_loss_nor_gradients() -> None:
    x = make_inputs(objects=6, seed=4)
    masks = torch.tensor([[True, False, True, False, False, True], [False, False, True, True, False, False]])

    def loss_and_grad(teacher_nn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        student = x["student_obj"].clone().requires_grad_()
        value = nearest_neighbour_loss(student, teacher_nn, masks, torch.zeros(1, OUT_C), 0.1, 0.07)
        value.backward()
        return value.detach(), student.grad

    base_value, base_grad = loss_and_grad(x["teacher_nn"])
    changed = x["teacher_nn"].clone()
    changed[~masks] = torch.randn(int((~masks).sum()), OUT_C) * 100
    changed[0, 1, 0] = float("nan")  # even a non-finite rejected row must not leak
    changed[1, 0, 0] = float("inf")
    value, grad = loss_and_grad(changed)
    assert torch.equal(value, base_value) and torch.equal(grad, base_grad)
    assert base_grad[:, 4].abs().sum() == 0  # object 4 is rejected in both directions: no gradient


def test_each_direction_is_normalised_by_its_own_mask() -> None:
    x = make_inputs(objects=5, seed=5)
    center = torch.zeros(1, OUT_C)
    student, teacher_nn = x["student_obj"], x["teacher_nn"]
    per_row = [
        [row_cross_entropy(teacher_nn[v, i], 0.07, student[1 - v, i], 0.1) for i in range(5)]
        for v in range(2)
    ]
    # |m1| = 2, |m2| = 1: L = 1/2 (mean of the two direction-1 rows + the one direction-2 row).
    masks = torch.tensor([[True, False, False, True, False], [False, True, False, False, False]])
    expected = 0.5 * ((per_row[0][0] + per_row[0][3]) / 2 + per_row[1][1])
    value = nearest_neighbour_loss(student, teacher_nn, masks, center, 0.1, 0.07)
    assert value.item() == pytest.approx(expected.item(), abs=1e-5)
    reference_defect = 0.5 * ((per_row[0][0] + per_row[0][3]) / 2 + per_row[1][1] / 2)  # both sums / |m1|
    assert abs(value.item() - reference_defect.item()) > 1e-3
    # |m1| = 0, |m2| = 2: the reference drops the whole loss; here direction 2 still counts.
    masks = torch.tensor([[False] * 5, [True, False, True, False, False]])
    expected = 0.5 * (per_row[1][0] + per_row[1][2]) / 2
    value = nearest_neighbour_loss(student, teacher_nn, masks, center, 0.1, 0.07)
    assert value.item() == pytest.approx(expected.item(), abs=1e-5) and value.item() > 0
    # Both empty: exactly 0, not NaN.
    value = nearest_neighbour_loss(
        student, teacher_nn, torch.zeros(2, 5, dtype=torch.bool), center, 0.1, 0.07
    )
    assert value.item() == 0.0


def test_nn_loss_is_zero_when_off() -> None:
    x = make_inputs(seed=6)
    out = make_loss()(
        x["student_cls"], x["teacher_cls"], x["student_obj"], x["teacher_obj"], None, None, epoch=5
    )
    assert out["loss_nn"].item() == 0.0 and out["loss_nn"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx((out["loss_img"] + out["loss_obj"]).item())
    with pytest.raises(ValueError, match="nn_masks"):
        make_loss()(
            x["student_cls"], x["teacher_cls"], x["student_obj"], x["teacher_obj"], x["teacher_nn"], None, 0
        )


def test_one_centre_update_from_zero_is_a_tenth_of_the_batch_mean() -> None:
    x = make_inputs(seed=7)
    loss = make_loss()
    loss(
        x["student_cls"],
        x["teacher_cls"],
        x["student_obj"],
        x["teacher_obj"],
        x["teacher_nn"],
        x["nn_masks"],
        0,
    )
    assert torch.allclose(loss.center, 0.1 * x["teacher_cls"].mean(0, keepdim=True), atol=1e-7)
    assert torch.allclose(
        loss.center_c, 0.1 * x["teacher_obj"].reshape(-1, OUT_C).mean(0, keepdim=True), atol=1e-7
    )
    # The neighbours' teacher outputs do not enter the object centre.
    other = make_loss()
    other(
        x["student_cls"],
        x["teacher_cls"],
        x["student_obj"],
        x["teacher_obj"],
        x["teacher_nn"] + 5,
        x["nn_masks"],
        0,
    )
    assert torch.equal(other.center_c, loss.center_c)
    assert "center" in loss.state_dict() and "center_c" in loss.state_dict()


def test_update_center_hand_values_and_empty_input() -> None:
    center = torch.tensor([[1.0, 2.0]])
    rows = torch.tensor([[3.0, 0.0], [5.0, 4.0]])
    assert update_center(center, rows, 0.9)[0].tolist() == pytest.approx([0.9 + 0.4, 1.8 + 0.2])
    assert torch.equal(update_center(center, torch.zeros(0, 2), 0.9), center)


@pytest.mark.parametrize(
    ("warmup", "epoch", "expected"),
    [
        (30, 0, 0.04),
        (30, 29, 0.07),
        (30, 30, 0.07),
        (30, 500, 0.07),
        (30, 15, 0.04 + 0.03 * 15 / 29),
        (0, 0, 0.07),
        (1, 0, 0.04),
        (1, 1, 0.07),
        (2, 1, 0.07),
    ],
)
def test_teacher_temperature_schedule(warmup: int, epoch: int, expected: float) -> None:
    assert teacher_temperature(0.04, 0.07, warmup, epoch) == pytest.approx(expected, abs=1e-12)


def test_loss_uses_the_epoch_temperatures_even_for_runs_shorter_than_the_warmup() -> None:
    loss = CrIBoLoss(OUT, OUT_C, 0.04, 0.07, 0.03, 0.09, warmup_teacher_temp_epochs=30, nepochs=10)
    assert loss.teacher_temperatures(0) == pytest.approx((0.04, 0.03))
    assert loss.teacher_temperatures(9) == pytest.approx((0.04 + 0.03 * 9 / 29, 0.03 + 0.06 * 9 / 29))
    x = make_inputs(seed=8)
    out = loss(x["student_cls"], x["teacher_cls"], x["student_obj"], x["teacher_obj"], None, None, epoch=9)
    temp, temp_c = loss.teacher_temperatures(9)
    assert out["loss_img"].item() == pytest.approx(
        reference_image_loss(x["student_cls"], x["teacher_cls"], torch.zeros(1, OUT), 0.1, temp).item(),
        abs=1e-5,
    )
    assert out["loss_obj"].item() == pytest.approx(
        reference_object_loss(x["student_obj"], x["teacher_obj"], torch.zeros(1, OUT_C), 0.1, temp_c).item(),
        abs=1e-5,
    )


def test_half_inputs_give_float32_results_and_finite_centres() -> None:
    x = make_inputs(seed=9)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in x.items()}
    upcast = {k: (v.float() if v.is_floating_point() else v) for k, v in half.items()}
    out_half = make_loss()(**half, epoch=0)
    out_float = make_loss()(**upcast, epoch=0)
    for key in ("loss", "loss_img", "loss_obj", "loss_nn"):
        assert out_half[key].dtype == torch.float32
        assert torch.allclose(out_half[key], out_float[key], atol=1e-6)
    # Large fp16 logits: s / 0.1 overflows in fp16 and an fp16 sum of the teacher rows overflows too.
    big = make_inputs(batch=4, objects=40, seed=10)
    student_cls = (big["student_cls"].sign() * 6e4).half()
    teacher_obj = torch.full((2, 40, OUT_C), 6e4).half()
    loss = make_loss()
    out = loss(student_cls, student_cls, teacher_obj, teacher_obj, None, None, epoch=0)
    assert torch.isfinite(out["loss"])
    assert torch.allclose(loss.center_c, torch.full((1, OUT_C), 6e3), rtol=1e-3)


def test_no_object_on_this_rank_gives_zero_not_nan_and_keeps_the_graph() -> None:
    x = make_inputs(seed=11)
    head = torch.nn.Linear(3, OUT_C)
    student_obj = head(torch.zeros(2, 0, 3))
    loss = make_loss()
    loss.center_c.fill_(0.5)
    out = loss(
        x["student_cls"],
        x["teacher_cls"],
        student_obj,
        torch.zeros(2, 0, OUT_C),
        torch.zeros(2, 0, OUT_C),
        torch.zeros(2, 0, dtype=torch.bool),
        epoch=2,
    )
    assert out["loss_obj"].item() == 0.0 and out["loss_nn"].item() == 0.0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert head.weight.grad is not None and torch.count_nonzero(head.weight.grad) == 0
    assert torch.equal(loss.center_c, torch.full((1, OUT_C), 0.5))  # no object anywhere: centre unchanged


@pytest.mark.parametrize("num_local", [1, 3])
def test_image_loss_with_local_crops_matches_dino_loop_form(num_local: int) -> None:
    """Multi-crop: each of the 2 + L student crops against each teacher global view but its own, averaged
    over the 2 (L + 1) pairs (DINO's ``total_loss / n_loss_terms``)."""
    batch = 3
    generator = torch.Generator().manual_seed(num_local)
    student = torch.randn((2 + num_local) * batch, OUT, generator=generator)
    teacher = torch.randn(2 * batch, OUT, generator=generator)
    center = torch.randn(1, OUT, generator=generator)
    total, pairs = 0.0, 0
    for teacher_view in range(2):
        for student_crop in range(2 + num_local):
            if student_crop == teacher_view:
                continue
            rows = [
                row_cross_entropy(
                    teacher[teacher_view * batch + b] - center[0],
                    0.04,
                    student[student_crop * batch + b],
                    0.1,
                )
                for b in range(batch)
            ]
            total, pairs = total + sum(rows) / batch, pairs + 1
    assert pairs == 2 * (num_local + 1)
    got = image_level_loss(student, teacher, center, 0.1, 0.04).double()
    assert torch.allclose(got, total / pairs, atol=1e-5)
    # the global-view rows alone give the two-crop loss of every released run
    two_crop = image_level_loss(student[: 2 * batch], teacher, center, 0.1, 0.04).double()
    assert torch.allclose(two_crop, reference_image_loss(student[: 2 * batch], teacher, center, 0.1, 0.04))
    assert not torch.allclose(got, two_crop)


def test_shape_errors() -> None:
    x = make_inputs()
    with pytest.raises(ValueError, match="--out_dim"):
        CrIBoLoss(OUT + 1, OUT_C, 0.04, 0.07, 0.04, 0.07, 3, 10)(
            x["student_cls"], x["teacher_cls"], x["student_obj"], x["teacher_obj"], None, None, 0
        )
    with pytest.raises(ValueError, match="nn_masks"):
        nearest_neighbour_loss(
            x["student_obj"], x["teacher_nn"], x["nn_masks"][:, :2], torch.zeros(1, OUT_C), 0.1, 0.07
        )
    with pytest.raises(ValueError, match=r"\(2B, O\)"):
        image_level_loss(x["student_cls"][:5], x["teacher_cls"][:5], torch.zeros(1, OUT), 0.1, 0.07)
    with pytest.raises(ValueError, match=r"\(\(2 \+ L\)B, O\)"):  # 7 rows are no whole number of crops of 3
        image_level_loss(torch.zeros(7, OUT), x["teacher_cls"], torch.zeros(1, OUT), 0.1, 0.07)


# --------------------------------------------------------------------------------------------------
# Two real gloo ranks
# --------------------------------------------------------------------------------------------------


def rank_inputs(rank: int, step: int) -> dict[str, torch.Tensor]:
    """Different numbers of objects per rank; rank 1 has none in step 0."""
    objects = {(0, 0): 4, (1, 0): 0, (0, 1): 2, (1, 1): 5}[(rank, step)]
    return make_inputs(batch=3, objects=objects, seed=10 * step + rank)


def _centres_on_every_rank() -> list[tuple[torch.Tensor, torch.Tensor]]:
    loss = make_loss()
    centres = []
    for step in range(2):
        loss(**rank_inputs(distributed.get_rank(), step), epoch=step)
        centres.append((loss.center.clone(), loss.center_c.clone()))
    return centres


@pytest.mark.slow
def test_centre_update_on_two_ranks_equals_one_process_on_the_concatenation() -> None:
    per_rank = run_distributed(_centres_on_every_rank, world_size=2)
    loss = make_loss()
    for step in range(2):
        inputs = [rank_inputs(rank, step) for rank in range(2)]
        concatenated = {
            k: torch.cat([inputs[0][k], inputs[1][k]], dim=0 if k.endswith("cls") else 1) for k in inputs[0]
        }
        loss(**concatenated, epoch=step)
        for rank in range(2):
            assert torch.allclose(per_rank[rank][step][0], loss.center, atol=1e-6)
            assert torch.allclose(per_rank[rank][step][1], loss.center_c, atol=1e-6)
    # Weighted by rows: with 4 + 0 objects the object centre is the mean of rank 0's 8 rows.
    expected = 0.1 * rank_inputs(0, 0)["teacher_obj"].reshape(-1, OUT_C).mean(0, keepdim=True)
    assert torch.allclose(per_rank[1][0][1], expected, atol=1e-6)


@pytest.mark.parametrize("objective", ["cribo", "cross_view", "image"])
def test_objective_keeps_only_its_terms_in_the_total_and_the_gradient(objective: str) -> None:
    """Ablations: the total is the sum of the objective's terms; left-out terms are still reported, and
    no gradient flows through them (the object logits get none under "image")."""
    x = make_inputs(seed=3)
    loss = CrIBoLoss(OUT, OUT_C, 0.04, 0.07, 0.05, 0.08, 3, 10, objective=objective)
    student_cls = x["student_cls"].clone().requires_grad_()
    student_obj = x["student_obj"].clone().requires_grad_()
    out = loss(
        student_cls, x["teacher_cls"], student_obj, x["teacher_obj"], x["teacher_nn"], x["nn_masks"], 1
    )
    kept = {"cribo": ("loss_img", "loss_obj", "loss_nn"), "cross_view": ("loss_img", "loss_obj")}.get(
        objective, ("loss_img",)
    )
    assert all(float(out[key].detach()) > 0 for key in ("loss_img", "loss_obj", "loss_nn"))  # all reported
    assert torch.allclose(out["loss"], sum(out[key] for key in kept), atol=1e-6)
    out["loss"].backward(retain_graph=True)
    assert student_cls.grad.abs().sum() > 0
    if objective == "image":
        assert student_obj.grad is None or torch.count_nonzero(student_obj.grad) == 0
    else:  # the gradient of the kept object terms alone, recomputed without the others
        expected_obj = torch.autograd.grad(sum(out[key] for key in kept if key != "loss_img"), student_obj)
        assert torch.allclose(student_obj.grad, expected_obj[0], atol=1e-6)


def test_unknown_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="objective='croc'.*cribo.*cross_view.*image"):
        CrIBoLoss(OUT, OUT_C, 0.04, 0.07, 0.05, 0.08, 3, 10, objective="croc")
