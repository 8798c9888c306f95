"""DINO's linear probe on frozen ViT features (docs/dense-nn-protocol.md, Part C).

Frozen features (see :func:`cribo_utils.eval.features.linear_probe_features`):

    f(x) = [c_{L-n+1}(x), ..., c_L(x), (mean_i p_{L,i}(x) if avgpool)]  in R^{D (n + avgpool)},

with ``c_l`` / ``p_{l,i}`` the [CLS] / patch tokens of block ``l`` after the final LayerNorm. A single
linear layer ``logits = W f + b`` (``W ~ N(0, 0.01^2)``, ``b = 0``) is trained with cross-entropy, SGD
(momentum 0.9, no weight decay), learning rate ``lr * global_batch / 256`` (``--lr 0.001`` by default)
and cosine annealing to 0 stepped once per epoch, for ``--epochs`` (100) epochs. Validation (every
``--val_freq`` epochs and after the last one) reports top-1 and top-5 (with >= 5 classes); the JSON
records both the best top-1 over evaluated epochs (DINO's printed number, a mild selection on the
validation set) and the last epoch's accuracies.

Training inputs: DINO's protocol augments every training image (RandomResizedCrop + flip, flag
``--train_aug``, default for folder datasets). ``--train_aug false`` feeds centre crops instead; the
features are then fixed, so with ``--cache_features`` (the default when there is no augmentation,
hence for the synthetic scenes) they are computed once and the classifier is trained on the cached
matrix, which is much faster on a CPU. This is a documented deviation from DINO's augmented protocol;
the results JSON records which variant ran. Validation features never depend on the epoch and are
always extracted once. A probe is resumable: the batches of an epoch depend on the seed and the epoch
only, and :func:`fit_linear_classifier` continues from a state it handed to ``on_epoch_end``. The command
line (flags, checkpoint, results) is :mod:`cribo_utils.eval.linear_runner`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cribo_utils.eval.features import linear_probe_features
from cribo_utils.eval.knn import topk_accuracy
from cribo_utils.runtime import distributed
from data.loading import mix_seed

logger = logging.getLogger(__name__)

BatchSource = Callable[[int], Iterable[tuple[Tensor, Tensor]]]


class LinearClassifier(nn.Module):
    """``logits = W f + b`` on flattened frozen features; W ~ N(0, 0.01^2), b = 0 (DINO's init).

    Args:
        dim: feature width ``D (n + avgpool)``.
        num_labels: number of classes C.
    """

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        """(B, ...) features -> (B, C) logits."""
        return self.linear(features.flatten(1))


def scaled_lr(base_lr: float, batch_size_per_gpu: int, world_size: int) -> float:
    """DINO's linear scaling rule: ``lr = base_lr * batch_size_per_gpu * world_size / 256``."""
    return base_lr * batch_size_per_gpu * world_size / 256.0


def train_one_epoch(
    classifier: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[Tensor, Tensor]]
) -> float:
    """One pass of cross-entropy SGD over ``(features, labels)`` batches; returns the mean loss over ranks.

    Args:
        classifier: the (possibly DDP-wrapped) linear layer.
        optimizer: its SGD optimiser.
        batches: (B, F) features and (B,) labels on the classifier's device.
    Returns:
        Sample-weighted mean training loss, averaged over all ranks.
    """
    classifier.train()
    loss_sum, count = None, 0
    for features, labels in batches:
        loss = F.cross_entropy(classifier(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        weighted = loss.detach().double() * labels.shape[0]
        loss_sum = weighted if loss_sum is None else loss_sum + weighted
        count += labels.shape[0]
    if loss_sum is None:
        raise RuntimeError("train_one_epoch: no training batch; the training set is empty")
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(float(count))]))
    return float(totals[0] / totals[1])


@torch.no_grad()
def evaluate_classifier(
    classifier: nn.Module, features: Tensor, labels: Tensor, batch_size: int = 1024
) -> dict[str, float]:
    """Cross-entropy and top-1 / top-5 accuracy (percent; top-5 only with >= 5 classes) on cached features.

    Args:
        classifier: the unwrapped :class:`LinearClassifier`.
        features: (N, F) on the classifier's device.
        labels: (N,) int64 on the same device.
        batch_size: rows per forward pass.
    Returns:
        ``{"loss": ..., "top1": ..., ("top5": ...)}``.
    """
    classifier.eval()
    logits = torch.cat([classifier(chunk) for chunk in features.split(batch_size)])
    num_classes = logits.shape[1]
    accuracy = topk_accuracy(logits, labels, (1, 5) if num_classes >= 5 else (1,))
    result = {"loss": F.cross_entropy(logits, labels).item()}
    result.update({f"top{t}": value for t, value in accuracy.items()})
    return result


