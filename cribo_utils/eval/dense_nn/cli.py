"""Flags of ``eval_dense_nn.py`` and their resolution: dataset from ``--data_path``, the named protocol, the
overrides, the result file (:mod:`cribo_utils.eval.cli` for the flags all evaluations share)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from cribo_utils.eval.cli import (
    DefaultsHelpFormatter,
    EvalConfigError,
    add_run_flags,
    resolve_seeds,
    result_path,
)
from cribo_utils.eval.dense_nn.config import DATASETS, INDEX_KINDS, MEMORY_DTYPES
from cribo_utils.eval.dense_nn.protocols import PROTOCOLS, apply_protocol, protocol_statement
from cribo_utils.runtime.flags import add_bool_flag
from cribo_utils.weights.checkpoint_formats import add_backbone_args
from data.synthetic import add_scene_args


def _protocol_epilog() -> str:
    statements = (textwrap.fill(protocol_statement(protocol), 100) for protocol in PROTOCOLS.values())
    return "protocols:\n" + "\n\n".join(statements)


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of ``eval_dense_nn.py``."""
    parser = argparse.ArgumentParser(
        "CrIBo dense NN retrieval evaluation",
        formatter_class=DefaultsHelpFormatter,
        epilog=_protocol_epilog(),
    )
    add_backbone_args(parser)

    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_type",
        "--dataset",
        dest="dataset",
        default=None,
        choices=DATASETS,
        help="Default: what --data_path holds (Pascal VOC 2012 or ADE20K), the built-in synthetic scenes "
        "without --data_path. Naming one that contradicts the folder is an error.",
    )
    group.add_argument(
        "--data_path",
        default=None,
        type=str,
        help="VOC: the VOC2012 folder (JPEGImages, SegmentationClass[Aug], ImageSets), its parent or the "
        "parent of VOCdevkit/; ADE20K: ADEChallengeData2016 or its parent. Default: none, the synthetic "
        "scenes.",
    )
    group.add_argument(
        "--train_split",
        default=None,
        type=str,
        help="Memory split. Default: trainaug for voc, training for ade20k, train for synthetic.",
    )
    group.add_argument(
        "--val_split",
        default=None,
        type=str,
        help="Evaluation split. Default: val for voc and synthetic, validation for ade20k.",
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

    group = parser.add_argument_group("protocol (every value below defaults to the protocol's)")
    group.add_argument(
        "--protocol",
        default=None,
        choices=tuple(PROTOCOLS),
        help="Named settings of the published numbers (listed at the end). Default: the dataset's. A flag "
        "below given explicitly overrides one value; the result then records the overrides and is named "
        "eval_dense_nn_<protocol>_custom.json.",
    )
    group.add_argument(
        "--image_size",
        "--input_size",
        dest="image_size",
        default=None,
        type=int,
        help="Network input side, a multiple of --patch_size; memory crops and validation images are "
        "resized to it and the mIoU is computed at this resolution.",
    )
    group.add_argument(
        "--memory_size",
        default=None,
        type=int,
        help="Memory entries M; each (image, pass) keeps M // (images x passes) patches chosen by the "
        "rarity rule. 0: every patch.",
    )
    group.add_argument(
        "--augmentation_epochs",
        default=None,
        type=int,
        help="Passes over the training images, each with a new random crop and jitter. A small "
        "--train_fraction with a large --memory_size needs more passes.",
    )
    group.add_argument(
        "--nb_knn",
        "--num_neighbours",
        dest="nb_knn",
        default=None,
        type=int,
        help="k nearest neighbours per query patch.",
    )
    group.add_argument(
        "--temperature",
        default=None,
        type=float,
        help="beta of softmax(cos / beta) over the neighbours (DIP uses 0.07). Always reported.",
    )
    group.add_argument(
        "--train_fraction",
        default=None,
        type=float,
        help="Fraction of the training images in the memory (a fixed subset drawn with --seed), e.g. "
        "0.0078125 for 1/128. Report the mean over several seeds.",
    )
    group.add_argument(
        "--memory_dtype",
        default=None,
        choices=tuple(MEMORY_DTYPES),
        help="Storage of the memory features: fp16 halves their RAM (similarities are still computed in "
        "fp32 from the rounded features; faiss indexes keep an fp32 copy).",
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
        "there is one); exact: faiss IndexFlatIP (same neighbours, CPU); ivf: faiss IndexIVFFlat, "
        "approximate, for very large memories on CPUs. The memory is sharded across processes for all "
        "three; faiss needs the optional extra (pip install faiss-cpu).",
    )
    group.add_argument("--nlist", default=None, type=int, help="IVF lists. Default: 4 sqrt(M).")
    group.add_argument("--nprobe", default=32, type=int, help="IVF lists searched per query.")

    run = add_run_flags(parser, 16, "eval_dense_nn_<protocol>.json")
    add_bool_flag(run, "--progress", True, "Show progress bars (rank 0).", false_aliases=("--no_progress",))
    return parser


def resolve_dense_args(args: argparse.Namespace) -> Path:
    """Decide the dataset, the protocol and its values and the result file, in place (before any work).

    Sets ``args.dataset``, ``args.protocol``, every :data:`PROTOCOL_FLAGS` value left unset and
    ``args.protocol_overrides`` (the explicit flags that differ from the protocol).

    Returns:
        The result file: ``--output_json``, or ``eval_dense_nn_<protocol>[_custom].json`` in
        ``--output_dir``.
    Raises:
        DatasetLayoutError: ``--dataset_type`` contradicts ``--data_path``, or the folder is no segmentation
            dataset (one line).
        EvalConfigError: ``--protocol`` is for another dataset than the one given.
    """
    from data.layouts import resolve_dataset

    resolve_seeds(args)
    args.dataset = resolve_dataset(args.dataset, args.data_path, DATASETS, "eval_dense_nn.py")
    protocol = PROTOCOLS[args.protocol or args.dataset]
    if protocol.dataset != args.dataset:
        where = (
            f"--data_path {args.data_path} holds" if args.data_path else "without --data_path the run uses"
        )
        raise EvalConfigError(
            f"--protocol {protocol.name} is defined on {protocol.dataset}, but {where} {args.dataset}; "
            f"use --protocol {args.dataset} or point --data_path at the {protocol.dataset} folder"
        )
    args.protocol = protocol.name
    args.protocol_overrides = apply_protocol(args, protocol)
    suffix = "_custom" if args.protocol_overrides else ""
    return result_path(args, f"eval_dense_nn_{protocol.name}{suffix}.json")


def protocol_record(args: Any) -> dict[str, Any]:
    """The protocol part of the result file: its name and the explicit overrides."""
    return {"protocol_name": args.protocol, "protocol_overrides": dict(args.protocol_overrides)}
