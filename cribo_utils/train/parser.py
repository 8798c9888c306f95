"""Command-line flags of `main_cribo.py`, released argument files and the synthetic CPU preset.

Flag names and defaults are those of the reference CrIBo parser, so the released argument files
(`checkpoints/*_args.json`) apply unchanged. Resolution order, lowest to highest priority:

1. the reference defaults (below);
2. a preset (``--preset``): :data:`SYNTHETIC_PRESET` by default only when the run names no dataset at all
   (no ``--dataset_type``, ``--data_path``, ``--imagenet1k_path`` or ``--coco_path``, neither on the
   command line nor in ``--config``), so that ``python main_cribo.py`` gets it and
   ``--dataset_type synthetic`` keeps the reference defaults; ``--preset synthetic_cpu|none`` decides;
3. a ``--config`` JSON file (released argument files or our own ``args.json``);
4. flags given explicitly on the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cribo_utils.method.loss import CENTERINGS, OBJECTIVES
from cribo_utils.runtime.flags import add_dist_url_flag, bool_argument
from data.synthetic import SYNTHETIC_VIEWS, VIEW_FLAGS, add_scene_args
from data.transforms import _check_range
from models.head import HEAD_BOTTLENECK_DIM, HEAD_HIDDEN_DIM, HEAD_NLAYERS

logger = logging.getLogger(__name__)

DATASET_TYPES = ("synthetic", "imagenet1k", "imagefolder", "coco")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# A small, CPU-friendly recipe for the built-in synthetic scenes (about 7 minutes on 2 CPU cores). What it
# learns, and the runs behind each choice, are in the README's Results and benchmarks/README.md. Compared
# with the reference recipe: a small head (out_dim 64) with a constant, very sharp teacher temperature
# (0.01: at 0.02 the image head fell to the uniform output once the views shared no colour), gradient
# clipping at 0.3, a two-epoch warm-up and a learning rate of 2e-3 per 256 images (5e-3 lowered dense
# retrieval); batches of 4, i.e. many small steps (3,072 for the 12,288 images of 6 epochs: over the same
# images, batches of 32 end below random init, 16 level with it, 8 and 4 above); mild photometric
# augmentation (hue 0.1, no grayscale, almost no blur: the textures are a few pixels wide); a strong
# positional term in the clustering (pos_alpha 4), so that objects are matched across views by where they
# are; and a second view drawn with new colours for every object and for the background, and with new
# texture periods, phases and orientations, so that the two views share nothing but each object's texture
# family, outline and place (with the background colour shared, the [CLS] and object tokens matched views
# by it and stayed colour-bound).
SYNTHETIC_PRESET: dict[str, Any] = {
    "arch": "vit_tiny",
    "patch_size": 16,
    "depth": 6,
    "image_size": 96,
    "out_dim": 64,
    "out_dim_c": 64,
    "norm_last_layer": False,
    "batch_size_per_gpu": 4,
    "epochs": 6,
    "warmup_epochs": 2,
    "lr": 0.002,
    "min_lr": 1e-5,
    "clip_grad": 0.3,
    "momentum_teacher": 0.99,
    "warmup_teacher_temp": 0.01,
    "teacher_temp": 0.01,
    "warmup_teacher_temp_c": 0.01,
    "teacher_temp_c": 0.01,
    "warmup_teacher_temp_epochs": 0,
    "hue_jitter": 0.1,
    "grayscale_p": 0.0,
    "blur_radius_max": 0.1,
    "n_tokens": 8,
    "pos_alpha": [4.0, 4.0],
    "queue_size": 1024,
    "drop_path_rate": 0.0,
    "use_fp16": False,
    # The scenes are rendered in the training process (about 8 ms per batch of 4): on 2 cores, two loader
    # workers competed with the step's threads and made every iteration 15 % slower (benchmarks/README.md).
    "num_workers": 0,
    "saveckp_freq": 3,
    "synthetic_num_train": 2048,
    "synthetic_recolour_views": True,
    "synthetic_recolour_background": True,
    "synthetic_retexture_views": True,
}

PRESETS: dict[str, dict[str, Any]] = {"none": {}, "synthetic_cpu": SYNTHETIC_PRESET}
# Flags that name a dataset: a run setting none of them (command line or --config) gets the synthetic preset.
DATASET_KEYS = ("dataset_type", "data_path", "imagenet1k_path", "coco_path")

# What is known of each released run beyond its argument file (global batch, world size, sources).
RELEASES_PATH = Path(__file__).resolve().parents[2] / "checkpoints" / "releases.json"

# Keys of the released argument files that launchers own or that only ever hold placeholders.
LAUNCHER_KEYS = frozenset({"dist_url", "local_rank"})
# Keys of the reference's argument files that no code of the reference (or ours) reads: accepted in a
# --config file and dropped, but no flags (the image-level student temperature is 0.1 in the reference's
# loss whatever `student_temp` says; retrieval is always cosine, whatever `normalized_matching` says).
REFERENCE_ONLY_KEYS = frozenset(
    {
        "resnet_dilate",
        "student_temp",
        "same_teacher_augmentations",
        "normalized_matching",
        "which_features",
        "untar_path",
        "image_queries",
        "labels_path",
        "synthetic_num_val",  # written by earlier versions of this code; training never reads the val split
    }
)
# Keys that earlier versions wrote to args.json although they are no flags (derived, dropped on load).
LEGACY_DERIVED_KEYS = frozenset({"used_synthetic_preset"})
PATH_KEYS = frozenset({"output_dir", "data_path", "imagenet1k_path", "coco_path"})
PLACEHOLDER_VALUES = (".", "", ["."])


def get_args_parser() -> argparse.ArgumentParser:
    """Return the training parser (``add_help=False`` so other scripts can reuse it as a parent)."""
    parser = argparse.ArgumentParser("CrIBo", add_help=False)

    group = parser.add_argument_group("Model")
    group.add_argument(
        "--arch",
        default="vit_small",
        type=str,
        help="vit_tiny, vit_small or vit_base. vit_tiny/vit_small for quick experiments.",
    )
    group.add_argument(
        "--patch_size",
        default=16,
        type=int,
        help="Patch size in pixels (8 or 16). Smaller patches cost quadratically more.",
    )
    group.add_argument(
        "--depth",
        default=None,
        type=int,
        help="Override the number of transformer blocks of --arch (default: the arch's 12).",
    )
    group.add_argument(
        "--image_size",
        "--input_size",
        default=224,
        type=int,
        help="Side of the two global crops in pixels; must be divisible by --patch_size.",
    )
    group.add_argument("--out_dim", default=65536, type=int, help="Output dimension of the [CLS] head.")
    group.add_argument("--out_dim_c", default=65536, type=int, help="Output dimension of the object head.")
    group.add_argument(
        "--head_hidden_dim",
        default=HEAD_HIDDEN_DIM,
        type=int,
        help="Width of the head's two hidden layers (2048 in DINO and every released CrIBo run).",
    )
    group.add_argument(
        "--head_nlayers",
        default=HEAD_NLAYERS,
        type=int,
        help="Linear layers of the head's trunk, the bottleneck's included (3 in DINO and every released "
        "CrIBo run; 1: one Linear from the backbone to the bottleneck).",
    )
    group.add_argument(
        "--head_bottleneck_dim",
        default=HEAD_BOTTLENECK_DIM,
        type=int,
        help="Width of the head's L2-normalised bottleneck (256 in DINO and every released CrIBo run).",
    )
    group.add_argument(
        "--norm_last_layer",
        **bool_argument(False),
        help="Freeze the weight-norm magnitude of the last layers (True is more stable; "
        "the released ViT-S runs use False, ViT-B True).",
    )
    group.add_argument(
        "--momentum_teacher",
        default=0.996,
        type=float,
        help="Base EMA momentum, raised to 1 with a cosine schedule. Use a lower value "
        "(0.99) for short runs with small batches.",
    )
    group.add_argument("--use_bn_in_head", **bool_argument(False), help="Batch norm in the head.")

    group = parser.add_argument_group("Temperatures")
    group.add_argument(
        "--warmup_teacher_temp",
        default=0.04,
        type=float,
        help="Initial teacher temperature of the image-level loss.",
    )
    group.add_argument(
        "--teacher_temp",
        default=0.07,
        type=float,
        help="Final teacher temperature of the image-level loss (above 0.07 is unstable).",
    )
    group.add_argument(
        "--warmup_teacher_temp_epochs",
        default=30,
        type=int,
        help="Epochs of linear teacher-temperature warm-up (both losses).",
    )
    group.add_argument(
        "--warmup_teacher_temp_c",
        default=0.04,
        type=float,
        help="Initial teacher temperature of the object-level losses.",
    )
    group.add_argument(
        "--teacher_temp_c",
        default=0.07,
        type=float,
        help="Final teacher temperature of the object-level losses.",
    )
    group.add_argument(
        "--student_temp_c", default=0.1, type=float, help="Student temperature of the object-level losses."
    )
    group.add_argument(
        "--centering_c",
        default="mean",
        choices=CENTERINGS,
        help="Centring of the object-level teacher targets: mean (DINO's running centre, the reference) or "
        "sinkhorn (Sinkhorn-Knopp over each step's objects, as DINOv2 centres its teacher: every prototype "
        "gets the same share of the step's objects).",
    )

    group = parser.add_argument_group("Optimisation")
    group.add_argument(
        "--use_fp16",
        **bool_argument(True),
        help="Mixed precision on GPU (fp16 with a grad scaler). Ignored on CPU; see --precision for bf16.",
    )
    group.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: fp16 on GPU if --use_fp16 else fp32, fp32 on CPU. bf16 autocast works "
        "on CPU and GPU; losses, centring and retrieval always stay fp32.",
    )
    group.add_argument("--weight_decay", default=0.04, type=float, help="Initial weight decay.")
    group.add_argument("--weight_decay_end", default=0.4, type=float, help="Final weight decay (cosine).")
    group.add_argument(
        "--clip_grad",
        default=0.0,
        type=float,
        help="Per-tensor gradient norm clip (0 disables). 0.3-1.0 helps larger ViTs.",
    )
    group.add_argument("--batch_size_per_gpu", default=128, type=int, help="Images per process.")
    group.add_argument(
        "--batch_size",
        default=0,
        type=int,
        help="Global batch over all processes (0: use --batch_size_per_gpu). When given it "
        "must be divisible by the number of processes and sets --batch_size_per_gpu.",
    )
    group.add_argument("--epochs", default=300, type=int, help="Number of training epochs.")
    group.add_argument(
        "--freeze_last_layer",
        default=1,
        type=int,
        help="Epochs during which both last layers of the head are not updated.",
    )
    group.add_argument(
        "--lr",
        default=0.0005,
        type=float,
        help="Peak learning rate for a global batch of 256; scaled linearly with the batch.",
    )
    group.add_argument("--warmup_epochs", default=10, type=int, help="Epochs of linear lr warm-up.")
    group.add_argument("--min_lr", default=1e-5, type=float, help="Final learning rate (cosine decay).")
    group.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="adamw for ViTs.")
    group.add_argument("--drop_path_rate", default=0.1, type=float, help="Stochastic depth of the student.")
    group.add_argument(
        "--grad_checkpointing",
        **bool_argument(False),
        help="Recompute the student's ViT blocks in backward instead of storing their activations: "
        "about 40%% less peak memory for about 30%% more time per step (README, Benchmarks).",
    )
    group.add_argument(
        "--compile",
        **bool_argument(False),
        help="torch.compile the two backbones' forward passes and the clustering rounds (the same "
        "training up to float round-off; the first steps compile, which takes minutes on a CPU).",
    )

    group = parser.add_argument_group("Crops")
    group.add_argument(
        "--global_crops_scale",
        default=(0.25, 1.0),
        type=float,
        nargs="+",
        help="Area range of the two global crops.",
    )
    group.add_argument(
        "--local_crops_number",
        default=0,
        type=int,
        help="Small crops per image that only the student sees and that enter only the image-level [CLS] "
        "loss, each against both global teacher views (DINO's multi-crop; 0 in every released CrIBo run).",
    )
    group.add_argument(
        "--local_crops_scale",
        default=(0.05, 0.4),
        type=float,
        nargs="+",
        help="Area range of the local crops (as in the released argument files).",
    )
    group.add_argument(
        "--local_crops_size",
        default=96,
        type=int,
        help="Side of the local crops in pixels (a multiple of --patch_size).",
    )
    group.add_argument(
        "--hue_jitter",
        default=0.1,
        type=float,
        help="Hue range of the colour jitter (DINO: 0.1). Larger values (up to 0.5) stop the "
        "network from matching objects by colour.",
    )
    group.add_argument("--grayscale_p", default=0.2, type=float, help="Probability of a grayscale view.")
    group.add_argument(
        "--blur_radius_max",
        default=None,
        type=float,
        help="Largest Gaussian-blur radius (default 2.0 * image_size / 224: DINO's 2.0 at 224 px, "
        "proportionally less on smaller crops so textures survive).",
    )
    group.add_argument(
        "--augment_on",
        default="device",
        choices=("workers", "device"),
        help="Where the photometric augmentation (colour jitter, grayscale, blur, solarisation, "
        "normalisation) runs. device (default): batched on the training device after the copy; the "
        "workers only decode, crop and flip, and send uint8 views (2.6x more images/s per worker at "
        "224 px, README Benchmarks). workers: the reference's PIL pipeline in the workers, float32 views.",
    )

    group = parser.add_argument_group("CrIBo")
    group.add_argument(
        "--objective",
        default="cribo",
        choices=tuple(OBJECTIVES),
        help="Loss terms: cribo (image + cross-view object + cross-image NN), cross_view (image + cross-view "
        "object, no memory bank: CrOC-like) or image (the image-level loss alone: DINO). The ablations of "
        "the README's Results.",
    )
    group.add_argument("--n_tokens", default=32, type=int, help="Object clusters per image (K).")
    group.add_argument(
        "--pos_alpha",
        default=(1.0, 1.0),
        type=float,
        nargs="+",
        help="Positional cost weight, scheduled from the second value to the first.",
    )
    group.add_argument(
        "--queue_size",
        default=25000,
        type=int,
        help="Memory bank size in images; must hold at least one global batch. The NN loss starts once it "
        "is full (the start-up log gives the iteration), so the run must push more images than this.",
    )
    group.add_argument("--n_iter", default=5, type=int, help="Clustering iterations.")
    group.add_argument(
        "--update_c",
        **bool_argument(True),
        help="Update the Sinkhorn column marginal to the current cluster sizes.",
    )
    group.add_argument("--sinkhorn_lambda", default=20.0, type=float, help="Sinkhorn entropic weight.")
    group.add_argument("--sinkhorn_iterations", default=5, type=int, help="Sinkhorn iterations.")
    group.add_argument(
        "--cost_normalization",
        default="image",
        choices=["image", "batch"],
        help="Min-max scale the clustering cost per image (default, independent of the "
        "per-GPU batch) or over the whole per-GPU batch (the reference's behaviour).",
    )
    group.add_argument(
        "--retrieval_chunk_size",
        default=65536,
        type=int,
        help="Bank objects compared per chunk during nearest-neighbour retrieval.",
    )

    group = parser.add_argument_group("Data")
    group.add_argument(
        "--dataset_type",
        "--dataset",
        default=None,
        choices=DATASET_TYPES,
        help="Default: synthetic when no path is given, else imagenet1k / coco from the path.",
    )
    group.add_argument(
        "--data_path",
        default="",
        type=str,
        help="Dataset root: ImageNet (train/ or ILSVRC2012_img_train/), an image folder, "
        "or COCO images (with --dataset_type coco).",
    )
    group.add_argument("--imagenet1k_path", default="", type=str, help="Alias of --data_path for ImageNet.")
    group.add_argument("--coco_path", default="", type=str, help="Alias of --data_path for COCO images.")
    group.add_argument("--synthetic_num_train", default=5000, type=int, help="Synthetic training images.")
    group.add_argument("--synthetic_image_size", default=128, type=int, help="Side of synthetic images.")
    add_scene_args(group)
    group.add_argument(
        "--synthetic_views",
        default=None,
        choices=tuple(SYNTHETIC_VIEWS),
        help="Synthetic scenes: how the two views of a scene are rendered, as one name for the three flags "
        "below. realistic: both views cut from one rendering, differing only by the crop and the colour "
        "jitter, as crops of one photograph do (all three false); redrawn: the second view with new object "
        "and background colours and new texture periods, phases and orientations (all three true, the "
        "preset). Default: the three flags decide.",
    )
    group.add_argument(
        "--synthetic_recolour_views",
        **bool_argument(False),
        help="Synthetic scenes: cut the second global view from a rendering of the scene with new object "
        "colours (same layout, textures, background and noise), so the two views of an object cannot be "
        "matched by their colours.",
    )
    group.add_argument(
        "--synthetic_recolour_background",
        **bool_argument(False),
        help="With --synthetic_recolour_views: redraw the background's colours in that rendering too, so "
        "the two views of a scene cannot be matched by the colour of their background either.",
    )
    group.add_argument(
        "--synthetic_retexture_views",
        **bool_argument(False),
        help="With --synthetic_recolour_views: redraw each object's texture period, phase and orientation "
        "in that rendering too (the texture family, which is the class, stays), so the two views of an "
        "object cannot be matched by the details of its pattern either.",
    )
    group.add_argument(
        "--skip_bad_files",
        **bool_argument(True),
        help="Skip unreadable images with a warning (false: stop at the first one).",
    )
    group.add_argument("--num_workers", default=7, type=int, help="Data-loading workers per process.")

    group = parser.add_argument_group("Run")
    group.add_argument(
        "--config",
        default="",
        type=str,
        help="JSON argument file (e.g. checkpoints/vits16-in_args.json) used as defaults; "
        "flags given on the command line override it.",
    )
    group.add_argument(
        "--preset",
        default=None,
        choices=tuple(PRESETS),
        help="Defaults applied under --config and explicit flags. synthetic_cpu: the CPU recipe for the "
        "synthetic scenes (listed below); none: the reference defaults. Default: synthetic_cpu when the run "
        "names no dataset (no --dataset_type, --data_path, --imagenet1k_path or --coco_path, neither here "
        "nor in --config), else none. The start-up log lists every value the preset changed.",
    )
    group.add_argument("--output_dir", default="output", type=str, help="Where checkpoints and logs go.")
    group.add_argument(
        "--saveckp_freq",
        default=50,
        type=int,
        help="Also keep checkpoint{epoch:04}.pth every this many epochs.",
    )
    group.add_argument(
        "--saveckp_freq_iters",
        default=0,
        type=int,
        help="Write checkpoint.pth every this many iterations (0: once per epoch).",
    )
    group.add_argument(
        "--start_checkpoint_path",
        default="",
        type=str,
        help="Seed a fresh run (empty output_dir) from this full checkpoint.",
    )
    group.add_argument(
        "--init_backbone",
        default="",
        type=str,
        help="Start a fresh run with the student's and the teacher's backbones loaded from this checkpoint "
        "(a file, released name or URL, any layout --pretrained_weights of the evaluations reads: e.g. "
        "dino_vits16, or a backbone.pth); heads, centres, bank and optimiser start fresh. On resume the "
        "run's own checkpoint is loaded instead. Not with --start_checkpoint_path.",
    )
    group.add_argument("--seed", default=0, type=int, help="Random seed (the rank is added per process).")
    group.add_argument(
        "--max_iters",
        default=0,
        type=int,
        help="Stop after this many iterations in total (0: train all epochs).",
    )
    group.add_argument("--log_freq", default=10, type=int, help="Iterations between log lines.")
    group.add_argument("--tensorboard", **bool_argument(False), help="Also log to TensorBoard.")
    group.add_argument(
        "--dist_timeout",
        default=1800,
        type=float,
        help="Seconds a collective may wait for the other processes before the run stops with "
        "an error naming the lost rank(s) (bounds the hang when a process dies).",
    )
    group.add_argument(
        "--check_memory",
        **bool_argument(True),
        help="Refuse to start when the estimated memory (bank, networks, optimiser, "
        "activations) exceeds what is free; false starts anyway.",
    )
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="Compute device.")
    add_dist_url_flag(group)
    group.add_argument(
        "--local_rank",
        "--local-rank",
        default=0,
        type=int,
        help="Ignored: the local rank comes from the environment.",
    )
    return parser


def _explicit_keys(argv: Sequence[str]) -> dict[str, Any]:
    """Values of the flags actually present in ``argv`` (a fresh parser whose defaults are suppressed)."""
    probe = get_args_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = probe.parse_known_args(list(argv))
    return vars(namespace)


def load_config(path: str, valid_keys: set[str]) -> dict[str, Any]:
    """Read a JSON argument file; unknown keys are an error, placeholders and launcher keys are dropped."""
    if not os.path.isfile(path):
        raise SystemExit(f"--config {path}: file not found")
    try:
        with open(path) as handle:
            values = json.load(handle)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--config {path}: not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a JSON object of flag names to values")
    ignored = LEGACY_DERIVED_KEYS | REFERENCE_ONLY_KEYS | LAUNCHER_KEYS
    unknown = sorted(set(values) - valid_keys - ignored)
    if unknown:
        raise SystemExit(
            f"--config {path}: unknown key(s) {', '.join(unknown)}; "
            "remove them or check the flag names with --help"
        )
    kept = {}
    for key, value in values.items():
        if key == "config" or key in ignored:
            continue
        if key in PATH_KEYS and value in PLACEHOLDER_VALUES:
            continue
        kept[key] = value
    return kept


def _infer_dataset_type(values: dict[str, Any]) -> str:
    if values.get("dataset_type"):
        return values["dataset_type"]
    if values.get("coco_path"):
        return "coco"
    if values.get("data_path") or values.get("imagenet1k_path"):
        return "imagenet1k"
    return "synthetic"


def _default_preset(named: dict[str, Any]) -> str:
    """``synthetic_cpu`` when ``named`` (--config values and explicit flags) names no dataset, else none."""
    return "none" if any(named.get(key) for key in DATASET_KEYS) else "synthetic_cpu"


def resolve_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` into the final arguments (see the module docstring for the priority order).

    Raises:
        ConfigError: an unknown ``preset`` in ``--config``, or ``--preset synthetic_cpu`` with a dataset other
            than the synthetic scenes.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    base_parser = get_args_parser()
    parser = argparse.ArgumentParser(
        "CrIBo",
        parents=[base_parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="--preset synthetic_cpu (the default when no dataset is named; explicit flags and --config "
        "override it): " + ", ".join(f"{key}={value}" for key, value in SYNTHETIC_PRESET.items()),
    )
    values = vars(parser.parse_args(argv))
    explicit = _explicit_keys(argv)
    config: dict[str, Any] = {}
    if values["config"]:
        config = load_config(values["config"], set(values))

    named = dict(config)
    named.update(explicit)
    dataset_type = _infer_dataset_type(named)
    preset = named.get("preset") or _default_preset(named)
    if preset not in PRESETS:  # a --config value (argparse checks the command line's)
        raise ConfigError(f"--preset {preset}: unknown preset; choose one of {', '.join(PRESETS)}")
    if preset == "synthetic_cpu" and dataset_type != "synthetic":
        raise ConfigError(
            f"--preset synthetic_cpu is the recipe for the built-in synthetic scenes, not --dataset_type "
            f"{dataset_type}; drop --preset (or use --preset none)"
        )
    values.update(PRESETS[preset])
    values.update(config)
    values.update(explicit)
    _apply_named_views(values, {**config, **explicit})
    values["preset"] = preset
    values["dataset_type"] = dataset_type
    values["data_path"] = values["data_path"] or values["imagenet1k_path"] or values["coco_path"]
    values["global_crops_scale"] = tuple(values["global_crops_scale"])
    values["local_crops_scale"] = tuple(values["local_crops_scale"])
    values["pos_alpha"] = tuple(values["pos_alpha"])
    if values.get("init_backbone") and values.get("start_checkpoint_path"):
        raise ConfigError(
            "--init_backbone loads a backbone into a fresh run, --start_checkpoint_path a whole training "
            "state: give one of them"
        )
    return argparse.Namespace(**values)


def _apply_named_views(values: dict[str, Any], named: dict[str, Any]) -> None:
    """``--synthetic_views NAME`` sets the three rendering flags; one that the user set otherwise is an error.

    Raises:
        ConfigError: a rendering flag given (command line or ``--config``) with a value that contradicts the
            named setting.
    """
    name = values.get("synthetic_views")
    if name is None:
        return
    for key, value in SYNTHETIC_VIEWS[name].items():
        flag = VIEW_FLAGS[key]
        if flag in named and bool(named[flag]) != value:
            raise ConfigError(
                f"--synthetic_views {name} sets --{flag} {str(value).lower()}, but --{flag} "
                f"{str(named[flag]).lower()} was given too; drop one of them"
            )
        values[flag] = value


def _comparable(value: Any) -> Any:
    """Tuples as lists, so that a parsed ``(4.0, 4.0)`` equals the preset's ``[4.0, 4.0]``."""
    return list(value) if isinstance(value, tuple) else value


