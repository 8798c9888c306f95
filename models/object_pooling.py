"""Object representations: the assignment-weighted pooling of patch tokens into one vector per cluster.

It lives with the network (``models.student_teacher`` pools in its forward) so that ``models`` needs nothing
from ``cribo_utils``; ``cribo_utils.method.clustering`` re-exports it next to the clustering that
makes ``assign``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def valid_object_index(valid: Tensor, views: int = 1) -> Tensor:
    """Flat indices ``b * K + k`` of the valid clusters, ascending: the rows that ``objects[valid]`` keeps.

    Reading the number of valid clusters M back from the device is the one host synchronisation that the
    variable number of objects needs; computed once per step, the index replaces every boolean mask
    indexing (each a synchronisation of its own) by an ``index_select``.

    Args:
        valid: (B, K) bool valid-cluster mask.
        views: number of views whose clusters are stacked, view after view (2 for
            :func:`object_representations_both_views`).

    Returns:
        (views * M,) long indices into the flattened (views * B * K) clusters.
    """
    return (valid.repeat(views, 1) if views > 1 else valid).flatten().nonzero().squeeze(1)


def object_representations(
    tokens: Tensor, assign: Tensor, valid: Tensor, valid_index: Tensor | None = None
) -> Tensor:
    """Per-view object representations of the valid clusters (docs/method.md, Sec. 4.8).

    ``o_{b,k} = sum_n A[b, n, k] * t[b, n]`` = mean of the (un-normalised) tokens of cluster k in this
    view, kept for valid (b, k) only, image by image, cluster index ascending. Used with the teacher's
    assignment for both the teacher and the student tokens; gradients flow through ``tokens`` only.

    Args:
        tokens: (B, N, D) patch tokens of one view.
        assign: (B, N, K) column-normalised assignment of that view (``assign1`` or ``assign2``).
        valid: (B, K) bool valid-cluster mask.
        valid_index: optional :func:`valid_object_index` of ``valid`` (no host synchronisation then).

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
    if valid_index is None:
        return objects[valid]
    return objects.flatten(0, 1).index_select(0, valid_index)


def object_representations_both_views(
    tokens: Tensor, assign1: Tensor, assign2: Tensor, valid: Tensor, valid_index: Tensor | None = None
) -> Tensor:
    """:func:`object_representations` of both views, in one product and one gather (the two global crops
    have the same number of tokens).

    Args:
        tokens: (2B, N, D) patch tokens, view 1 batch then view 2 batch.
        assign1: (B, N, K) column-normalised assignment of view 1.
        assign2: (B, N, K) that of view 2.
        valid: (B, K) bool valid-cluster mask.
        valid_index: optional ``valid_object_index(valid, views=2)`` (no host synchronisation then).

    Returns:
        (2, M, D): row v - 1 holds view v's objects.
    """
    batch_size = valid.shape[0]
    batched = (
        tokens.ndim == assign1.ndim == 3
        and assign1.shape == assign2.shape
        and tuple(tokens.shape[:2]) == (2 * batch_size, assign1.shape[1])
        and tuple(valid.shape) == (batch_size, assign1.shape[2])
        and valid.dtype == torch.bool
    )
    if not batched:  # view by view, whose checks name what does not match
        tokens1, tokens2 = tokens.split(batch_size)
        return torch.stack(
            (
                object_representations(tokens1, assign1, valid),
                object_representations(tokens2, assign2, valid),
            )
        )
    if valid_index is None:
        valid_index = valid_object_index(valid, views=2)
    assign = torch.cat((assign1, assign2)).to(tokens.dtype)
    objects = torch.einsum("bnk,bnd->bkd", assign, tokens).flatten(0, 1).index_select(0, valid_index)
    return objects.view(2, valid_index.shape[0] // 2, tokens.shape[2])
