"""The command line of ``eval_linear.py``: flags, dataset, the probe's checkpoint, the results file.

The probe itself (classifier, training, batches) is :mod:`cribo_utils.eval.linear_probe`; the protocol is
docs/dense-nn-protocol.md, Part C.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch

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
    num_classes_of,
    resolve_classification_dataset,
    resolve_image_sizes,
    write_results_json,
)
from cribo_utils.eval.linear_checkpoint import check_resumable, probe_settings, read_probe_checkpoint
from cribo_utils.eval.linear_probe import (
    LinearClassifier,
    augmented_batches,
    cached_feature_batches,
    evaluate_classifier,
    fit_linear_classifier,
    scaled_lr,
)
from cribo_utils.runtime import distributed
from cribo_utils.runtime.flags import add_bool_flag
from cribo_utils.train.checkpoint import atomic_save
from cribo_utils.weights.checkpoint_formats import add_backbone_args, backbone_from_args

logger = logging.getLogger(__name__)


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
