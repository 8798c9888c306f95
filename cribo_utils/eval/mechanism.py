"""Does CrIBo's own mechanism do its job? Clusters against objects, neighbours against classes.

CrIBo differs from DINO by two parts: the joint two-view clustering that turns patch tokens into objects, and
the cycle-consistent cross-image neighbours that give every object a second target from another image. A
score that rises proves neither works. On scenes with ground-truth instance masks (the synthetic scenes)
these functions measure both directly, at patch resolution:

* :func:`adjusted_rand_index`: agreement of two partitions of the same tokens, corrected for chance
  (1 = identical up to relabelling, about 0 = independent). Used for clusters against instances and
  clusters against position-only tiles;
* :func:`cluster_purity`: share of tokens whose cluster's majority instance is their own instance
  (1 = no cluster straddles two instances; over-segmenting an object is not penalised);
* :func:`object_labels`: per object (a cluster present in both views), the majority label of its member
  patches in each view and over both;
* :class:`NeighbourTally`: per query object and direction, whether the cycle check accepted its
  nearest bank object and whether that object has the query's class;
* :func:`pool_by_labels` and :func:`nearest_class_precision`: the ceilings, i.e. what retrieval would reach
  if the clusters were exactly the instances (objects pooled over the masks), or patch by patch;
* :func:`linear_probe_accuracy`: whether a class is in the features linearly at all (a logistic regression
  fitted on one set, scored on another).

All functions are batched over images (no loop over images or tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.object_pooling import object_representations


def _one_hot(labels: Tensor, n_labels: int) -> Tensor:
    """(B, P) long in ``[0, n_labels)`` -> (B, P, n_labels) float64 one-hot."""
    return (labels.unsqueeze(-1) == torch.arange(n_labels, device=labels.device)).to(torch.float64)


def contingency_tables(labels_a: Tensor, labels_b: Tensor) -> Tensor:
    """Per image, ``table[b, i, j] = |{n : labels_a[b, n] = i and labels_b[b, n] = j}|``.

    Args:
        labels_a: (B, P) long, values in ``[0, I)``.
        labels_b: (B, P) long, values in ``[0, J)``.
    Returns:
        (B, I, J) float64 counts, ``I = max(labels_a) + 1``, ``J = max(labels_b) + 1``.
    """
    if labels_a.shape != labels_b.shape or labels_a.ndim != 2:
        raise ValueError(
            f"contingency_tables: labels must both be (B, P); got {labels_a.shape}, {labels_b.shape}"
        )
    if labels_a.numel() and (labels_a.min() < 0 or labels_b.min() < 0):
        raise ValueError("contingency_tables: labels must be >= 0")
    n_a = int(labels_a.max()) + 1 if labels_a.numel() else 1
    n_b = int(labels_b.max()) + 1 if labels_b.numel() else 1
    return torch.bmm(_one_hot(labels_a, n_a).transpose(1, 2), _one_hot(labels_b, n_b))


def _pairs(counts: Tensor) -> Tensor:
    return counts * (counts - 1) / 2


def adjusted_rand_index(labels_a: Tensor, labels_b: Tensor) -> Tensor:
    """Adjusted Rand index of two partitions of the same P tokens, per image (Hubert and Arabie, 1985).

    With the contingency table ``n_ij``, row sums ``a_i``, column sums ``b_j`` and ``C(x) = x (x - 1) / 2``
    (pairs of tokens):

        index    = sum_ij C(n_ij)                    (pairs together in both partitions)
        expected = sum_i C(a_i) * sum_j C(b_j) / C(P)
        maximum  = (sum_i C(a_i) + sum_j C(b_j)) / 2
        ARI      = (index - expected) / (maximum - expected)

    ``maximum = expected`` happens only when both partitions put every token alone or all tokens
    together, i.e. they are identical: ARI = 1 there.

    Args:
        labels_a: (B, P) long labels >= 0 (e.g. cluster ids).
        labels_b: (B, P) long labels >= 0 (e.g. instance ids).
    Returns:
        (B,) float64 ARI in [-1, 1].
    """
    table = contingency_tables(labels_a, labels_b)
    index = _pairs(table).sum(dim=(1, 2))
    sum_a = _pairs(table.sum(dim=2)).sum(dim=1)
    sum_b = _pairs(table.sum(dim=1)).sum(dim=1)
    total = _pairs(torch.tensor(float(labels_a.shape[1]), dtype=torch.float64))
    expected = sum_a * sum_b / total.clamp_min(1.0)
    maximum = (sum_a + sum_b) / 2
    span = maximum - expected
    return torch.where(span > 0, (index - expected) / torch.where(span > 0, span, 1.0), torch.ones_like(span))


def cluster_purity(clusters: Tensor, instances: Tensor) -> Tensor:
    """Share of tokens that belong to their cluster's majority instance, per image.

        purity = (1 / P) * sum_k max_i n_ki      (n_ki tokens of cluster k in instance i)

    1 when no cluster holds tokens of two instances; splitting an instance into parts keeps it at 1.

    Args:
        clusters: (B, P) long cluster ids.
        instances: (B, P) long instance ids (0 = background).
    Returns:
        (B,) float64 purity in (0, 1].
    """
    table = contingency_tables(clusters, instances)
    return table.amax(dim=2).sum(dim=1) / clusters.shape[1]


def patch_majority_labels(label_maps: Tensor, patch_size: int) -> Tensor:
    """Majority label of every ``patch_size x patch_size`` patch of label maps (ties: the smaller label).

    Args:
        label_maps: (B, H, W) long labels >= 0, H and W multiples of ``patch_size``.
        patch_size: p.
    Returns:
        (B, (H / p) * (W / p)) long, patches row-major (the ViT token order).
    """
    batch, height, width = label_maps.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_majority_labels: {height}x{width} maps are not multiples of {patch_size}")
    n_labels = int(label_maps.max()) + 1
    blocks = label_maps.reshape(batch, height // patch_size, patch_size, width // patch_size, patch_size)
    blocks = blocks.permute(0, 1, 3, 2, 4).reshape(batch, -1, patch_size * patch_size)
    counts = (blocks.unsqueeze(-1) == torch.arange(n_labels, device=label_maps.device)).sum(dim=2)
    return counts.argmax(dim=-1)


@dataclass
class ObjectLabels:
    """Ground truth of the objects (valid clusters) of a batch, in the training order (image by image,
    cluster ascending).

    Attributes:
        view1, view2: (M,) long majority label of the object's member patches in each view.
        both: (M,) long majority label over the members of both views.
    """

    view1: Tensor
    view2: Tensor
    both: Tensor


def object_labels(
    clusters1: Tensor, clusters2: Tensor, labels1: Tensor, labels2: Tensor, valid: Tensor, n_clusters: int
) -> ObjectLabels:
    """Majority ground-truth label of every valid cluster, per view and over both views.

    Args:
        clusters1, clusters2: (B, N1), (B, N2) long cluster id of every patch of each view.
        labels1, labels2: (B, N1), (B, N2) long ground-truth label of every patch (instance or class).
        valid: (B, K) bool, clusters with members in both views (the objects).
        n_clusters: K.
    Returns:
        :class:`ObjectLabels` with M = ``valid.sum()`` entries each.
    """
    n_labels = int(max(labels1.max(), labels2.max())) + 1
    tables = [
        torch.bmm(_one_hot(clusters, n_clusters).transpose(1, 2), _one_hot(labels, n_labels))[valid]
        for clusters, labels in ((clusters1, labels1), (clusters2, labels2))
    ]
    return ObjectLabels(
        view1=tables[0].argmax(dim=1),
        view2=tables[1].argmax(dim=1),
        both=(tables[0] + tables[1]).argmax(dim=1),
    )


def class_match_chance(query_classes: Tensor, bank_classes: Tensor) -> float:
    """Probability that a bank entry drawn at random has the class of a query drawn at random:
    ``sum_c p_query(c) * p_bank(c)`` (0 when either side is empty).

    Args:
        query_classes: (Q,) long classes >= 0; bank_classes: (R,) long classes >= 0.
    """
    if not query_classes.numel() or not bank_classes.numel():
        return 0.0
    n_classes = max(int(bank_classes.max()), int(query_classes.max())) + 1
    bank_share = torch.bincount(bank_classes, minlength=n_classes).double() / bank_classes.numel()
    query_share = torch.bincount(query_classes, minlength=n_classes).double() / query_classes.numel()
    return float((bank_share * query_share).sum())


@dataclass
class NeighbourTally:
    """Running counts of cross-image neighbour outcomes, over queries and both search directions.

    A *query* is one object in one direction (view 1 searches the bank's view-1 slots, view 2 the view-2
    slots); its *neighbour* is the top-1 bank object; it is *accepted* when the cycle check passes; it is
    *correct* when the neighbour's class equals the query's class; *foreground* queries are objects whose
    majority instance is not the background.
    """

    queries: int = 0
    foreground: int = 0
    accepted: int = 0
    accepted_foreground: int = 0
    correct_accepted: int = 0
    correct_accepted_foreground: int = 0
    correct_foreground: int = 0  # before the cycle check
    query_classes: list[int] = field(default_factory=list)

    def add(self, accepted: Tensor, correct: Tensor, foreground: Tensor, query_class: Tensor) -> None:
        """Add one direction of one batch: (M,) bool ``accepted``, ``correct``, ``foreground``; (M,) long
        ``query_class``."""
        self.queries += int(accepted.numel())
        self.foreground += int(foreground.sum())
        self.accepted += int(accepted.sum())
        self.accepted_foreground += int((accepted & foreground).sum())
        self.correct_accepted += int((accepted & correct).sum())
        self.correct_accepted_foreground += int((accepted & correct & foreground).sum())
        self.correct_foreground += int((correct & foreground).sum())
        self.query_classes.extend(query_class[foreground].tolist())

    def summary(self, bank_classes: Tensor) -> dict[str, float]:
        """Rates (NaN where the denominator is 0).

        Args:
            bank_classes: (M_bank,) long class of every bank object (for the chance level).
        Returns:
            ``acceptance`` (accepted / queries), ``acceptance_foreground``, ``precision`` (correct among
            accepted), ``precision_foreground``, ``precision_foreground_before_check`` (correct among all
            foreground queries), ``chance_foreground`` (probability that a bank object drawn at random has
            the class of a foreground query drawn at random: ``sum_c p_query(c) p_bank(c)``) and
            ``background_share_of_accepted`` (accepted queries that are background objects).
        """

        def rate(numerator: int, denominator: int) -> float:
            return numerator / denominator if denominator else float("nan")

        query_classes = torch.tensor(self.query_classes, dtype=torch.long)
        return {
            "acceptance": rate(self.accepted, self.queries),
            "acceptance_foreground": rate(self.accepted_foreground, self.foreground),
            "precision": rate(self.correct_accepted, self.accepted),
            "precision_foreground": rate(self.correct_accepted_foreground, self.accepted_foreground),
            "precision_foreground_before_check": rate(self.correct_foreground, self.foreground),
            "chance_foreground": class_match_chance(query_classes, bank_classes),
            "background_share_of_accepted": rate(self.accepted - self.accepted_foreground, self.accepted),
        }


def target_statistics(targets: Tensor, classes: Tensor, images: Tensor) -> dict[str, float]:
    """What the teacher's object targets say about the objects' classes.

    The cross-view and cross-image object losses ask the student to predict the teacher's target
    distribution ``U_i = softmax((h_t(c_i) - C_c) / tau_c)`` of an object; if every object gets the same
    target, or targets ignore the class, neither loss can teach the class. With ``a_i = argmax U_i``:

    * ``prototypes``: ``exp(H(mean_i U_i))``, the effective number of prototypes the targets use
      (1 = collapsed onto one prototype, O = all used evenly);
    * ``same_prototype_same_class`` / ``same_prototype_other_class``: the probability that two objects from
      different images share their arg-max prototype, for pairs of the same class and of different classes.
      Equal values mean the targets carry no class.

    Args:
        targets: (M, O) target distributions (rows sum to 1).
        classes: (M,) long class of each object (pass foreground objects only to ask about object classes).
        images: (M,) long image of each object (pairs within one image are left out).
    Returns:
        The three statistics (NaN where no pair of a kind exists).
    """
    mean = targets.double().mean(dim=0)
    entropy = -(mean * mean.clamp_min(1e-30).log()).sum()
    winners = targets.argmax(dim=1)
    same_prototype = winners[:, None] == winners[None, :]
    other_image = images[:, None] != images[None, :]
    same_class = classes[:, None] == classes[None, :]

    def share(pairs: Tensor) -> float:
        return float(same_prototype[pairs].double().mean()) if pairs.any() else float("nan")

    return {
        "prototypes": float(entropy.exp()),
        "same_prototype_same_class": share(other_image & same_class),
        "same_prototype_other_class": share(other_image & ~same_class),
    }


def explained_share(winners: Tensor, factor: Tensor) -> float:
    """Share of a factor's entropy that the objects' arg-max prototypes explain: ``I(a; f) / H(f)``.

    With ``p(a, f)`` the joint frequencies of prototype ``a`` and factor value ``f`` over the objects,
    ``I(a; f) = H(a) + H(f) - H(a, f)`` (nats). 1 = the prototype tells the factor exactly (e.g. one set of
    prototypes for the foreground, another for the background), 0 = it tells nothing about it. It answers
    *what* the targets encode, where :func:`target_statistics` only says they do not encode the class.

    Args:
        winners: (M,) long arg-max prototype of every object.
        factor: (M,) long value of the factor (e.g. foreground or not, class, size tertile).
    Returns:
        ``I / H(f)`` in [0, 1]; NaN when the factor is constant (nothing to explain) or M = 0.
    """
    if winners.shape != factor.shape or winners.ndim != 1:
        raise ValueError(
            f"explained_share: winners {tuple(winners.shape)} and factor {tuple(factor.shape)} must be (M,)"
        )
    _, winner_ids = winners.unique(return_inverse=True)
    _, factor_ids = factor.unique(return_inverse=True)
    if winners.numel() == 0:
        return float("nan")
    joint = torch.zeros(int(winner_ids.max()) + 1, int(factor_ids.max()) + 1, dtype=torch.float64)
    ones = torch.ones_like(winner_ids, dtype=torch.float64)
    joint.index_put_((winner_ids, factor_ids), ones, accumulate=True)
    joint /= joint.sum()

    def entropy(probabilities: Tensor) -> Tensor:
        nonzero = probabilities[probabilities > 0]
        return -(nonzero * nonzero.log()).sum()

    factor_entropy = entropy(joint.sum(dim=0))
    if factor_entropy <= 0:
        return float("nan")
    information = entropy(joint.sum(dim=1)) + factor_entropy - entropy(joint.flatten())
    return float((information / factor_entropy).clamp(0.0, 1.0))


def pool_by_labels(tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean token of every label present in each image: the objects a clustering equal to ``labels`` makes.

        o_{b,l} = (1 / |{n : labels[b, n] = l}|) * sum_{n : labels[b, n] = l} tokens[b, n]

    Args:
        tokens: (B, N, D) patch tokens.
        labels: (B, N) long labels >= 0 (e.g. the instance of every patch).
    Returns:
        ``(objects, present)``: (M, D) float32 means, image by image and label ascending, for the
        M = ``present.sum()`` (image, label) pairs with at least one patch; (B, L) bool ``present``.
    """
    one_hot = _one_hot(labels, int(labels.max()) + 1 if labels.numel() else 1).to(torch.float32)
    counts = one_hot.sum(dim=1, keepdim=True)
    present = counts.squeeze(1) > 0
    # the training's pooling, with the column-normalised assignment of a clustering equal to ``labels``
    return object_representations(tokens.float(), one_hot / counts.clamp_min(1.0), present), present


