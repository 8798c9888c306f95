"""DINO's linear probe on frozen ViT features (dense-protocol doc, Part C).

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
``--train_aug``, default for folder datasets). ``--no_train_aug`` feeds centre crops instead; the
features are then fixed, so with ``--cache_features`` (the default when there is no augmentation,
hence for the synthetic scenes) they are computed once and the classifier is trained on the cached
matrix, which is much faster on a CPU. This is a documented deviation from DINO's augmented protocol;
the results JSON records which variant ran. Validation features never depend on the epoch and are
always extracted once.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cribo_utils.eval.features import (
    add_eval_data_args,
    build_classification_split,
    build_eval_loader,
    default_results_path,
    extract_features,
    global_feature_name,
    is_vit,
    linear_probe_features,
    num_classes_of,
    resolve_image_sizes,
    write_results_json,
)
from cribo_utils.eval.knn import topk_accuracy
from cribo_utils.runtime import distributed
from cribo_utils.weights.checkpoint_formats import add_backbone_args, backbone_from_args

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
) -> dict[str, Any]:
    """Train ``classifier`` with SGD + per-epoch cosine annealing and validate every ``val_freq`` epochs.

    ``lr_e = lr * (1 + cos(pi * e / epochs)) / 2`` for epoch ``e = 0..epochs-1`` (``CosineAnnealingLR``).

    Args:
        classifier: freshly initialised linear layer on ``device``.
        train_batches: ``epoch -> iterable of (features, labels)`` (this rank's shard).
        val_features: (N_val, F) on ``device``, identical on every rank.
        val_labels: (N_val,) int64 on ``device``.
        epochs: number of epochs >= 1.
        lr: already-scaled learning rate.
        val_freq: validate when ``(epoch + 1) % val_freq == 0`` and after the last epoch.
        device: computation device (selects DDP's ``device_ids``).
    Returns:
        ``{"history": [...], "best": {...}, "last": {...}}``; entries hold ``epoch``, ``lr``,
        ``train_loss`` and, when evaluated, ``val_loss``, ``val_top1`` (and ``val_top5``).
    """
    if epochs < 1 or val_freq < 1:
        raise ValueError(f"--epochs ({epochs}) and --val_freq ({val_freq}) must be >= 1")
    device = torch.device(device)
    model: nn.Module = classifier
    if distributed.get_world_size() > 1:
        model = DistributedDataParallel(classifier, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
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
    evaluated = [record for record in history if "val_top1" in record]
    best = max(evaluated, key=lambda record: record["val_top1"])
    return {"history": history, "best": best, "last": evaluated[-1]}


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
    """Per-epoch batches of frozen features of freshly augmented images (DINO's protocol).

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
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            with torch.no_grad():
                features = linear_probe_features(
                    model, images.to(device, non_blocking=True), args.n_last_blocks, args.avgpool_patchtokens
                )
            yield features, labels.to(device, non_blocking=True)

    return batches


def get_args_parser() -> argparse.ArgumentParser:
    """Flags of ``eval_linear.py`` (DINO's names and defaults)."""
    from cribo_utils.train.parser import bool_flag

    parser = argparse.ArgumentParser("CrIBo linear probe", add_help=True)
    add_backbone_args(parser)
    add_eval_data_args(parser)
    group = parser.add_argument_group("linear probe")
    group.add_argument(
        "--n_last_blocks",
        default=4,
        type=int,
        help="Concatenate the [CLS] tokens of the last n blocks (DINO: 4 for ViT-S, 1 for ViT-B).",
    )
    group.add_argument(
        "--avgpool_patchtokens",
        default=False,
        type=bool_flag,
        help="Append the mean of the last block's patch tokens (DINO: false for ViT-S, true for ViT-B).",
    )
    group.add_argument("--epochs", default=100, type=int, help="Training epochs.")
    group.add_argument(
        "--lr",
        default=0.001,
        type=float,
        help="Base learning rate for a global batch of 256; the run uses lr * batch_size_per_gpu * world "
        "/ 256. DINO advises tuning it per checkpoint.",
    )
    group.add_argument(
        "--val_freq", default=1, type=int, help="Validate every this many epochs (and at the end)."
    )
    group.add_argument("--seed", default=0, type=int, help="Seed for the classifier init and the shuffling.")
    group.add_argument(
        "--train_aug",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="Train on RandomResizedCrop + flip views (DINO's protocol). Default: on for folder datasets, "
        "off (--no_train_aug) for synthetic scenes.",
    )
    group.add_argument(
        "--cache_features",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="Extract the training features once and train on the cached matrix; requires --no_train_aug. "
        "Default: on exactly when there is no training augmentation (a deviation from DINO's protocol).",
    )
    return parser


def resolve_training_inputs(args: argparse.Namespace) -> tuple[bool, bool]:
    """``(train_aug, cache_features)`` after applying the dataset-dependent defaults, or a clear error."""
    train_aug = args.train_aug if args.train_aug is not None else args.dataset != "synthetic"
    cache_features = args.cache_features if args.cache_features is not None else not train_aug
    if cache_features and train_aug:
        raise ValueError("--cache_features needs fixed inputs: add --no_train_aug, or drop --cache_features")
    return train_aug, cache_features


def run_linear(args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate the linear probe; write the results JSON (and the classifier) on rank 0.

    Args:
        args: flags from :func:`get_args_parser`.
    Returns:
        The results dict (identical on every rank).
    """
    from data.transforms import eval_transform, linear_train_transform

    env = distributed.init_distributed()
    start = time.time()
    train_aug, cache_features = resolve_training_inputs(args)
    resize, crop = resolve_image_sizes(args)
    val_transform = eval_transform(resize=resize, crop=crop)
    train_set = build_classification_split(
        args, "train", linear_train_transform(crop) if train_aug else val_transform
    )
    val_set = build_classification_split(args, "val", val_transform)

    model = backbone_from_args(args)
    model.to(env.device)
    feature_kwargs = {
        "kind": "linear",
        "n_last_blocks": args.n_last_blocks,
        "avgpool": args.avgpool_patchtokens,
    }
    val_loader = build_eval_loader(val_set, args.batch_size_per_gpu, args.num_workers)
    val_features, val_labels = extract_features(model, val_loader, env.device, **feature_kwargs)
    if cache_features:
        train_loader = build_eval_loader(train_set, args.batch_size_per_gpu, args.num_workers)
        train_features, train_labels = extract_features(model, train_loader, env.device, **feature_kwargs)
        train_batches = cached_feature_batches(
            train_features, train_labels, args.batch_size_per_gpu, args.seed, env.device
        )
        num_classes = num_classes_of(train_set, [train_labels, val_labels])
    else:
        train_batches = augmented_batches(model, train_set, args, env.device)
        num_classes = num_classes_of(train_set, [val_labels])

    torch.manual_seed(args.seed)
    classifier = LinearClassifier(val_features.shape[1], num_classes).to(env.device)
    lr = scaled_lr(args.lr, args.batch_size_per_gpu, env.world_size)
    logger.info(
        "linear probe: %d classes, feature dim %d, lr %.2e, %d epochs, train_aug=%s, cache_features=%s",
        num_classes,
        val_features.shape[1],
        lr,
        args.epochs,
        train_aug,
        cache_features,
    )
    fit = fit_linear_classifier(
        classifier,
        train_batches,
        val_features.to(env.device),
        val_labels.to(env.device),
        epochs=args.epochs,
        lr=lr,
        val_freq=args.val_freq,
        device=env.device,
    )
    best, last = fit["best"], fit["last"]
    logger.info(
        "linear probe: best top-1 %.2f (epoch %d), last top-1 %.2f",
        best["val_top1"],
        best["epoch"] + 1,
        last["val_top1"],
    )

    output = args.output_json or default_results_path(args.pretrained_weights, "eval_linear.json")
    results = {
        "protocol": "DINO linear probe on frozen final-norm [CLS] tokens of the last n blocks"
        if is_vit(model)
        else f"linear probe on frozen {global_feature_name(model)} features (n_last_blocks and "
        "avgpool_patchtokens do not apply)",
        "deviation": None
        if train_aug
        else "no training augmentation (centre crops)"
        + (", classifier trained on cached features" if cache_features else ""),
        "pretrained_weights": args.pretrained_weights,
        "checkpoint_key": args.checkpoint_key,
        "arch": args.arch,
        "patch_size": args.patch_size if is_vit(model) else None,
        "depth": int(getattr(model, "depth", 0)),
        "dataset": args.dataset,
        "data_path": args.data_path,
        "resize": resize,
        "image_size": crop,
        "n_last_blocks": args.n_last_blocks,
        "avgpool_patchtokens": args.avgpool_patchtokens,
        "feature_dim": int(val_features.shape[1]),
        "epochs": args.epochs,
        "base_lr": args.lr,
        "lr": lr,
        "batch_size_per_gpu": args.batch_size_per_gpu,
        "world_size": env.world_size,
        "global_batch_size": args.batch_size_per_gpu * env.world_size,
        "optimizer": "SGD momentum 0.9, weight decay 0, cosine annealing per epoch",
        "train_aug": train_aug,
        "cache_features": cache_features,
        "seed": args.seed,
        "num_train": len(train_set),  # type: ignore[arg-type]
        "num_val": len(val_set),  # type: ignore[arg-type]
        "num_classes": num_classes,
        "best_top1": best["val_top1"],
        "best_epoch": best["epoch"],
        "last_top1": last["val_top1"],
        "last_top5": last.get("val_top5"),
        "best": best,
        "last": last,
        "history": fit["history"],
        "elapsed_s": round(time.time() - start, 2),
        "output_json": str(output),
    }
    if not all(math.isfinite(record["train_loss"]) for record in fit["history"]):
        logger.warning("linear probe: non-finite training loss; lower --lr")
    if distributed.is_main_process():
        write_results_json(results, output)
        classifier_path = default_classifier_path(output)
        torch.save(
            {
                "state_dict": classifier.state_dict(),
                "num_labels": num_classes,
                "feature_dim": int(val_features.shape[1]),
                "n_last_blocks": args.n_last_blocks,
                "avgpool_patchtokens": args.avgpool_patchtokens,
            },
            classifier_path,
        )
        logger.info("saved the linear classifier to %s", classifier_path)
    distributed.barrier()
    return results


def default_classifier_path(results_json: str | os.PathLike[str]) -> Path:
    """``<results stem>_classifier.pth`` next to the results JSON."""
    path = Path(results_json)
    return path.with_name(f"{path.stem}_classifier.pth")
