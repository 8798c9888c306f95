"""Joint two-view clustering of patch tokens into objects (CrIBo, docs/method.md, Sec. 4).

For every image the patch tokens of view 1 and view 2 are concatenated into ``P = N1 + N2`` joint
tokens and clustered together into ``K`` clusters by a few rounds of

    cost  M = -S + alpha * G                  (S cosine similarity to the centroids, G positional cost)
    plan  = Sinkhorn-Knopp(M, r = 1/P, c)     (entropic optimal transport, lambda = 20, 5 iterations)
    hard assignment = argmax of the plan per token
    c     = (cluster sizes + 0.01) / sum       (column marginal of the next round)
    mu_k  = normalise(sum of the member tokens of cluster k)

A cluster that has members in both views is an object; the per-view means of the tokens under the
hard assignment are the object representations used by the object-level losses.

Everything is batched over images (no Python loop over images or tokens), runs in float32 with
autocast disabled and without gradients, on whichever device the tokens live on. Deliberate
differences from the reference implementation (docs/differences.md):

* difference 3: the positional cost uses O(B * P^2) memory (a segment minimum over cluster labels with
  ``scatter_reduce``), never a (B, P, P, K) tensor, and the pairwise distances are computed once;
* difference 4: the cost is min-max scaled per image by default (``cost_normalization="image"``), so the
  clustering of an image does not depend on the other images of the per-GPU batch; the reference's
  batch-global scaling is available as ``cost_normalization="batch"``;
* difference 6: the hard assignment is an argmax one-hot, so a token with tied plan values belongs to
  exactly one cluster (the lowest index), not to every tied cluster;
* degenerate inputs do not produce NaN: a constant cost (max = min) is scaled to 0 and an image
  whose positional costs are all 0 (every token at the same coordinates) keeps ``G = 0``, where the
  reference divides 0 by 0. Non-degenerate inputs are unaffected.

The quirks of docs/differences.md, difference 5 (a singleton's own cluster gets the image's mean cost, tokens
at identical coordinates count as "self", the fallback mean includes the zero placeholders) are kept
on purpose.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.object_pooling import object_representations  # noqa: F401  (pooling lives with the network)

logger = logging.getLogger(__name__)

COST_NORMALIZATIONS = ("image", "batch")


@dataclass
class ClusteringResult:
    """Output of :func:`joint_cluster` for a batch of B images, N1 / N2 tokens per view, K clusters.

    Attributes:
        assign1: (B, N1, K) float32 view-1 block of the hard assignment, column-normalised on its own:
            ``1 / n_k^1`` on the members of cluster k, 0 elsewhere; columns with no view-1 member are 0.
        assign2: (B, N2, K) float32, the same for view 2.
        valid: (B, K) bool, True where cluster k has at least one member in each view.
        labels: (B, N1 + N2) long hard cluster id of every joint token (view 1 first, then view 2).
        counts: (B,) long number of valid clusters per image (``<= K``).
    """

    assign1: Tensor
    assign2: Tensor
    valid: Tensor
    labels: Tensor
    counts: Tensor


def positional_alpha(epoch: int, epochs: int, pos_alpha: Sequence[float]) -> float:
    """Weight of the positional cost at ``epoch`` (docs/method.md, Sec. 4.9).

    ``alpha_e = linspace(pos_alpha[1], pos_alpha[0], epochs)[e]``: the schedule runs from the
    **second** value to the **first**, as in the reference (a conscious reproduction, Sec. 12 item 22).

    Args:
        epoch: current epoch, ``0 <= epoch < epochs``.
        epochs: total number of epochs.
        pos_alpha: the two values of ``--pos_alpha``.

    Returns:
        The positional weight of this epoch.
    """
    if len(pos_alpha) != 2:
        raise ValueError(f"`--pos_alpha` needs exactly two values, got {list(pos_alpha)}")
    if not 0 <= epoch < epochs:
        raise ValueError(f"positional_alpha: epoch {epoch} outside [0, {epochs}) (check `--epochs`)")
    return float(np.linspace(pos_alpha[1], pos_alpha[0], epochs)[epoch])


def draw_seed_indices(
    batch_size: int,
    n_joint_tokens: int,
    n_clusters: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw K distinct seed tokens per image, uniformly without replacement (docs/method.md, Sec. 4.1).

    The K indices of image b are the positions of the K largest of ``P`` i.i.d. uniform numbers, i.e.
    the first K entries of a uniformly random permutation of ``0 .. P-1``.

    Args:
        batch_size: B.
        n_joint_tokens: P = N1 + N2 joint tokens per image.
        n_clusters: K, at most P.
        generator: optional random generator (reproducible draws). The numbers are drawn on the
            generator's device and then moved to ``device``.
        device: device of the returned tensor (default: the generator's device, else CPU).

    Returns:
        (B, K) long seed indices in ``[0, P)``, distinct within each row.
    """
    if not 1 <= n_clusters <= n_joint_tokens:
        raise ValueError(
            f"draw_seed_indices: n_clusters={n_clusters} must be in [1, {n_joint_tokens}] "
            "(the number of joint tokens); lower `--n_tokens`"
        )
    draw_device = generator.device if generator is not None else (device if device is not None else "cpu")
    scores = torch.rand(batch_size, n_joint_tokens, generator=generator, device=draw_device)
    seeds = scores.topk(n_clusters, dim=1).indices
    return seeds.to(device) if device is not None else seeds