def cosine_nearest(queries: Tensor, bank: Tensor, chunk: int = 2048) -> Tensor:
    """(Q,) long index of the bank row of largest cosine similarity to each query row, ``chunk`` queries at
    a time (memory ``chunk * R`` floats)."""
    bank_unit = torch.nn.functional.normalize(bank.float(), dim=1)
    return torch.cat(
        [
            (torch.nn.functional.normalize(block.float(), dim=1) @ bank_unit.T).argmax(dim=1)
            for block in queries.split(chunk)
        ]
    )


def nearest_class_precision(
    queries: Tensor, query_classes: Tensor, bank: Tensor, bank_classes: Tensor, chunk: int = 2048
) -> dict[str, float]:
    """How often the cosine nearest bank entry of a foreground query has the query's class (no cycle check).

        precision = mean over queries q with class(q) > 0 of [class(argmax_r cos(q, bank_r)) = class(q)]
        chance    = sum_c p_query(c) * p_bank(c)      (a bank entry drawn at random; background counts)

    Args:
        queries: (Q, D) features; query_classes: (Q,) long (0 = background, skipped as a query).
        bank: (R, D) features; bank_classes: (R,) long.
        chunk: queries per similarity block (memory ``chunk * R`` floats).
    Returns:
        ``precision`` and ``chance`` (NaN when there is no foreground query).
    """
    foreground = query_classes > 0
    queries, query_classes = queries[foreground], query_classes[foreground]
    if not len(queries):
        return {"precision": float("nan"), "chance": float("nan")}
    nearest = cosine_nearest(queries, bank, chunk)
    return {
        "precision": float((bank_classes[nearest] == query_classes).double().mean()),
        "chance": class_match_chance(query_classes, bank_classes),
    }


