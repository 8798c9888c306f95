"""The command-line runner of ``eval_dense_nn.py``: datasets and backbone from the flags, the JSON file."""

from __future__ import annotations

import logging
from typing import Any

import torch

from cribo_utils.eval.cli import check_result_owner, check_writable
from cribo_utils.eval.dense_nn.cli import protocol_record, resolve_dense_args
from cribo_utils.eval.dense_nn.config import DEFAULT_SPLITS, config_from_args
from cribo_utils.eval.dense_nn.scoring import dataset_classes, evaluate_dense_nn
from cribo_utils.runtime import distributed

logger = logging.getLogger(__name__)


def build_datasets(args: Any) -> tuple[Any, Any]:
    """(train, val) segmentation datasets yielding (PIL image, PIL mask) pairs, from the flags."""
    default_train, default_val = DEFAULT_SPLITS[args.dataset]
    train_split = args.train_split or default_train
    val_split = args.val_split or default_val
    from data.datasets import build_segmentation_dataset

    synthetic_kwargs = None
    if args.dataset == "synthetic":
        synthetic_kwargs = dict(
            image_size=args.synthetic_image_size,
            num_train=args.synthetic_num_train,
            num_val=args.synthetic_num_val,
            seed=args.synthetic_seed,
            object_colours=args.synthetic_object_colours,
            level=args.synthetic_level,
        )
    return (
        build_segmentation_dataset(args.dataset, args.data_path, train_split, None, synthetic_kwargs),
        build_segmentation_dataset(args.dataset, args.data_path, val_split, None, synthetic_kwargs),
    )


def run_dense_nn(args: Any) -> dict[str, Any]:
    """Run the evaluation described by the flags of ``eval_dense_nn.py`` and write the JSON (rank 0).

    Every check (flags, dataset layout, protocol, result folder) comes before any image is read.

    Returns:
        The result dict (on every rank).
    """
    import json

    from cribo_utils.weights.checkpoint_formats import backbone_from_args, resolve_backbone_args
    from models import dense_stride

    output_json = check_writable(resolve_dense_args(args))
    check_result_owner(output_json, args.pretrained_weights, args.checkpoint_key)
    env = distributed.init_distributed(dist_url=args.dist_url)
    resolve_backbone_args(args)
    cfg = config_from_args(args)
    # A ViT's patch grid has the stride --patch_size; a conv net's dense grid that of --dense_stage.
    cfg.validate(dense_stride(args.arch, args.patch_size, getattr(args, "dense_stage", 4)))
    torch.manual_seed(args.seed)
    train_dataset, val_dataset = build_datasets(args)
    num_classes, class_names = dataset_classes(val_dataset)
    backbone = backbone_from_args(args).to(env.device)
    results = evaluate_dense_nn(
        backbone, train_dataset, val_dataset, cfg, env.device, num_classes, class_names
    )
    results.update(
        {
            **protocol_record(args),
            "dataset": args.dataset,
            "data_path": args.data_path if args.dataset != "synthetic" else None,
            "train_split": args.train_split or DEFAULT_SPLITS[args.dataset][0],
            "val_split": args.val_split or DEFAULT_SPLITS[args.dataset][1],
            "arch": args.arch,
            "pretrained_weights": args.pretrained_weights,
            "checkpoint_key": args.checkpoint_key,
            "random_init": not args.pretrained_weights,
        }
    )
    if args.dataset == "synthetic":
        results["synthetic"] = {
            "image_size": args.synthetic_image_size,
            "num_train": args.synthetic_num_train,
            "num_val": args.synthetic_num_val,
            "seed": args.synthetic_seed,
            "object_colours": args.synthetic_object_colours,
            "level": args.synthetic_level,
        }
    results["output_json"] = str(output_json)
    if distributed.is_main_process():
        with open(output_json, "w") as handle:
            json.dump(results, handle, indent=2)
        logger.info("wrote %s", output_json)
    distributed.barrier()
    return results
