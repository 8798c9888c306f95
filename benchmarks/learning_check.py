"""A short CrIBo run that must beat random initialisation: the learning check of the test suite, and the
measurement of its safety margin.

One check = train the preset's network (ViT-Tiny/16, 6 blocks, 96 px, batches of 4) for half the default
schedule on the easy synthetic scenes, then score its teacher with a small dense-NN protocol (memory of
16,000 patches from 500 scenes, 200 validation scenes, input 128 px, k = 30) on scenes drawn with
:data:`CHECK_SEED`, which neither training (seed 0), the tuning runs (seed 1) nor the README's protocol
(``learning_signal.PROTOCOL_SEED``) uses. ``tests/test_learning.py`` runs one check; this script runs
several training seeds and several random initialisations and writes their spread, which sets the
test's margin:

    python benchmarks/learning_check.py --train_seeds 0 1 2 --init_seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import main_cribo  # noqa: E402
from cribo_utils.eval.dense_nn import DenseNNConfig, evaluate_dense_nn  # noqa: E402
from cribo_utils.weights.checkpoint_formats import load_backbone  # noqa: E402
from data.synthetic import SyntheticSegmentation  # noqa: E402
from models import build_backbone  # noqa: E402

# Seed of the scenes the check scores on (memory and queries); nothing trains or tunes on it.
CHECK_SEED = 3
# The short schedule: 6 epochs of 1,024 scenes in batches of 4 (1,536 iterations, 6,144 images, half the
# default run), one warm-up epoch, a bank of 256 images so the cross-image loss runs from the second epoch.
# Everything else is the synthetic CPU preset. On the current easy scenes 512 scenes per epoch gained too
# little (random init 28.4-30.6, trained 31.6-33.0: worst case +1.0); earlier, shorter schedules and 3x or
# 6x higher learning rates lost too (this network learns here through many small steps).
SHORT_RUN = [
    "--epochs",
    "6",
    "--warmup_epochs",
    "1",
    "--synthetic_num_train",
    "1024",
    "--queue_size",
    "256",
    "--num_workers",
    "1",
    "--log_freq",
    "50",
]
ARCH, PATCH_SIZE, DEPTH, INPUT_SIZE = "vit_tiny", 16, 6, 96


def check_protocol() -> DenseNNConfig:
    """The check's dense-NN protocol (small enough for a test, see the module docstring)."""
    return DenseNNConfig(
        input_size=128,
        memory_size=16_000,
        augmentation_epochs=1,
        batch_size=32,
        num_workers=0,
        seed=0,
        progress=False,
    )


def dense_score(backbone: torch.nn.Module) -> float:
    """Dense-NN mIoU (0-100) of ``backbone`` on the check's scenes."""
    train = SyntheticSegmentation("train", image_size=128, num_train=500, seed=CHECK_SEED, level="easy")
    val = SyntheticSegmentation("val", image_size=128, num_val=200, seed=CHECK_SEED, level="easy")
    with torch.no_grad():
        return 100 * evaluate_dense_nn(backbone.eval(), train, val, check_protocol())["miou"]


def random_backbone(init_seed: int) -> torch.nn.Module:
    """The check's network, randomly initialised with ``init_seed``."""
    torch.manual_seed(init_seed)
    return build_backbone(ARCH, PATCH_SIZE, img_size=INPUT_SIZE, depth=DEPTH)


def trained_backbone(
    output_dir: str | Path, train_seed: int, extra: list[str] | None = None
) -> torch.nn.Module:
    """Run the short schedule with ``--seed train_seed`` (and ``extra`` training flags, which override it)
    into ``output_dir``; return its teacher backbone."""
    main_cribo.main(["--output_dir", str(output_dir), "--seed", str(train_seed), *SHORT_RUN, *(extra or [])])
    backbone = build_backbone(ARCH, PATCH_SIZE, img_size=INPUT_SIZE, depth=DEPTH)
    load_backbone(backbone, Path(output_dir) / "checkpoint.pth", "teacher")
    return backbone


def half_range(values: list[float]) -> float:
    return (max(values) - min(values)) / 2


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser("learning check: short run vs random init", add_help=True)
    parser.add_argument("--train_seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--init_seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--train_flags", default="", help="Extra training flags (one string), to try other short schedules."
    )
    parser.add_argument("--out", default="benchmarks/results/learning_check.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    random_scores = [dense_score(random_backbone(seed)) for seed in args.init_seeds]
    trained_scores, train_seconds = [], []
    for seed in args.train_seeds:
        with tempfile.TemporaryDirectory() as output_dir:
            began = time.perf_counter()
            backbone = trained_backbone(output_dir, seed, args.train_flags.split())
            train_seconds.append(time.perf_counter() - began)
            trained_scores.append(dense_score(backbone))
    summary = {
        "command": "python benchmarks/learning_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "random": dict(zip(map(str, args.init_seeds), random_scores, strict=True)),
        "trained": dict(zip(map(str, args.train_seeds), trained_scores, strict=True)),
        "random_mean": statistics.mean(random_scores),
        "random_half_range": half_range(random_scores),
        "trained_mean": statistics.mean(trained_scores),
        "trained_half_range": half_range(trained_scores),
        "gap_worst_case": min(trained_scores) - max(random_scores),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