def linear_probe_accuracy(
    train: Tensor,
    train_classes: Tensor,
    test: Tensor,
    test_classes: Tensor,
    weight_decay: float = 1e-4,
    max_iterations: int = 300,
) -> dict[str, float]:
    """Accuracy of a multinomial logistic regression fitted on ``train`` and scored on ``test``: whether the
    class is *linearly* present in the features at all (retrieval by cosine needs it to dominate them).

    Features are standardised with the training mean m and deviation s; the fit minimises, by L-BFGS (strong
    Wolfe line search, deterministic, full batch),

        L(W, b) = -(1/n) sum_i log softmax(W^T x_i + b)[y_i] + weight_decay * ||W||^2,   x_i = (f_i - m) / s

    over the classes seen in ``train``; a test entry of another class counts as wrong.

    Args:
        train, test: (n, D), (t, D) features; train_classes, test_classes: (n,), (t,) long.
    Returns:
        ``test`` and ``train`` accuracy (fractions; NaN when a set is empty) and ``chance`` (the share of the
        test set in the most frequent training class: what a constant guess scores).
    """
    if not len(train) or not len(test):
        return {"test": float("nan"), "train": float("nan"), "chance": float("nan")}
    classes, targets = torch.unique(train_classes, return_inverse=True)
    train = train.float()
    mean, scale = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    inputs, test_inputs = (train - mean) / scale, (test.float() - mean) / scale
    weight = torch.zeros(inputs.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(inputs @ weight + bias, targets)
        loss = loss + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        test_accuracy = (classes[(test_inputs @ weight + bias).argmax(dim=1)] == test_classes).double().mean()
        train_accuracy = (classes[(inputs @ weight + bias).argmax(dim=1)] == train_classes).double().mean()
    most_frequent = classes[torch.bincount(targets).argmax()]
    return {
        "test": float(test_accuracy),
        "train": float(train_accuracy),
        "chance": float((test_classes == most_frequent).double().mean()),
    }
