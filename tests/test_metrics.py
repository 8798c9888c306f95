"""Tests of cribo_utils.eval.metrics: confusion matrix, IoU, mIoU, pixel accuracy, Hungarian matching."""

import itertools

import pytest
import torch

from cribo_utils.eval.metrics import (
    ConfusionMatrixAccumulator,
    confusion_matrix,
    hungarian_matched_miou,
    iou_per_class,
    pixel_accuracy,
    segmentation_scores,
)

# A 2 x 3 example scored by hand. The pixel whose ground truth is 255 is predicted as class 2 and must not
# count; class 3 appears nowhere.
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PREDICTION = torch.tensor([[0, 1, 1], [1, 0, 2]])


def _slow_confusion(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for p, t in zip(prediction.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t != 255:
            confusion[t, p] += 1
    return confusion


def test_confusion_matrix_by_hand() -> None:
    # (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0); the (255, 2) pixel is excluded.
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion_matrix(PREDICTION, TARGET, 4), expected)


def test_scores_by_hand() -> None:
    scores = segmentation_scores(confusion_matrix(PREDICTION, TARGET, 4), ["bg", "a", "b", "c"])
    # IoU_0 = 1 / (1 + 1 FP + 1 FN) = 1/3; IoU_1 = 2 / (2 + 1 FP) = 2/3; IoU_2 = 0 / (0 + 0 + 1 FN) = 0;
    # class 3 is absent from both: IoU 0, counted in the mIoU over the class list but not in miou_present.
    assert scores["per_class_iou"] == pytest.approx({"bg": 1 / 3, "a": 2 / 3, "b": 0.0, "c": 0.0})
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3) / 4)
    assert scores["miou_present"] == pytest.approx((1 / 3 + 2 / 3) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    assert scores["num_pixels"] == 5
    assert scores["num_present_classes"] == 3


def test_ignore_pixel_would_change_the_score() -> None:
    """The hand example is sensitive to the ignore rule: counting the 255 pixel as class 2 changes IoU_2."""
    counted = TARGET.clone()
    counted[counted == 255] = 2
    iou = iou_per_class(confusion_matrix(PREDICTION, counted, 4))
    assert iou[2] == pytest.approx(1 / 2)
    assert iou_per_class(confusion_matrix(PREDICTION, TARGET, 4))[2] == 0.0


def test_confusion_matrix_matches_slow_reference() -> None:
    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 6, (3, 17, 13), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = 255
    prediction = torch.randint(0, 6, (3, 17, 13), generator=generator)
    assert torch.equal(confusion_matrix(prediction, target, 6), _slow_confusion(prediction, target, 6))


def test_iou_matches_set_definition() -> None:
    """IoU_c = |pred == c and gt == c| / |pred == c or gt == c| over non-ignored pixels."""
    generator = torch.Generator().manual_seed(2)
    target = torch.randint(0, 5, (200,), generator=generator)
    prediction = torch.where(
        torch.rand(200, generator=generator) < 0.6, target, torch.randint(0, 5, (200,), generator=generator)
    )
    iou = iou_per_class(confusion_matrix(prediction, target, 5))
    for c in range(5):
        intersection = ((prediction == c) & (target == c)).sum().item()
        union = ((prediction == c) | (target == c)).sum().item()
        assert iou[c].item() == pytest.approx(intersection / union)
    assert pixel_accuracy(confusion_matrix(prediction, target, 5)) == pytest.approx(
        (prediction == target).float().mean().item()
    )


def test_accumulator_over_batches_equals_whole() -> None:
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (6, 8, 8), generator=generator)
    prediction = torch.randint(0, 4, (6, 8, 8), generator=generator)
    accumulator = ConfusionMatrixAccumulator(4)
    for part in range(3):
        accumulator.update(prediction[2 * part : 2 * part + 2], target[2 * part : 2 * part + 2])
    accumulator.all_reduce()  # world of one: unchanged
    assert torch.equal(accumulator.confusion, confusion_matrix(prediction, target, 4))
    assert accumulator.compute()["miou"] == pytest.approx(float(iou_per_class(accumulator.confusion).mean()))


def test_out_of_range_labels_raise() -> None:
    with pytest.raises(ValueError, match="ground-truth labels must lie in"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 7]), 4)
    with pytest.raises(ValueError, match="predicted labels"):
        confusion_matrix(torch.tensor([0, 4, 1]), torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 4)


def test_hungarian_matching_recovers_permutation() -> None:
    pytest.importorskip("scipy")
    generator = torch.Generator().manual_seed(4)
    target = torch.randint(0, 4, (500,), generator=generator)
    permutation = torch.tensor([2, 0, 3, 1])
    confusion = confusion_matrix(permutation[target], target, 4)
    assert segmentation_scores(confusion)["miou"] < 0.5
    assert hungarian_matched_miou(confusion) == pytest.approx(1.0)


def test_hungarian_matching_is_best_permutation() -> None:
    pytest.importorskip("scipy")
    generator = torch.Generator().manual_seed(5)
    confusion = torch.randint(0, 50, (4, 4), generator=generator)
    best = 0.0
    for permutation in itertools.permutations(range(4)):
        # Relabel predicted class permutation[g] as g, then score with the identity mapping.
        permuted = confusion[:, list(permutation)]
        best = max(best, float(iou_per_class(permuted).mean()))
    assert hungarian_matched_miou(confusion) == pytest.approx(best)
    assert hungarian_matched_miou(confusion) >= float(iou_per_class(confusion).mean())