def masked_position_distances(positions: Tensor) -> Tensor:
    """Pairwise Euclidean distances between token positions, zero distances set to ``+inf``.

    ``D[b, n, m] = ||p_n - p_m||`` if that is > 0, else ``+inf``: a token never counts as its own
    neighbour, and neither does any token at exactly the same coordinates (docs/method.md, Sec. 4.2).
    Computed explicitly (not with a matrix-product formula) so that identical points give exactly 0.

    Args:
        positions: (B, 2, P) positions, row 0 = x, row 1 = y.

    Returns:
        (B, P, P) float32 masked distances.
    """
    x, y = positions.float().unbind(dim=1)
    dx = x.unsqueeze(2) - x.unsqueeze(1)
    dy = y.unsqueeze(2) - y.unsqueeze(1)
    distances = (dx * dx + dy * dy).sqrt()
    return distances.masked_fill_(distances == 0, float("inf"))


def positional_cost(
    positions: Tensor | None,
    labels: Tensor,
    n_clusters: int,
    distances: Tensor | None = None,
) -> Tensor:
    """Positional cost ``G`` of every token for every cluster (docs/method.md, Sec. 4.2).

    ``G_raw[n, k] = min { ||p_n - p_m|| : label(m) = k, ||p_n - p_m|| > 0 }`` (nearest *other* member);
    where that set is empty, ``G_raw[n, k] = 0`` is a placeholder, replaced by the per-image mean of
    ``G_raw`` over all (n, k) taken with the placeholders at 0; finally
    ``G = G_filled / max_{n,k} G_filled`` per image (an image whose costs are all 0 keeps ``G = 0``).

    Memory is O(B * P^2): the minimum over the members of each cluster is a segment minimum of the
    masked distance matrix over the cluster labels (``scatter_reduce(..., "amin")``); tokens that
    belong to no cluster (label -1, only before the first assignment) go to a dropped extra column.

    Args:
        positions: (B, 2, P) token positions (row 0 = x, row 1 = y); may be None when ``distances`` is
            given.
        labels: (B, P) long hard cluster ids in ``[0, K)``, or -1 for a token in no cluster.
        n_clusters: K.
        distances: optional (B, P, P) output of :func:`masked_position_distances` (reuse it across
            iterations: positions do not change).

    Returns:
        (B, P, K) float32 cost in [0, 1].
    """
    if distances is None:
        if positions is None:
            raise ValueError("positional_cost: pass positions (B, 2, P) or precomputed distances (B, P, P)")
        distances = masked_position_distances(positions)
    batch_size, n_tokens, _ = distances.shape
    if labels.shape != (batch_size, n_tokens):
        raise ValueError(f"positional_cost: labels {tuple(labels.shape)} != {(batch_size, n_tokens)}")
    # Label -1 ("no cluster") is routed to an extra column K, dropped below.
    return _positional_cost(distances, torch.where(labels < 0, n_clusters, labels), n_clusters, True)


