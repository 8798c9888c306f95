"""Semantic-segmentation scores from a confusion matrix accumulated batch by batch.

The dense nearest-neighbour evaluation (docs/dense-nn-protocol.md, A.6) scores predictions with
a ``C x C`` confusion matrix over every validation pixel whose ground truth is not the ignore label.
Rows are ground-truth classes, columns predicted classes::

    confusion[g, p] = #{pixels with ground truth g and prediction p},  g != ignore_index

    TP_c = confusion[c, c]      FP_c = sum_g confusion[g, c] - TP_c      FN_c = sum_p confusion[c, p] - TP_c
    IoU_c = TP_c / (TP_c + FP_c + FN_c)          (0 when the denominator is 0)
    mIoU  = (1 / C) * sum_c IoU_c                (over the dataset's whole class list)
    pixel accuracy = sum_c TP_c / sum_{g,p} confusion[g, p]

Only the ``C x C`` matrix is kept, never the predicted or ground-truth maps of the whole validation set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix of one batch of label maps, ignore pixels excluded.

    ``confusion[g, p] = #{i : target_i = g, prediction_i = p, target_i != ignore_index}``, computed with one
    ``bincount`` over ``g * C + p``.

    Args:
        prediction: integer tensor of any shape (e.g. (B, H, W)), values in ``[0, C)``.
        target: integer tensor of the same shape, values in ``[0, C)`` or ``ignore_index``.
        num_classes: C.
        ignore_index: ground-truth value excluded from the count.

    Returns:
        (C, C) int64 on the device of ``target``; rows are ground truth, columns predictions.

    Raises:
        ValueError: on a shape mismatch or a label outside ``[0, C)`` (other than ``ignore_index`` in the
            ground truth), which would otherwise be silently counted in the wrong cell.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
    prediction = prediction.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = target != ignore_index
    prediction = prediction[valid]
    target = target[valid]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"ground-truth labels must lie in [0, {num_classes}) or equal the ignore label {ignore_index}; "
            f"found values in [{int(target.min())}, {int(target.max())}]. Check the dataset's class mapping "
            "(ADE20K: 0 -> 255 and the others minus 1)."
        )
    if prediction.numel() and (int(prediction.min()) < 0 or int(prediction.max()) >= num_classes):
        raise ValueError(
            f"predicted labels must lie in [0, {num_classes}); found values in "
            f"[{int(prediction.min())}, {int(prediction.max())}]"
        )
    counts = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> Tensor:
    """Per-class intersection over union, ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``, 0 for absent classes.

    Args:
        confusion: (C, C) counts, rows ground truth, columns predictions.

    Returns:
        (C,) float64.
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1.0), torch.zeros_like(union))


def pixel_accuracy(confusion: Tensor) -> float:
    """``sum_c TP_c / sum confusion`` (0 when no pixel was counted)."""
    total = float(confusion.sum())
    return float(confusion.diagonal().sum()) / total if total > 0 else 0.0


def hungarian_matched_miou(confusion: Tensor) -> float | None:
    """mIoU after matching predicted to ground-truth classes with the Hungarian algorithm on the IoU matrix.

    This is the default of open-hummingbird-eval (protocol A.6); for label transfer the identity mapping is
    the meaningful score and this one can only be higher. ``IoU[g, p] = n_gp / (n_g. + n_.p - n_gp)``; the
    permutation maximising ``sum_g IoU[g, pi(g)]`` is applied, then the mean over the C classes is taken.

    Args:
        confusion: (C, C) counts, rows ground truth, columns predictions.

    Returns:
        The matched mIoU in [0, 1], or None when scipy is not installed (the score is optional).
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        logger.debug("scipy is not installed: the Hungarian-matched mIoU is skipped (pip install scipy)")
        return None
    confusion = confusion.double().cpu()
    union = confusion.sum(1, keepdim=True) + confusion.sum(0, keepdim=True) - confusion
    iou = torch.where(union > 0, confusion / union.clamp_min(1.0), torch.zeros_like(union))
    rows, cols = linear_sum_assignment(iou.numpy(), maximize=True)
    return float(iou[torch.as_tensor(rows), torch.as_tensor(cols)].sum()) / confusion.shape[0]


def segmentation_scores(
    confusion: Tensor, class_names: Sequence[str] | None = None, with_hungarian: bool = False
) -> dict[str, Any]:
    """All scores of the protocol from one confusion matrix.

    Args:
        confusion: (C, C) counts, rows ground truth, columns predictions.
        class_names: C names used as keys of ``per_class_iou`` (default ``"0"..."C-1"``).
        with_hungarian: also compute :func:`hungarian_matched_miou` (needs scipy).

    Returns:
        dict with ``miou`` (mean over all C classes, absent classes count as 0), ``miou_present`` (mean over
        classes present in the ground truth or the prediction), ``pixel_accuracy``, ``per_class_iou``
        (name -> IoU), ``num_present_classes``, ``num_pixels`` and optionally ``miou_hungarian``.
        Scores are fractions in [0, 1].
    """
    num_classes = confusion.shape[0]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix")
    iou = iou_per_class(confusion)
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    scores: dict[str, Any] = {
        "miou": float(iou.mean()),
        "miou_present": float(iou[present].mean()) if bool(present.any()) else 0.0,
        "pixel_accuracy": pixel_accuracy(confusion),
        "num_present_classes": int(present.sum()),
        "num_pixels": int(confusion.sum()),
        "per_class_iou": {name: float(value) for name, value in zip(names, iou.tolist(), strict=True)},
    }
    if with_hungarian:
        scores["miou_hungarian"] = hungarian_matched_miou(confusion)
    return scores


class ConfusionMatrixAccumulator:
    """Running ``C x C`` confusion matrix: ``update`` per batch, ``all_reduce`` across ranks, ``compute``.

    Args:
        num_classes: C.
        ignore_index: ground-truth label excluded from every count.
        device: where the matrix lives (the device of the predictions).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add the pixels of one batch (any matching shapes, e.g. (B, H, W))."""
        self.confusion += confusion_matrix(
            prediction, target.to(prediction.device), self.num_classes, self.ignore_index
        ).to(self.confusion.device)

    def all_reduce(self) -> None:
        """Sum the matrices of all ranks in place (no-op in a world of one)."""
        from cribo_utils.runtime.distributed import all_reduce_sum

        all_reduce_sum(self.confusion)

    def compute(
        self, class_names: Sequence[str] | None = None, with_hungarian: bool = False
    ) -> dict[str, Any]:
        """:func:`segmentation_scores` of the accumulated matrix."""
        return segmentation_scores(self.confusion.cpu(), class_names, with_hungarian)
