"""Does training improve the features? Random initialisation (several seeds) vs trained checkpoints.

Runs the three evaluations (dense NN retrieval mIoU, weighted k-NN and linear probe on [CLS]) on the
synthetic scenes validation split with one fixed, CPU-sized protocol, for ``--random_seeds`` randomly
initialised networks of the same shape and for every checkpoint given, then prints a table (mean and
spread over the random seeds) and writes JSON.

    python benchmarks/learning_signal.py --checkpoints output/checkpoint.pth --depth 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Seed of the scenes the protocol evaluates on; training uses --seed (0 by default) and tests use 0-3.
PROTOCOL_SEED = 20240507

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data.synthetic import DEFAULT_LEVEL, OBJECT_COLOUR_MODES, SCENE_LEVELS  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("learning signal: random init vs trained", add_help=True)
    parser.add_argument("--checkpoints", nargs="*", default=[], help="Trained checkpoints to evaluate.")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument(
        "--depth", default=6, type=int, help="Blocks of the random networks (match training)."
    )
    parser.add_argument("--random_seeds", default=3, type=int, help="Random initialisations to evaluate.")
    parser.add_argument(
        "--num_train", default=1000, type=int, help="Synthetic training images (memory / k-NN)."
    )
    parser.add_argument(
        "--num_val", default=300, type=int, help="Synthetic validation images of dense NN (queries)."
    )
    parser.add_argument(
        "--num_val_cls",
        default=2000,
        type=int,
        help="Synthetic validation images of the [CLS] k-NN and linear probes. With 300, one probe's "
        "accuracy has a standard error of 2.5 points near chance, more than the gaps it is asked to resolve; "
        "with 2,000, 1.0. The first --num_val of them are the dense NN queries.",
    )
    parser.add_argument("--memory_size", default=32000, type=int, help="Dense NN memory (patches).")
    parser.add_argument(
        "--memory_seeds",
        default=3,
        type=int,
        help="Dense NN runs per network, each with its own training subset and memory sample (--seed 0..n-1 "
        "of eval_dense_nn.py); the network's score is their mean. One subset moves the mIoU of one network "
        "by up to 1 point, far more than the spread between random initialisations on a fixed subset.",
    )
    parser.add_argument(
        "--input_size",
        default=128,
        type=int,
        help="Side of the evaluated images in pixels (128: the scenes' own size; 96: the preset's training "
        "resolution).",
    )
    parser.add_argument(
        "--object_colours",
        default="random",
        choices=OBJECT_COLOUR_MODES,
        help="Synthetic scenes colour mode (--synthetic_object_colours of the evaluations; match training).",
    )
    parser.add_argument(
        "--level",
        default=DEFAULT_LEVEL,
        choices=tuple(SCENE_LEVELS),
        help="Synthetic scene level (match training).",
    )
    parser.add_argument(
        "--synthetic_seed",
        default=PROTOCOL_SEED,
        type=int,
        help="Seed of the evaluated scenes (memory, k-NN / linear training images and validation queries). "
        f"The default {PROTOCOL_SEED} is used by no training run, test or tuning run, so the table is "
        "measured on scenes nobody tuned on; tune with another seed.",
    )
    parser.add_argument("--skip_linear", action="store_true", help="Only dense NN and k-NN.")
    parser.add_argument("--out", default="benchmarks/results/learning_signal.json")
    return parser


def run_eval(script: str, weights_flags: list[str], args: argparse.Namespace, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [
            sys.executable,
            script,
            *weights_flags,
            "--arch",
            args.arch,
            "--patch_size",
            str(args.patch_size),
            "--output_json",
            out,
            "--synthetic_object_colours",
            args.object_colours,
            "--synthetic_level",
            args.level,
            "--synthetic_seed",
            str(args.synthetic_seed),
            *extra,
        ]
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(out) as handle:
            return json.load(handle)


def evaluate(weights_flags: list[str], args: argparse.Namespace) -> dict[str, float]:
    """mIoU (0-100) of dense NN retrieval (mean over memory seeds), k-NN top-1 (k=20), linear top-1."""
    fraction = args.num_train / 5000  # the synthetic training split has 5,000 images
    dense_runs = [
        run_eval(
            "eval_dense_nn.py",
            weights_flags,
            args,
            [
                "--train_fraction",
                str(fraction),
                "--synthetic_num_val",
                str(args.num_val),
                "--memory_size",
                str(args.memory_size),
                "--input_size",
                str(args.input_size),
                "--augmentation_epochs",
                "1",
                "--seed",
                str(seed),
                "--no_progress",
            ],
        )
        for seed in range(args.memory_seeds)
    ]
    knn = run_eval(
        "eval_knn.py",
        weights_flags,
        args,
        [
            "--synthetic_num_train",
            str(args.num_train),
            "--synthetic_num_val",
            str(args.num_val_cls),
            "--nb_knn",
            "20",
            "--image_size",
            str(args.input_size),
        ],
    )
    scores = {
        "dense_miou": statistics.mean(100 * run["miou"] for run in dense_runs),
        "knn_top1": knn["results"]["20"]["top1"],
    }
    if not args.skip_linear:
        linear = run_eval(
            "eval_linear.py",
            weights_flags,
            args,
            [
                "--synthetic_num_train",
                str(args.num_train),
                "--synthetic_num_val",
                str(args.num_val_cls),
                "--image_size",
                str(args.input_size),
            ],
        )
        scores["linear_top1"] = float(linear.get("last_top1", linear.get("best_top1", float("nan"))))
    return scores


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.memory_seeds < 1 or args.random_seeds < 1:
        parser.error("--memory_seeds and --random_seeds must be at least 1")
    start = time.perf_counter()
    random_scores = [
        evaluate(["--depth", str(args.depth), "--init_seed", str(seed)], args)
        for seed in range(args.random_seeds)
    ]
    summary: dict = {"protocol": vars(args), "random": random_scores, "trained": {}}
    keys = list(random_scores[0])
    summary["random_mean"] = {k: statistics.mean(s[k] for s in random_scores) for k in keys}
    summary["random_spread"] = {
        k: (max(s[k] for s in random_scores) - min(s[k] for s in random_scores)) / 2 for k in keys
    }
    for path in args.checkpoints:
        summary["trained"][path] = evaluate(["--pretrained_weights", path], args)
    print(f"{'network':<40}" + "".join(f"{k:>16}" for k in keys))
    mean, spread = summary["random_mean"], summary["random_spread"]
    print(
        f"{'random init (mean +- half-range)':<40}"
        + "".join(f"{mean[k]:>10.2f} +-{spread[k]:>4.2f}" for k in keys)
    )
    for path, scores in summary["trained"].items():
        print(f"{path[-40:]:<40}" + "".join(f"{scores[k]:>16.2f}" for k in keys))
    summary["seconds"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()
