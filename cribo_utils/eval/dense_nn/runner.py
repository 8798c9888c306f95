"""The command-line runner of ``eval_dense_nn.py``: datasets and backbone from the flags, the JSON file."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from cribo_utils.eval.dense_nn.config import DEFAULT_SPLITS, config_from_args, default_output_json
from cribo_utils.eval.dense_nn.scoring import dataset_classes, evaluate_dense_nn
from cribo_utils.runtime import distributed

logger = logging.getLogger(__name__)


def build_datasets(args: Any) -> tuple[Any, Any]:
    """(train, val) segmentation datasets yielding (PIL image, PIL mask) pairs, from the flags."""
    default_train, default_val = DEFAULT_SPLITS[args.dataset]
    train_split = args.train_split or default_train
    val_split = args.val_split or default_val
    if args.dataset != "synthetic" and not args.data_path:
        raise ValueError(
            f"--dataset {args.dataset} needs --data_path (see dense-nn-protocol.md A.7 for the "
            "folder layouts)"
        )
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

    Returns:
        The result dict (on every rank).
    """
    import json

    from cribo_utils.weights.checkpoint_formats import backbone_from_args
    from models import dense_stride

    env = distributed.init_distributed()
    cfg = config_from_args(args)
    # A ViT's patch grid has the stride --patch_size; a conv net's dense grid that of --dense_stage.
    cfg.validate(dense_stride(args.arch, args.patch_size, getattr(args, "dense_stage", 4)))
    torch.manual_seed(args.seed)
    output_json = args.output_json or default_output_json(args.pretrained_weights)
    train_dataset, val_dataset = build_datasets(args)
    num_classes, class_names = dataset_classes(val_dataset)
    backbone = backbone_from_args(args).to(env.device)
    results = evaluate_dense_nn(
        backbone, train_dataset, val_dataset, cfg, env.device, num_classes, class_names
    )
    results.update(
        {
            "dataset": args.dataset,
            "data_path": args.data_path,
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
    if distributed.is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
        with open(output_json, "w") as handle:
            json.dump(results, handle, indent=2)
        logger.info("wrote %s", output_json)
    distributed.barrier()
    return results