def _positional_cost(distances: Tensor, columns: Tensor, n_clusters: int, extra_column: bool) -> Tensor:
    """:func:`positional_cost` from the masked distances (B, P, P) and the labels (B, P) with -1 already
    routed to column K (``extra_column``; labels in ``[0, K)`` need no extra column)."""
    batch_size, n_tokens, _ = distances.shape
    nearest = distances.new_full((batch_size, n_tokens, n_clusters + int(extra_column)), float("inf"))
    index = columns.unsqueeze(1).expand(batch_size, n_tokens, n_tokens)
    nearest.scatter_reduce_(2, index, distances, reduce="amin", include_self=True)
    raw = nearest[..., :n_clusters]
    is_empty = torch.isinf(raw)
    raw = raw.masked_fill(is_empty, 0.0)
    fallback = raw.mean(dim=(1, 2), keepdim=True)
    filled = torch.where(is_empty, fallback, raw)
    maximum = filled.amax(dim=(1, 2), keepdim=True)
    # All costs 0: 0 / tiny = 0. A positive maximum is a distance or a mean of distances, far above tiny.
    return filled / maximum.clamp_min(torch.finfo(filled.dtype).tiny)


def min_max_normalize(cost: Tensor, cost_normalization: str = "image") -> Tensor:
    """Min-max scaling of the cost to [0, 1] (docs/method.md, Sec. 4.3).

    ``M <- (M - min M) / (max M - min M)`` with min and max taken per image (``"image"``, default) or
    over the whole (B, P, K) tensor (``"batch"``, the reference: couples the images of a per-GPU batch,
    so the clustering depends on the batch composition and on the number of GPUs). A constant cost
    (max = min) maps to 0 instead of NaN.

    Args:
        cost: (B, P, K) cost.
        cost_normalization: ``"image"`` or ``"batch"``.

    Returns:
        (B, P, K) scaled cost.
    """
    if cost_normalization == "image":
        low, high = (extreme.view(-1, 1, 1) for extreme in cost.flatten(1).aminmax(dim=1))
    elif cost_normalization == "batch":
        low, high = cost.aminmax()
    else:
        raise ValueError(
            f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}"
        )
    # A constant cost: 0 / tiny = 0. A span between 0 and tiny (a float32 subnormal) cannot arise from
    # costs of order 1.
    return (cost - low) / (high - low).clamp_min(torch.finfo(cost.dtype).tiny)


