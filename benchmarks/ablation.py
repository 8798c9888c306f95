"""The paper's ablation with its mechanism: DINO, CrOC-like and CrIBo at the same budget, per view regime.

For every view regime (``--views``: how the two views of a synthetic scene are rendered) and objective
(``--objectives``: ``image`` = DINO's loss alone, ``cross_view`` = plus the cross-view object loss, CrOC-like,
``cribo`` = plus the cross-image term), this trains the default run (``python main_cribo.py``) with each
training seed (``--seeds``; the seed also draws the training scenes), then scores every teacher:

- dense-NN mIoU (0-100) on the README's protocol scenes: memory of 32,000 patches from 1,000 scenes, 300
  queries at 128 px, k = 30, mean over three memory draws (``benchmarks/learning_signal.py``'s protocol);
- the mechanism table of ``benchmarks/mechanism.py`` (clusters against instances and tiles, cross-image
  neighbours against classes) at the run's batch size.

Rows give the mean and half-range over the seeds. Runs already finished in ``--root`` are scored without
retraining (a rerun resumes an interrupted one), so the command can be stopped and started again.

    python benchmarks/ablation.py --views redrawn realistic --objectives image cross_view cribo --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import mechanism  # noqa: E402
from benchmarks.harness import format_table, machine_info, write_json  # noqa: E402
from benchmarks.learning_signal import PROTOCOL_SEED  # noqa: E402
from cribo_utils.eval.dense_nn import DenseNNConfig, evaluate_dense_nn  # noqa: E402
from cribo_utils.weights.checkpoint_formats import (  # noqa: E402
    build_pretrained_backbone,
    load_checkpoint_file,
    stored_training_args,
)
from data.synthetic import SYNTHETIC_VIEWS, SyntheticSegmentation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OBJECTIVE_NAMES = {"image": "DINO", "cross_view": "CrOC-like", "cribo": "CrIBo"}
MEMORY_DRAWS = (0, 1, 2)
MECHANISM_KEYS = ("ari_instances", "ari_tiles", "purity", "objects_per_image", "same_instance")
NEIGHBOUR_KEYS = ("acceptance_foreground", "precision_foreground", "precision_foreground_before_check")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "ablation: DINO / CrOC-like / CrIBo per view regime, with the mechanism",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--views", nargs="+", default=["redrawn", "realistic"], choices=tuple(SYNTHETIC_VIEWS)
    )
    parser.add_argument(
        "--objectives", nargs="+", default=list(OBJECTIVE_NAMES), choices=tuple(OBJECTIVE_NAMES)
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Training seeds.")
    parser.add_argument("--root", default="output/ablation", help="Runs go to ROOT/VIEWS/OBJECTIVE/seedS.")
    parser.add_argument(
        "--train_flags", default="", help="Extra flags for every training run (one string), after the row's."
    )
    parser.add_argument(
        "--synthetic_seed",
        default=PROTOCOL_SEED,
        type=int,
        help="Scenes the teachers are scored on (the README protocol's; tune with another one).",
    )
    parser.add_argument("--num_bank", default=1024, type=int, help="Mechanism: scenes in the memory bank.")
    parser.add_argument("--num_queries", default=256, type=int, help="Mechanism: query scenes.")
    parser.add_argument("--skip_training", action="store_true", help="Score the finished runs only.")
    parser.add_argument("--out", default="benchmarks/results/ablation.json")
    return parser


def run_dir(root: str | Path, views: str, objective: str, seed: int) -> Path:
    return Path(root) / views / objective / f"seed{seed}"


def train(directory: Path, views: str, objective: str, seed: int, extra: list[str]) -> float:
    """Train (or resume) one run with ``python main_cribo.py``; returns the wall seconds it took."""
    command = [
        sys.executable,
        "main_cribo.py",
        "--synthetic_views",
        views,
        "--objective",
        objective,
        "--seed",
        str(seed),
        "--output_dir",
        str(directory),
        "--log_freq",
        "100",
        *extra,
    ]
    began = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def dense_score(
    backbone: torch.nn.Module, scene_seed: int, object_colours: str = "random", level: str = "easy"
) -> float:
    """Dense-NN mIoU (0-100), the README protocol (``learning_signal.py``), mean over three memory draws,
    on scenes of the run's colour mode and level (the protocol's are random colours, easy)."""
    splits = {
        "num_train": 5000,
        "num_val": 300,
        "seed": scene_seed,
        "level": level,
        "object_colours": object_colours,
        "image_size": 128,
    }
    train = SyntheticSegmentation("train", **splits)
    val = SyntheticSegmentation("val", **splits)
    scores = []
    for draw in MEMORY_DRAWS:  # each draw: its own 1,000-scene subset, crops and patch sample (seed)
        config = DenseNNConfig(
            input_size=128,
            memory_size=32_000,
            augmentation_epochs=1,
            train_fraction=0.2,
            batch_size=32,
            num_workers=0,
            seed=draw,
        )
        config.progress = False
        with torch.no_grad():
            scores.append(100 * evaluate_dense_nn(backbone, train, val, config)["miou"])
    return statistics.mean(scores)


def score(
    path: Path, args: argparse.Namespace, cache: dict[Any, Any], dense_miou: float | None = None
) -> dict[str, Any]:
    """Dense NN and the mechanism of one finished run's teacher (``dense_miou``: a dense score of this
    checkpoint on this protocol already measured, kept instead of measured again)."""
    checkpoint = load_checkpoint_file(path)
    stored = stored_training_args(checkpoint, path)
    settings = mechanism.run_settings(mechanism.get_args_parser().parse_args([]), stored)
    backbone = build_pretrained_backbone(settings.arch, settings.patch_size, path)
    mechanism_args = mechanism.get_args_parser().parse_args(
        [
            "--num_bank",
            str(args.num_bank),
            "--num_queries",
            str(args.num_queries),
            "--synthetic_seed",
            str(args.synthetic_seed),
            "--batch_sizes",
            str(settings.batch_size_per_gpu),
        ]
    )
    result = mechanism.measure(backbone, settings, mechanism_args, cache, checkpoint=checkpoint)
    if dense_miou is None:
        dense_miou = dense_score(
            backbone, args.synthetic_seed, settings.synthetic_object_colours, settings.synthetic_level
        )
    result["dense_miou"] = dense_miou
    return result


def cached_score(path: Path, args: argparse.Namespace, cache: dict[Any, Any]) -> dict[str, Any]:
    """:func:`score`, kept next to the checkpoint (``ablation_score.json``) with the protocol it used and the
    checkpoint's modification time and the mechanism's scoring version, so a rerun rescores only what
    changed (when only the scoring version changed, the stored dense score, which does not depend on it, is
    kept)."""
    protocol = {key: getattr(args, key) for key in ("synthetic_seed", "num_bank", "num_queries")}
    protocol["checkpoint_mtime"] = path.stat().st_mtime
    protocol["scoring_version"] = mechanism.SCORING_VERSION
    stored = path.parent / "ablation_score.json"
    kept_dense = None
    if stored.is_file():
        saved = json.loads(stored.read_text())
        saved_protocol = dict(saved.get("protocol", {}))
        if saved_protocol == protocol:
            return saved["score"]
        saved_protocol["scoring_version"] = protocol["scoring_version"]
        if saved_protocol == protocol:  # only the mechanism's scoring changed
            kept_dense = saved["score"]["dense_miou"]
    result = score(path, args, cache, dense_miou=kept_dense)
    write_json(str(stored), {"protocol": protocol, "score": result})
    return result


def _mean_half_range(values: list[float]) -> str:
    values = [value for value in values if value == value]  # drop NaN
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"


def table(rows: dict[str, dict[str, Any]], batch_key: Callable[[dict[str, Any]], str]) -> str:
    header = ["views", "objective", "seeds", "dense NN mIoU", *MECHANISM_KEYS, *NEIGHBOUR_KEYS]
    lines = []
    for name, runs in rows.items():
        views, objective = name.split("/")
        cells = [views, OBJECTIVE_NAMES[objective], str(len(runs))]
        cells.append(_mean_half_range([run["dense_miou"] for run in runs.values()]))
        cells += [_mean_half_range([run[key] for run in runs.values()]) for key in MECHANISM_KEYS]
        cells += [
            _mean_half_range([100 * run[batch_key(run)][key] for run in runs.values()])
            for key in NEIGHBOUR_KEYS
        ]
        lines.append(cells)
    return format_table(header, lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    extra = args.train_flags.split()
    start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    train_seconds: dict[str, float] = {}
    cache: dict[Any, Any] = {}
    for views in args.views:
        for objective in args.objectives:
            runs: dict[str, Any] = {}
            for seed in args.seeds:
                directory = run_dir(args.root, views, objective, seed)
                if not args.skip_training:
                    train_seconds[str(directory)] = train(directory, views, objective, seed, extra)
                checkpoint = directory / "checkpoint.pth"
                if checkpoint.is_file():
                    runs[f"seed{seed}"] = cached_score(checkpoint, args, cache)
            rows[f"{views}/{objective}"] = runs
    summary = {
        "command": "python benchmarks/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
        "machine": machine_info(),
    }
    print(table(rows, lambda run: next(key for key in run if key.startswith("batch_"))))
    write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
