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
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cribo_utils.eval.cli import (
    DefaultsHelpFormatter,
    EvalConfigError,
    add_run_flags,
    check_result_owner,
    check_writable,
    resolve_seeds,
    result_path,
)
from cribo_utils.eval.features import (
    add_eval_data_args,
    build_classification_split,
    build_eval_loader,
    extract_features,
    global_feature_name,
    is_vit,
    linear_probe_features,
    num_classes_of,
    resolve_classification_dataset,
    resolve_image_sizes,
    write_results_json,
)
from cribo_utils.eval.knn import topk_accuracy
from cribo_utils.eval.linear_checkpoint import check_resumable, probe_settings, read_probe_checkpoint
from cribo_utils.runtime import distributed
from cribo_utils.runtime.flags import add_bool_flag
from cribo_utils.train.checkpoint import atomic_save
from cribo_utils.weights.checkpoint_formats import add_backbone_args, backbone_from_args
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


def get_args_parser() -> argparse.ArgumentParser:
    """Flags of ``eval_linear.py`` (DINO's names and defaults; :mod:`cribo_utils.eval.cli`)."""
    parser = argparse.ArgumentParser("CrIBo linear probe", formatter_class=DefaultsHelpFormatter)
    add_backbone_args(parser)
    add_eval_data_args(parser)
    group = parser.add_argument_group("linear probe")
    group.add_argument(
        "--n_last_blocks",
        default=4,
        type=int,
        help="Concatenate the [CLS] tokens of the last n blocks (DINO: 4 for ViT-S, 1 for ViT-B).",
    )
    add_bool_flag(
        group,
        "--avgpool_patchtokens",
        False,
        "Append the mean of the last block's patch tokens (DINO: false for ViT-S, true for ViT-B).",
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
    group.add_argument(
        "--num_labels",
        default=None,
        type=int,
        help="Outputs of the linear classifier (DINO's flag; 1000 for ImageNet). Default: the number of "
        "classes of the dataset; a value below it is an error.",
    )
    add_bool_flag(
        group,
        "--evaluate",
        False,
        "Only evaluate the probe already trained in --output_dir (its checkpoint) on the validation set, "
        "and write eval_linear_<dataset>_evaluate.json.",
    )
    add_bool_flag(
        group,
        "--train_aug",
        None,
        "Train on RandomResizedCrop + flip views (DINO's protocol). Default: true for folder datasets, "
        "false for the synthetic scenes.",
        false_aliases=("--no_train_aug", "--no-train_aug"),
    )
    add_bool_flag(
        group,
        "--cache_features",
        None,
        "Extract the training features once and train on the cached matrix; needs --train_aug false. "
        "Default: true exactly when there is no training augmentation (a deviation from DINO's protocol).",
        false_aliases=("--no_cache_features", "--no-cache_features"),
    )
    add_run_flags(parser, 128, "eval_linear_<dataset>.json")
    return parser


def resolve_training_inputs(args: argparse.Namespace) -> tuple[bool, bool]:
    """``(train_aug, cache_features)`` after applying the dataset-dependent defaults, or a clear error."""
    train_aug = args.train_aug if args.train_aug is not None else args.dataset != "synthetic"
    cache_features = args.cache_features if args.cache_features is not None else not train_aug
    if cache_features and train_aug:
        raise EvalConfigError(
            "--cache_features needs fixed inputs: add --train_aug false (or --no_train_aug), or drop "
            "--cache_features"
        )
    return train_aug, cache_features


def _check_linear_flags(args: argparse.Namespace) -> None:
    """One-line errors for impossible values, before any work."""
    if args.epochs < 1 or args.val_freq < 1 or args.n_last_blocks < 1:
        raise EvalConfigError(
            f"--epochs {args.epochs}, --val_freq {args.val_freq} and --n_last_blocks {args.n_last_blocks} "
            "must be >= 1"
        )
    if args.num_labels is not None and args.num_labels < 1:
        raise EvalConfigError(f"--num_labels {args.num_labels} must be >= 1")


def resolve_num_labels(requested: int | None, num_classes: int) -> int:
    """The classifier's outputs: ``--num_labels``, or the dataset's class count.

    Raises:
        EvalConfigError: ``--num_labels`` below the number of classes (labels would fall outside it).
    """
    if requested is None:
        return num_classes
    if requested < num_classes:
        raise EvalConfigError(
            f"--num_labels {requested} is below the {num_classes} classes of the dataset; use "
            f"--num_labels {num_classes} (or leave it out)"
        )
    if requested > num_classes:
        logger.info("--num_labels %d: %d outputs unused by this dataset", requested, requested - num_classes)
    return requested


def run_linear(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume, or only evaluate) the linear probe; write the results JSON on rank 0.

    The probe is checkpointed atomically after every epoch (``eval_linear_<dataset>_checkpoint.pth`` in
    ``--output_dir``); rerunning the same command resumes after the last completed epoch and gives the
    same classifier as an uninterrupted run. A checkpoint of other settings is refused, naming them.

    Args:
        args: flags from :func:`get_args_parser`.
    Returns:
        The results dict (identical on every rank).
    """
    from data.transforms import eval_transform, linear_train_transform

    resolve_seeds(args)
    _check_linear_flags(args)
    resolve_classification_dataset(args, "eval_linear.py")
    train_aug, cache_features = resolve_training_inputs(args)
    stem = f"eval_linear_{args.dataset}"
    output = check_writable(result_path(args, f"{stem}_evaluate.json" if args.evaluate else f"{stem}.json"))
    check_result_owner(output, args.pretrained_weights, args.checkpoint_key)
    checkpoint_path = output.with_name(f"{stem}_checkpoint.pth")
    resume = read_probe_checkpoint(checkpoint_path, required=args.evaluate)

    env = distributed.init_distributed(dist_url=args.dist_url)
    start = time.time()
    resize, crop = resolve_image_sizes(args)
    val_transform = eval_transform(resize=resize, crop=crop)
    train_set = build_classification_split(
        args, "train", linear_train_transform(crop) if train_aug else val_transform
    )
    val_set = build_classification_split(args, "val", val_transform)

    requested_labels = args.num_labels
    if requested_labels is None and args.evaluate and resume is not None:
        requested_labels = resume["settings"].get("num_labels")
    num_classes = resolve_num_labels(requested_labels, num_classes_of(train_set, []))
    lr = scaled_lr(args.lr, args.batch_size_per_gpu, env.world_size)
    model = backbone_from_args(args)  # resolves --arch / --patch_size from the weights
    settings = probe_settings(args, train_aug, cache_features, lr, num_classes)
    if resume is not None:  # before any feature is extracted
        check_resumable(resume, settings, checkpoint_path, evaluate_only=args.evaluate)
    model.to(env.device)
    feature_kwargs = {
        "kind": "linear",
        "n_last_blocks": args.n_last_blocks,
        "avgpool": args.avgpool_patchtokens,
    }
    val_loader = build_eval_loader(val_set, args.batch_size_per_gpu, args.num_workers)
    val_features, val_labels = extract_features(model, val_loader, env.device, **feature_kwargs)
    settings["feature_dim"] = int(val_features.shape[1])
    torch.manual_seed(args.seed)
    classifier = LinearClassifier(val_features.shape[1], num_classes).to(env.device)
    if args.evaluate:
        assert resume is not None
        classifier.load_state_dict(resume["state_dict"])
        evaluation = evaluate_classifier(classifier, val_features.to(env.device), val_labels.to(env.device))
        logger.info("linear probe of %s: val top-1 %.2f", checkpoint_path, evaluation["top1"])
        fit = {"history": resume["history"], "last": {f"val_{k}": v for k, v in evaluation.items()}}
        fit["best"] = fit["last"]
    else:
        done = resume is not None and int(resume["epoch"]) >= args.epochs
        if cache_features and not done:
            train_loader = build_eval_loader(train_set, args.batch_size_per_gpu, args.num_workers)
            train_features, train_labels = extract_features(model, train_loader, env.device, **feature_kwargs)
            train_batches = cached_feature_batches(
                train_features, train_labels, args.batch_size_per_gpu, args.seed, env.device
            )
        else:
            train_batches = augmented_batches(model, train_set, args, env.device)
        logger.info(
            "linear probe: %d classes, feature dim %d, lr %.2e, %d epochs, train_aug=%s, cache_features=%s%s",
            num_classes,
            val_features.shape[1],
            lr,
            args.epochs,
            train_aug,
            cache_features,
            f", resumed after epoch {resume['epoch']} from {checkpoint_path}" if resume is not None else "",
        )

        def save(state: dict[str, Any]) -> None:
            if distributed.is_main_process():
                atomic_save({**state, "settings": settings}, str(checkpoint_path))

        fit = fit_linear_classifier(
            classifier,
            train_batches,
            val_features.to(env.device),
            val_labels.to(env.device),
            epochs=args.epochs,
            lr=lr,
            val_freq=args.val_freq,
            device=env.device,
            resume=resume,
            on_epoch_end=save,
        )
        logger.info(
            "linear probe: best top-1 %.2f (epoch %d), last top-1 %.2f",
            fit["best"]["val_top1"],
            fit["best"]["epoch"] + 1,
            fit["last"]["val_top1"],
        )

    best, last = fit["best"], fit["last"]
    results = {
        "protocol": "DINO linear probe on frozen final-norm [CLS] tokens of the last n blocks"
        if is_vit(model)
        else f"linear probe on frozen {global_feature_name(model)} features (n_last_blocks and "
        "avgpool_patchtokens do not apply)",
        "deviation": None
        if train_aug
        else "no training augmentation (centre crops)"
        + (", classifier trained on cached features" if cache_features else ""),
        **settings,
        "depth": int(getattr(model, "depth", 0)),
        "resize": resize,
        "optimizer": "SGD momentum 0.9, weight decay 0, cosine annealing per epoch",
        "num_train": len(train_set),  # type: ignore[arg-type]
        "num_val": len(val_set),  # type: ignore[arg-type]
        "num_classes": num_classes,
        "evaluate_only": bool(args.evaluate),
        "best_top1": best["val_top1"],
        "best_epoch": best.get("epoch"),
        "last_top1": last["val_top1"],
        "last_top5": last.get("val_top5"),
        "best": best,
        "last": last,
        "history": fit["history"],
        "checkpoint": str(checkpoint_path),
        "elapsed_s": round(time.time() - start, 2),
        "output_json": str(output),
    }
    if not all(math.isfinite(record["train_loss"]) for record in fit["history"]):
        logger.warning("linear probe: non-finite training loss; lower --lr")
    if distributed.is_main_process():
        write_results_json(results, output)
    distributed.barrier()
    return results