def preset_changes(args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """Values that ``args.preset`` changed: ``{flag: (reference default, value used)}``.

    A preset key counts when the run uses the preset's value and that value is not the reference default
    (keys that --config or an explicit flag set to something else are the user's, not the preset's).
    """
    defaults = get_args_parser()
    changes = {}
    for key, value in PRESETS[args.preset].items():
        default = defaults.get_default(key)
        if _comparable(getattr(args, key)) == _comparable(value) != _comparable(default):
            changes[key] = (default, value)
    return changes


def describe_preset(args: argparse.Namespace) -> str | None:
    """The start-up line about the preset (``None`` for a real dataset with the reference defaults)."""
    if args.preset == "none":
        if args.dataset_type != "synthetic":
            return None
        return (
            "preset none: the synthetic scenes with the reference defaults (--preset synthetic_cpu "
            "applies the CPU recipe)"
        )
    changes = preset_changes(args)
    listed = ", ".join(
        f"{key} {_comparable(default)} -> {value}" for key, (default, value) in changes.items()
    )
    return (
        f"preset {args.preset} (the default when no dataset is named; --preset none turns it off) changed "
        f"{len(changes)} value(s) from the reference defaults: {listed or 'none'}"
    )


def released_run(config_path: str) -> dict[str, Any] | None:
    """What :data:`RELEASES_PATH` records of the released run whose argument file is ``config_path``.

    Matched by file name (``vits16-in_args.json``), so a copy of a released file elsewhere is recognised.
    Returns ``None`` for any other file (or when the record is not there, as in a wheel install).
    """
    if not config_path or not RELEASES_PATH.is_file():
        return None
    with open(RELEASES_PATH) as handle:
        releases = json.load(handle)
    return releases.get(os.path.basename(config_path))


def release_batch_note(args: argparse.Namespace, world_size: int) -> str | None:
    """One line when a released ``--config`` runs on another world size than the release (else ``None``).

    The peak learning rate is ``lr * global_batch / 256`` (linear scaling, as in the reference) and the
    bank turns over every ``queue_size / global_batch`` steps, so a smaller global batch is not the
    released run. Call after :func:`resolve_batch_size` (``batch_size_per_gpu`` is final).
    """
    release = released_run(args.config)
    if release is None:
        return None
    name = os.path.basename(args.config)
    global_batch = args.batch_size_per_gpu * world_size
    peak_lr = args.lr * global_batch / 256
    released_world = release.get("world_size")
    released_batch = release.get("global_batch")
    if released_world == world_size and released_batch in (None, global_batch):
        return None
    this_run = (
        f"this run: {world_size} process(es) x {args.batch_size_per_gpu} = global batch {global_batch}, "
        f"peak lr {peak_lr:.2e} (--lr {args.lr:g} x {global_batch} / 256)"
    )
    if released_batch is None or released_world is None:
        return (
            f"--config {name}: the release's world size and global batch are unknown "
            f"({release.get('source', RELEASES_PATH.name)}); {this_run}"
        )
    released_per_gpu = released_batch // released_world
    released = f"released run: {released_world} x {released_per_gpu} = global batch {released_batch}"
    with open(args.config) as handle:
        released_lr = json.load(handle).get("lr", args.lr)
    if global_batch == released_batch:
        return f"--config {name}: {released}; {this_run}: the same global batch, lr scaling and bank turnover"
    turnover = "more slowly" if global_batch < released_batch else "faster"
    return (
        f"--config {name}: {released}, peak lr {released_lr * released_batch / 256:.2e}; {this_run}, and the "
        f"bank turns over {released_batch / global_batch:.3g}x {turnover}; to match the release, run "
        f"{released_world} processes (torchrun or srun) with --batch_size_per_gpu {released_per_gpu}, or set "
        f"--batch_size {released_batch} (the global batch, split over the processes you have)"
    )


class ConfigError(SystemExit):
    """A configuration that cannot work; raised before any model is built, with a one-line message."""


def resolve_batch_size(args: argparse.Namespace, world_size: int) -> None:
    """Apply the global ``--batch_size`` (when given): ``batch_size_per_gpu = batch_size / world_size``.

    Raises:
        ConfigError: the global batch does not divide evenly across the ``world_size`` processes.
    """
    if not args.batch_size:
        return
    if args.batch_size < 0:
        raise ConfigError(f"--batch_size {args.batch_size}: must be positive (0: use --batch_size_per_gpu)")
    if args.batch_size % world_size:
        lower = max(world_size, args.batch_size // world_size * world_size)
        raise ConfigError(
            f"--batch_size {args.batch_size} does not divide across {world_size} processes; "
            f"use a multiple of {world_size} (e.g. {lower} or {lower + world_size}) or "
            "--batch_size_per_gpu"
        )
    if args.batch_size_per_gpu != args.batch_size // world_size:
        logger.info(
            "--batch_size %d over %d processes: batch_size_per_gpu %d (was %d)",
            args.batch_size,
            world_size,
            args.batch_size // world_size,
            args.batch_size_per_gpu,
        )
    args.batch_size_per_gpu = args.batch_size // world_size


def check_output_dir(output_dir: str) -> None:
    """Create ``--output_dir`` and prove a file can be written there, before anything is built.

    Raises:
        ConfigError: one line naming the folder, the reason and the flag to change.
    """
    probe = Path(output_dir) / f".write_test.{os.getpid()}"
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"--output_dir {output_dir}: cannot write there ({error.strerror or error}); choose a writable "
            "--output_dir"
        ) from None


def check_area_range(flag: str, values: Sequence[float]) -> None:
    """One-line ConfigError unless ``values`` is two area fractions ``0 < low <= high <= 1``.

    The rule is the crop transforms' own (:func:`data.transforms._check_range` with ``upper=1``), checked here
    so that a bad flag stops the run before anything is built, with the flag's own spelling in the message.
    """
    try:
        _check_range(flag, values, upper=1.0)
    except ValueError:
        raise ConfigError(
            f"{flag} {' '.join(map(str, values))}: expected two values 0 < low <= high <= 1"
        ) from None


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Reject impossible configurations before anything is built (each message names the flag and the fix).

    Also resolves the global ``--batch_size`` into ``batch_size_per_gpu`` (:func:`resolve_batch_size`).
    """
    from models import ARCHS

    resolve_batch_size(args, world_size)
    if args.arch not in ARCHS:
        raise ConfigError(f"--arch {args.arch}: unknown architecture; choose one of {', '.join(ARCHS)}")
    if args.patch_size <= 0 or args.image_size % args.patch_size:
        raise ConfigError(
            f"--image_size {args.image_size} is not divisible by --patch_size {args.patch_size}; "
            f"use a multiple such as {max(1, args.image_size // max(args.patch_size, 1)) * args.patch_size}"
        )
    patches = (args.image_size // args.patch_size) ** 2
    if not 1 <= args.n_tokens <= patches:
        raise ConfigError(
            f"--n_tokens {args.n_tokens}: needs 1 <= n_tokens <= {patches} patches per view "
            f"({args.image_size}px / patch {args.patch_size})"
        )
    if args.batch_size_per_gpu < 1:
        raise ConfigError(f"--batch_size_per_gpu {args.batch_size_per_gpu}: must be at least 1")
    for flag in ("out_dim", "out_dim_c", "head_hidden_dim", "head_nlayers", "head_bottleneck_dim"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    global_batch = args.batch_size_per_gpu * world_size
    if args.queue_size < global_batch:
        raise ConfigError(
            f"--queue_size {args.queue_size} is smaller than one global batch ({global_batch} = "
            f"{args.batch_size_per_gpu} x {world_size} processes); raise --queue_size"
        )
    if len(args.pos_alpha) != 2:
        raise ConfigError(f"--pos_alpha {args.pos_alpha}: expected two values (end, start)")
    check_area_range("--global_crops_scale", args.global_crops_scale)
    if args.local_crops_number < 0:
        raise ConfigError(f"--local_crops_number {args.local_crops_number}: must be 0 or more")
    if args.local_crops_number:
        check_area_range("--local_crops_scale", args.local_crops_scale)
        if args.local_crops_size <= 0 or args.local_crops_size % args.patch_size:
            raise ConfigError(
                f"--local_crops_size {args.local_crops_size} is not a positive multiple of --patch_size "
                f"{args.patch_size}"
            )
    if args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs}: must be at least 1")
    if args.dist_timeout <= 0:
        raise ConfigError(f"--dist_timeout {args.dist_timeout}: must be a positive number of seconds")
    if args.dataset_type != "synthetic" and not args.data_path:
        raise ConfigError(f"--dataset_type {args.dataset_type} needs --data_path (the dataset root)")
    for flag, what in (
        ("synthetic_recolour_background", "the background is"),
        ("synthetic_retexture_views", "the textures are"),
    ):
        if getattr(args, flag) and not args.synthetic_recolour_views:
            raise ConfigError(
                f"--{flag} true needs --synthetic_recolour_views true ({what} redrawn in the re-coloured "
                "rendering of the second view)"
            )
    if args.synthetic_recolour_views and args.dataset_type != "synthetic":
        raise ConfigError(
            f"--synthetic_recolour_views true: only the built-in synthetic scenes can be re-coloured, not "
            f"--dataset_type {args.dataset_type}; drop the flag"
        )