def _sinkhorn_scalings(
    cost: Tensor, column_marginal: Tensor, sinkhorn_lambda: float, n_iterations: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel ``Pi_0 = exp(-lambda M)`` and the scalings ``u`` (B, P, 1), ``v`` (B, K, 1) of
    :func:`sinkhorn` after ``n_iterations >= 1`` rounds, with ``Pi = diag(u) Pi_0 diag(v) / P``.

    The row and column scalings compose: after the rounds ``Pi = diag(u) Pi_0 diag(v)``, with
    ``u <- r / (Pi_0 v)`` and ``v <- c / (Pi_0^T u)``, two matrix-vector products a round instead of
    rescaling the (P, K) plan twice (the same plan up to float round-off). Computed with the marginals
    times P (rows 1, columns P c: both sum to P, so the scalings do not drift from round to round); the
    division of ``Pi_0`` by its sum is absorbed by the first ``u``.
    """
    kernel = torch.exp(cost * -sinkhorn_lambda)
    columns = column_marginal.unsqueeze(2) * cost.shape[1]  # (B, K, 1)
    rows = kernel.sum(dim=2, keepdim=True).reciprocal_()  # u of the first round (v = 1)
    scale = columns / torch.bmm(kernel.transpose(1, 2), rows)
    for _ in range(n_iterations - 1):
        rows = torch.bmm(kernel, scale).reciprocal_()
        scale = columns / torch.bmm(kernel.transpose(1, 2), rows)
    return kernel, rows, scale


def sinkhorn(
    cost: Tensor,
    column_marginal: Tensor,
    sinkhorn_lambda: float = 20.0,
    n_iterations: int = 5,
) -> Tensor:
    """Sinkhorn-Knopp transport plan for a batch of costs (docs/method.md, Sec. 4.4).

    ``Pi = exp(-lambda * M)``, ``Pi <- Pi / sum_{n,k} Pi`` per image, then ``n_iterations`` times:
    ``Pi[n, k] <- Pi[n, k] * r_n / sum_k' Pi[n, k']`` (rows to ``r_n = 1/P``), then
    ``Pi[n, k] <- Pi[n, k] * c_k / sum_n' Pi[n', k]`` (columns to ``c``). NaNs become 1e-8. After the
    final column scaling the column sums equal ``c``; the row sums approach ``r`` as the number of
    iterations grows. With ``M`` in [0, 1] and ``lambda = 20`` the smallest entry is ``exp(-20)``, well
    inside float32, so the literal (not log-space) form is used.

    Args:
        cost: (B, P, K) cost, usually min-max scaled to [0, 1].
        column_marginal: (B, K) target column sums ``c`` (each row sums to 1).
        sinkhorn_lambda: inverse entropic regularisation ``lambda``.
        n_iterations: number of row-then-column scaling rounds.

    Returns:
        (B, P, K) transport plan.
    """
    if n_iterations == 0:
        kernel = torch.exp(cost * -sinkhorn_lambda)
        plan = kernel / kernel.sum(dim=(1, 2), keepdim=True)
    else:
        kernel, rows, scale = _sinkhorn_scalings(cost, column_marginal, sinkhorn_lambda, n_iterations)
        plan = kernel * rows * (scale / cost.shape[1]).transpose(1, 2)
    return torch.nan_to_num(plan, nan=1e-8, posinf=float("inf"), neginf=float("-inf"))


def sinkhorn_labels(
    cost: Tensor,
    column_marginal: Tensor,
    sinkhorn_lambda: float = 20.0,
    n_iterations: int = 5,
) -> Tensor:
    """Hard assignment ``argmax_k Pi[n, k]`` of the :func:`sinkhorn` plan, without forming the plan.

    ``Pi[n, k] = u_n Pi_0[n, k] v_k / P`` with ``u_n > 0``, so ``argmax_k Pi[n, k] = argmax_k
    Pi_0[n, k] v_k``: the row scaling, the division by P and the NaN replacement (the plan of a cost
    in [0, 1] is positive and finite) do nothing to the argmax. Three fewer operations per clustering
    round; the same labels as ``sinkhorn(...).argmax(dim=2)`` except where two entries of a row differ by
    float round-off only (the lowest index wins either way).

    Args:
        cost: (B, P, K) cost in [0, 1] (min-max scaled).
        column_marginal: (B, K) target column sums ``c``.
        sinkhorn_lambda: inverse entropic regularisation ``lambda``.
        n_iterations: number of row-then-column scaling rounds.

    Returns:
        (B, P) long cluster ids.
    """
    if n_iterations == 0:
        return torch.exp(cost * -sinkhorn_lambda).argmax(dim=2)  # the plan is this kernel over its sum
    kernel, _, scale = _sinkhorn_scalings(cost, column_marginal, sinkhorn_lambda, n_iterations)
    return (kernel * scale.transpose(1, 2)).argmax(dim=2)


def _one_hot(labels: Tensor, n_clusters: int, dtype: torch.dtype, clusters: Tensor | None = None) -> Tensor:
    """``one_hot[b, n, k] = [labels[b, n] == k]`` as ``dtype``, shape (B, P, K).

    The same values as ``F.one_hot(labels, n_clusters)`` for labels in ``[0, K)``, without its range check,
    which reads the labels' min and max back to the host (two GPU synchronisations per call).
    ``clusters``: ``arange(K)`` on the labels' device, when the caller has it already.
    """
    if clusters is None:
        clusters = torch.arange(n_clusters, device=labels.device)
    return (labels.unsqueeze(-1) == clusters).to(dtype)


def update_column_marginal(labels: Tensor, n_clusters: int) -> Tensor:
    """Column marginal of the next Sinkhorn call (docs/method.md, Sec. 4.6).

    ``c_k = (n_k + 0.01) / sum_k' (n_k' + 0.01)`` with ``n_k`` the number of tokens assigned to k, so
    the next plan targets the current cluster sizes and an empty cluster keeps a small mass.

    Args:
        labels: (B, P) long hard cluster ids in ``[0, K)``.
        n_clusters: K.

    Returns:
        (B, K) float32 column marginal.
    """
    return _column_marginal(_one_hot(labels, n_clusters, torch.float32))


def _column_marginal(one_hot: Tensor) -> Tensor:
    """:func:`update_column_marginal` from the (B, P, K) one-hot of the labels."""
    smoothed = one_hot.sum(dim=1) + 0.01
    return smoothed / smoothed.sum(dim=1, keepdim=True)


def update_centroids(tokens: Tensor, labels: Tensor, n_clusters: int) -> Tensor:
    """Centroids ``mu_k = normalise(sum_{n: label(n) = k} z_n)`` (docs/method.md, Sec. 4.7).

    Args:
        tokens: (B, P, D) L2-normalised joint tokens.
        labels: (B, P) long hard cluster ids in ``[0, K)``.
        n_clusters: K.

    Returns:
        (B, K, D) unit-norm centroids (zero vector for an empty cluster).
    """
    return _centroids(tokens, _one_hot(labels, n_clusters, tokens.dtype))


def _centroids(tokens: Tensor, one_hot: Tensor) -> Tensor:
    """:func:`update_centroids` from the (B, P, K) one-hot of the labels."""
    return F.normalize(torch.bmm(one_hot.transpose(1, 2), tokens), dim=-1)


def _check_inputs(
    tokens1: Tensor,
    tokens2: Tensor,
    positions1: Tensor,
    positions2: Tensor,
    n_clusters: int,
    cost_normalization: str,
) -> None:
    if tokens1.ndim != 3 or tokens2.ndim != 3:
        raise ValueError(
            f"joint_cluster: tokens must be (B, N, D), got {tuple(tokens1.shape)}, {tuple(tokens2.shape)}"
        )
    if tokens1.shape[0] != tokens2.shape[0] or tokens1.shape[2] != tokens2.shape[2]:
        raise ValueError(
            "joint_cluster: the two views disagree on B or D: "
            f"{tuple(tokens1.shape)} vs {tuple(tokens2.shape)}"
        )
    for view, (tokens, positions) in enumerate(((tokens1, positions1), (tokens2, positions2)), start=1):
        expected = (tokens.shape[0], 2, tokens.shape[1])
        if tuple(positions.shape) != expected:
            raise ValueError(
                f"joint_cluster: positions{view} must be (B, 2, N) = {expected} to match tokens{view}, "
                f"got {tuple(positions.shape)} (row 0 = x, row 1 = y; see data/augmentations.py)"
            )
    n_joint = tokens1.shape[1] + tokens2.shape[1]
    if not 1 <= n_clusters <= n_joint:
        raise ValueError(
            f"joint_cluster: n_clusters={n_clusters} must be in [1, {n_joint}] (two views of "
            f"{tokens1.shape[1]} and {tokens2.shape[1]} tokens); lower `--n_tokens`"
        )
    if cost_normalization not in COST_NORMALIZATIONS:
        raise ValueError(
            f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}"
        )


def _check_seed_indices(seed_indices: Tensor, batch_size: int, n_joint: int, n_clusters: int) -> None:
    if tuple(seed_indices.shape) != (batch_size, n_clusters) or seed_indices.dtype != torch.long:
        raise ValueError(
            f"joint_cluster: seed_indices must be a (B, K) = {(batch_size, n_clusters)} long tensor, "
            f"got {tuple(seed_indices.shape)} {seed_indices.dtype}"
        )
    if seed_indices.numel() and (seed_indices.min() < 0 or seed_indices.max() >= n_joint):
        raise ValueError(f"joint_cluster: seed_indices must lie in [0, {n_joint})")
    ordered = seed_indices.sort(dim=1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError("joint_cluster: seed_indices must be distinct within each image")


def _per_view_assignments(one_hot: Tensor, n_view1: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split the hard assignment (B, P, K) one-hot into its view blocks, each column-normalised (Sec. 4,
    steps 5-6); both views at once when they have the same number of tokens."""
    batch_size, n_joint, n_clusters = one_hot.shape
    if 2 * n_view1 == n_joint:
        view_blocks = one_hot.view(batch_size, 2, n_view1, n_clusters)
        view_sizes = view_blocks.sum(dim=2, keepdim=True)  # (B, 2, 1, K)
        assign = view_blocks / view_sizes.clamp_min(1.0)
        valid = (view_sizes > 0).all(dim=1).view(batch_size, n_clusters)
        return assign[:, 0], assign[:, 1], valid
    blocks = (one_hot[:, :n_view1], one_hot[:, n_view1:])
    sizes = [block.sum(dim=1, keepdim=True) for block in blocks]
    assign1, assign2 = (block / size.clamp_min(1.0) for block, size in zip(blocks, sizes, strict=True))
    valid = (sizes[0] > 0).squeeze(1) & (sizes[1] > 0).squeeze(1)
    return assign1, assign2, valid


