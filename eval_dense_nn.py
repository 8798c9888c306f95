"""Dense nearest-neighbour retrieval (Hummingbird) evaluation of a frozen ViT: mIoU by label transfer.

Protocol and defaults: dense-nn-protocol.md, Part A. The logic lives in :mod:`cribo_utils.eval.dense_nn`.

Synthetic scenes (CPU, a few minutes; a random network unless --pretrained_weights is given)::

    python eval_dense_nn.py --pretrained_weights output/checkpoint.pth --num_workers 2

Pascal VOC 2012 trainaug -> val, the settings of the literature (512 px, 10,240,000 memory entries)::

    torchrun --nproc_per_node=8 eval_dense_nn.py --dataset voc --data_path /data/VOCdevkit/VOC2012 \
        --arch vit_small --patch_size 16 --pretrained_weights vits16-in.pth --input_size 512 \
        --memory_size 10240000 --augmentation_epochs 2

Each process holds 1/W of the memory (exact top-k merged across processes), searched on its own device.
Released conv nets (VICRegL, DINO ResNet-50) use their last stage, stride 32 (``--dense_stage 3``: 16)::

    python eval_dense_nn.py --arch convnext_small --pretrained_weights convnext_small_alpha0.75.pth

ADE20K (150 classes, label 0 ignored), 1/128 of the training images, as many passes as the memory needs::

    torchrun --nproc_per_node=8 eval_dense_nn.py --dataset ade20k --data_path /data/ADEChallengeData2016 \
        --pretrained_weights vits16-coco.pth --train_fraction 0.0078125 --memory_size 1024000 \
        --augmentation_epochs 7

The result (mIoU with the identity class mapping, mIoU over present classes, pixel accuracy, per-class
IoU, the Hungarian-matched mIoU and every protocol parameter) is written to
``<checkpoint dir>/eval_dense_nn.json`` unless --output_json is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from cribo_utils.eval.dense_nn import DATASETS, INDEX_KINDS, run_dense_nn
from cribo_utils.runtime import distributed
from cribo_utils.runtime.logger import setup_logging
from cribo_utils.weights.checkpoint_formats import LOADING_ERRORS, add_backbone_args, resolve_backbone_args
from data.synthetic import add_scene_args

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    """Flags of the dense-NN evaluation (``add_help=False`` so other launchers can reuse them)."""
    parser = argparse.ArgumentParser("CrIBo dense NN retrieval evaluation", add_help=False)
    add_backbone_args(parser)

    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        "--dataset_type",
        dest="dataset",
        default="synthetic",
        choices=DATASETS,
        help="synthetic (built-in scenes, default), voc (Pascal VOC 2012 + SBD) or ade20k.",
    )
    group.add_argument(
        "--data_path",
        default="",
        type=str,
        help="VOC: the VOC2012 folder (JPEGImages, SegmentationClass[Aug], ImageSets); "
        "ADE20K: the ADEChallengeData2016 folder.",
    )
    group.add_argument(
        "--train_split",
        default=None,
        type=str,
        help="Memory split (default: trainaug for voc, training for ade20k, train for synthetic).",
    )
    group.add_argument(
        "--val_split",
        default=None,
        type=str,
        help="Evaluation split (default: val for voc and synthetic, validation for ade20k).",
    )
    group.add_argument(
        "--train_fraction",
        default=1.0,
        type=float,
        help="Fraction of the training images in the memory (a fixed subset drawn with --seed), "
        "e.g. 0.0078125 for 1/128. Report the mean over several seeds.",
    )
    group.add_argument("--synthetic_image_size", default=128, type=int, help="Side of synthetic images.")
    group.add_argument("--synthetic_num_train", default=5000, type=int, help="Synthetic training images.")
    group.add_argument("--synthetic_num_val", default=500, type=int, help="Synthetic validation images.")
    add_scene_args(group)
    group.add_argument(
        "--synthetic_seed",
        default=0,
        type=int,
        help="Seed of the synthetic scenes (0 = the scenes used for pretraining).",
    )

    group = parser.add_argument_group("protocol")
    group.add_argument(
        "--image_size",
        "--input_size",
        dest="input_size",
        default=None,
        type=int,
        help="Network input side, a multiple of --patch_size (default 512; the image size for "
        "synthetic). Memory crops and validation images are resized to it; mIoU is "
        "computed at this resolution.",
    )
    group.add_argument(
        "--memory_size",
        default=None,
        type=int,
        help="Memory entries M (10240000 in the literature). Each (image, pass) keeps "
        "M // (images x passes) patches chosen by the rarity rule. Default: every patch.",
    )
    group.add_argument(
        "--augmentation_epochs",
        default=2,
        type=int,
        help="Passes over the training images, each with a new random crop and jitter. Small "
        "--train_fraction with a large --memory_size needs more passes.",
    )
    group.add_argument("--num_neighbours", default=30, type=int, help="k nearest neighbours per query patch.")
    group.add_argument(
        "--temperature",
        default=0.02,
        type=float,
        help="beta of softmax(cos / beta) over the neighbours (0.02 as open-hummingbird-eval; "
        "DIP uses 0.07). Always reported.",
    )
    group.add_argument(
        "--memory_ignore",
        default="auto",
        choices=("auto", "background", "drop"),
        help="Ignore pixels (255) of the memory masks: background = count them as class 0 (the protocol, "
        "right for VOC where 0 is background); drop = leave them out of the patch labels (right for ADE20K's "
        "150 classes, where 0 is wall); auto = drop for ade20k, background otherwise.",
    )
    group.add_argument(
        "--index",
        default="torch",
        choices=INDEX_KINDS,
        help="torch: exact search with chunked matrix products + top-k on the evaluation device (GPU when "
        "there is one; default); exact: faiss IndexFlatIP (same neighbours, CPU); ivf: faiss IndexIVFFlat, "
        "approximate, for very large memories. The memory is sharded across processes for all three; faiss "
        "needs the optional extra (pip install faiss-cpu).",
    )
    group.add_argument("--nlist", default=None, type=int, help="IVF lists (default 4 sqrt(M)).")
    group.add_argument("--nprobe", default=32, type=int, help="IVF lists searched per query.")

    group = parser.add_argument_group("run")
    group.add_argument(
        "--batch_size_per_gpu",
        dest="batch_size",
        default=16,
        type=int,
        help="Images per forward pass, per process (GPU).",
    )
    group.add_argument("--num_workers", default=7, type=int, help="Data-loading workers per process.")
    group.add_argument(
        "--seed",
        default=0,
        type=int,
        help="Seed of the training subset, crops, jitter and memory sampling. Report it.",
    )
    group.add_argument(
        "--output_json",
        default=None,
        type=str,
        help="Result file (default <checkpoint dir>/eval_dense_nn.json).",
    )
    group.add_argument("--no_progress", action="store_true", help="Disable the progress bars.")
    group.add_argument("--local_rank", "--local-rank", default=0, type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and run the evaluation; returns the result dict."""
    parser = argparse.ArgumentParser("CrIBo dense NN retrieval evaluation", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    env = distributed.init_distributed()
    setup_logging(None, env.rank)
    try:
        return run_dense_nn(resolve_backbone_args(args))
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    try:
        main()
    except LOADING_ERRORS as error:  # the message names the file and the fix; no traceback
        sys.exit(f"eval_dense_nn.py: error: {error}")