def fit_linear_classifier(
    classifier: LinearClassifier,
    train_batches: BatchSource,
    val_features: Tensor,
    val_labels: Tensor,
    epochs: int,
    lr: float,
    val_freq: int = 1,
    device: torch.device | str = "cpu",
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``classifier`` with SGD + per-epoch cosine annealing and validate every ``val_freq`` epochs.

    ``lr_e = lr * (1 + cos(pi * e / epochs)) / 2`` for epoch ``e = 0..epochs-1`` (``CosineAnnealingLR``).

    Args:
        classifier: freshly initialised linear layer on ``device``.
        train_batches: ``epoch -> iterable of (features, labels)`` (this rank's shard); the batches of an
            epoch must depend on the epoch only, so that a resumed run sees the same ones.
        val_features: (N_val, F) on ``device``, identical on every rank.
        val_labels: (N_val,) int64 on ``device``.
        epochs: number of epochs >= 1.
        lr: already-scaled learning rate.
        val_freq: validate when ``(epoch + 1) % val_freq == 0`` and after the last epoch.
        device: computation device (selects DDP's ``device_ids``).
        resume: a state written through ``on_epoch_end`` (:func:`training_state`): training continues
            after its epoch with its classifier, optimiser, scheduler and history.
        on_epoch_end: called after every epoch with :func:`training_state` (e.g. to checkpoint it).
    Returns:
        ``{"history": [...], "best": {...}, "last": {...}}``; entries hold ``epoch``, ``lr``,
        ``train_loss`` and, when evaluated, ``val_loss``, ``val_top1`` (and ``val_top5``).
    """
    if epochs < 1 or val_freq < 1:
        raise ValueError(f"--epochs ({epochs}) and --val_freq ({val_freq}) must be >= 1")
    device = torch.device(device)
    if resume is not None:
        classifier.load_state_dict(resume["state_dict"])
    model: nn.Module = classifier
    if distributed.get_world_size() > 1:
        model = DistributedDataParallel(classifier, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        history, start_epoch = list(resume["history"]), int(resume["epoch"])
    for epoch in range(start_epoch, epochs):
        epoch_lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(model, optimizer, train_batches(epoch))
        scheduler.step()
        record: dict[str, float] = {"epoch": epoch, "lr": epoch_lr, "train_loss": train_loss}
        if (epoch + 1) % val_freq == 0 or epoch == epochs - 1:
            record.update(
                {
                    f"val_{name}": value
                    for name, value in evaluate_classifier(classifier, val_features, val_labels).items()
                }
            )
            logger.info(
                "epoch %d/%d: lr %.2e, train loss %.4f, val top-1 %.2f",
                epoch + 1,
                epochs,
                epoch_lr,
                train_loss,
                record["val_top1"],
            )
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(training_state(classifier, optimizer, scheduler, epoch + 1, history))
    evaluated = [record for record in history if "val_top1" in record]
    best = max(evaluated, key=lambda record: record["val_top1"])
    return {"history": history, "best": best, "last": evaluated[-1]}


def training_state(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    history: list[dict[str, float]],
) -> dict[str, Any]:
    """What a resumed probe needs after ``epoch`` epochs (DINO's keys: ``epoch`` is the next one to run)."""
    evaluated = [record["val_top1"] for record in history if "val_top1" in record]
    return {
        "epoch": epoch,
        "state_dict": classifier.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best_acc": max(evaluated) if evaluated else None,
        "history": [dict(record) for record in history],
    }


def cached_feature_batches(
    features: Tensor, labels: Tensor, batch_size: int, seed: int, device: torch.device | str
) -> BatchSource:
    """Per-epoch shuffled, rank-sharded batches of a cached feature matrix (``DistributedSampler`` order).

    Args:
        features: (N, F) cached training features (identical on every rank), CPU.
        labels: (N,) int64.
        batch_size: rows per rank and batch.
        seed: shuffling seed; epoch ``e`` uses the sampler's ``seed + e`` permutation.
        device: where batches are sent.
    Returns:
        ``epoch -> iterator of (features, labels)``.
    """
    sampler = DistributedSampler(
        range(features.shape[0]),  # type: ignore[arg-type]
        num_replicas=distributed.get_world_size(),
        rank=distributed.get_rank(),
        shuffle=True,
        seed=seed,
    )

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        for index in order.split(batch_size):
            yield features[index].to(device, non_blocking=True), labels[index].to(device, non_blocking=True)

    return batches


def augmented_batches(
    model: nn.Module,
    dataset: Dataset,
    args: argparse.Namespace,
    device: torch.device | str,
) -> BatchSource:
    """Per-epoch batches of frozen features of freshly augmented images (DINO's protocol), seeded per epoch.

    Args:
        model: frozen backbone on ``device``.
        dataset: training set with the augmenting transform.
        args: flags ``batch_size_per_gpu``, ``num_workers``, ``seed``, ``n_last_blocks``,
            ``avgpool_patchtokens``.
        device: computation device.
    Returns:
        ``epoch -> iterator of (features, labels)``.
    """
    sampler = DistributedSampler(
        dataset,
        num_replicas=distributed.get_world_size(),
        rank=distributed.get_rank(),
        shuffle=True,
        seed=args.seed,
    )
    generator = torch.Generator()
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        generator=generator,
    )

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        # The augmentations of an epoch depend on (seed, rank, epoch) only, so a resumed probe sees the
        # same views: the workers' seeds come from `generator`, a main-process loader uses the global RNG.
        epoch_seed = mix_seed(args.seed, distributed.get_rank(), epoch)
        generator.manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        sampler.set_epoch(epoch)
        for images, labels in loader:
            with torch.no_grad():
                features = linear_probe_features(
                    model, images.to(device, non_blocking=True), args.n_last_blocks, args.avgpool_patchtokens
                )
            yield features, labels.to(device, non_blocking=True)

    return batches