def _cluster(
    tokens1: Tensor,
    tokens2: Tensor,
    positions1: Tensor,
    positions2: Tensor,
    seed_indices: Tensor,
    n_clusters: int,
    alpha: float,
    n_iter: int,
    sinkhorn_lambda: float,
    sinkhorn_iterations: int,
    update_c: bool,
    cost_normalization: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rounds of :func:`joint_cluster` on checked inputs: ``(labels, assign1, assign2, valid)``."""
    batch_size, n_view1, _ = tokens1.shape
    n_joint = n_view1 + tokens2.shape[1]
    device = tokens1.device
    tokens = F.normalize(torch.cat((tokens1, tokens2), dim=1).float(), dim=-1)
    distances = masked_position_distances(torch.cat((positions1, positions2), dim=2))

    # Before the first round only the seeds have a cluster; the others go to the dropped column K.
    labels = torch.full((batch_size, n_joint), n_clusters, dtype=torch.long, device=device)
    clusters = torch.arange(n_clusters, device=device)
    labels.scatter_(1, seed_indices, clusters.expand(batch_size, n_clusters))
    centroids = torch.gather(tokens, 1, seed_indices.unsqueeze(2).expand(-1, -1, tokens.shape[2]))
    column_marginal = tokens.new_full((batch_size, n_clusters), 1.0 / n_clusters)

    for round_index in range(n_iter):
        similarity = torch.bmm(tokens, centroids.transpose(1, 2))
        if alpha != 0:
            positional = _positional_cost(distances, labels, n_clusters, extra_column=round_index == 0)
            cost = positional.mul_(alpha).sub_(similarity)  # -S + alpha G
        else:
            cost = similarity.neg_()
        cost = min_max_normalize(cost, cost_normalization)
        labels = sinkhorn_labels(cost, column_marginal, sinkhorn_lambda, sinkhorn_iterations)
        # one one-hot for the marginal, the centroids and the assignments; the last round's marginal
        # and centroids would be used by nothing
        one_hot = _one_hot(labels, n_clusters, tokens.dtype, clusters)
        if round_index == n_iter - 1:
            break
        if update_c:
            column_marginal = _column_marginal(one_hot)
        centroids = _centroids(tokens, one_hot)

    assign1, assign2, valid = _per_view_assignments(one_hot, n_view1)
    return labels, assign1, assign2, valid


@functools.cache
def _compiled_cluster() -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
    """:func:`_cluster` through ``torch.compile`` (``--compile``), compiled at its first call."""
    return torch.compile(_cluster)


@torch.no_grad()
def joint_cluster(
    tokens1: Tensor,
    tokens2: Tensor,
    positions1: Tensor,
    positions2: Tensor,
    n_clusters: int,
    alpha: float,
    n_iter: int = 5,
    sinkhorn_lambda: float = 20.0,
    sinkhorn_iterations: int = 5,
    update_c: bool = True,
    cost_normalization: str = "image",
    generator: torch.Generator | None = None,
    seed_indices: Tensor | None = None,
    compiled: bool = False,
) -> ClusteringResult:
    """Cluster the joint patch tokens of two views of each image (CrIBo, docs/method.md, Sec. 4).

    Per image, with ``Z`` the L2-normalised tokens of view 1 then view 2 (P = N1 + N2 rows) and their
    positions: K distinct seeds, ``mu_k = z_{seed_k}``, initial hard assignment = the seeds only,
    ``c = 1/K``; then ``n_iter`` times

    * ``S = Z mu^T`` (cosine), ``G`` = :func:`positional_cost` of the current hard assignment,
    * ``M = minmax(-S + alpha * G)`` (per image, or over the batch in ``"batch"`` mode),
    * ``Pi = sinkhorn(M, c)``, hard labels ``argmax_k Pi[n, k]``,
    * ``c = (n_k + 0.01) / sum`` if ``update_c``, ``mu_k = normalise(sum_{label(n)=k} z_n)``.

    The final labels are split into the two view blocks, each column-normalised on its own view;
    a cluster is valid when it has members in both views.

    Runs without gradients, in float32 with autocast disabled, on the tokens' device.

    Args:
        tokens1: (B, N1, D) patch tokens of view 1 (teacher, post-LayerNorm; normalised here).
        tokens2: (B, N2, D) patch tokens of view 2.
        positions1: (B, 2, N1) patch-centre coordinates of view 1 in original-image pixels
            (row 0 = x, row 1 = y).
        positions2: (B, 2, N2) the same for view 2 (same pixel frame as view 1).
        n_clusters: K (``--n_tokens``), at most N1 + N2.
        alpha: weight of the positional cost (see :func:`positional_alpha`).
        n_iter: number of clustering rounds.
        sinkhorn_lambda: Sinkhorn ``lambda``.
        sinkhorn_iterations: Sinkhorn scaling rounds per clustering round.
        update_c: re-target the column marginal to the current cluster sizes after each round.
        cost_normalization: ``"image"`` (default, images independent) or ``"batch"`` (reference:
            min-max over the whole batch, couples the images of one GPU).
        generator: optional generator for the seed draw (ignored when ``seed_indices`` is given).
        seed_indices: optional (B, K) long distinct seed indices into the joint tokens, e.g. from
            :func:`draw_seed_indices`; drawn with ``generator`` when omitted.
        compiled: run the rounds through ``torch.compile`` (``--compile``): fused kernels, the same
            clustering up to float round-off; the first call compiles.

    Returns:
        :class:`ClusteringResult` with ``assign1`` (B, N1, K), ``assign2`` (B, N2, K), ``valid`` (B, K),
        ``labels`` (B, N1 + N2), ``counts`` (B,).
    """
    _check_inputs(tokens1, tokens2, positions1, positions2, n_clusters, cost_normalization)
    if n_iter < 1:
        raise ValueError(f"joint_cluster: n_iter must be >= 1 (`--n_iter`), got {n_iter}")
    batch_size, n_view1, _ = tokens1.shape
    n_joint = n_view1 + tokens2.shape[1]
    device = tokens1.device
    if seed_indices is None:
        seed_indices = draw_seed_indices(batch_size, n_joint, n_clusters, generator=generator, device=device)
    else:
        _check_seed_indices(seed_indices, batch_size, n_joint, n_clusters)
        seed_indices = seed_indices.to(device)

    cluster = _compiled_cluster() if compiled else _cluster
    with torch.autocast(device_type=device.type, enabled=False):
        labels, assign1, assign2, valid = cluster(
            tokens1,
            tokens2,
            positions1.to(device),
            positions2.to(device),
            seed_indices,
            n_clusters,
            alpha,
            n_iter,
            sinkhorn_lambda,
            sinkhorn_iterations,
            update_c,
            cost_normalization,
        )
    counts = valid.sum(dim=1)
    if logger.isEnabledFor(logging.DEBUG):  # .item() synchronises a GPU: only when the line is printed
        logger.debug("joint_cluster: %.2f valid clusters per image", counts.float().mean().item())
    return ClusteringResult(assign1=assign1, assign2=assign2, valid=valid, labels=labels, counts=counts)
