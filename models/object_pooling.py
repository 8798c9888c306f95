"""Object representations: the assignment-weighted pooling of patch tokens into one vector per cluster.

It lives with the network (``models.student_teacher`` pools in its forward) so that ``models`` needs nothing
from ``cribo_utils``; ``cribo_utils.method.clustering`` re-exports it next to the clustering that
makes ``assign``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def object_representations(tokens: Tensor, assign: Tensor, valid: Tensor) -> Tensor:
    """Per-view object representations of the valid clusters (method doc Sec. 4, "Object representations").

    ``o_{b,k} = sum_n A[b, n, k] * t[b, n]`` = mean of the (un-normalised) tokens of cluster k in this
    view, kept for valid (b, k) only, image by image, cluster index ascending. Used with the teacher's
    assignment for both the teacher and the student tokens; gradients flow through ``tokens`` only.

    Args:
        tokens: (B, N, D) patch tokens of one view.
        assign: (B, N, K) column-normalised assignment of that view (``assign1`` or ``assign2``).
        valid: (B, K) bool valid-cluster mask.

    Returns:
        (M, D) object representations, M = ``valid.sum()``.
    """
    if tokens.ndim != 3 or assign.ndim != 3 or tokens.shape[:2] != assign.shape[:2]:
        raise ValueError(
            f"object_representations: tokens (B, N, D) {tuple(tokens.shape)} and assign (B, N, K) "
            f"{tuple(assign.shape)} must share B and N (use assign1 with view 1, assign2 with view 2)"
        )
    if tuple(valid.shape) != (assign.shape[0], assign.shape[2]) or valid.dtype != torch.bool:
        raise ValueError(
            "object_representations: valid must be a (B, K) bool mask, "
            f"got {tuple(valid.shape)} {valid.dtype}"
        )
    objects = torch.einsum("bnk,bnd->bkd", assign.to(tokens.dtype), tokens)
    return objects[valid]
