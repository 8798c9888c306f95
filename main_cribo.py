"""CrIBo pretraining.

    python main_cribo.py                                   # synthetic scenes, CPU preset, ~7 min on 2 cores
    python main_cribo.py --config checkpoints/vits16-in_args.json --data_path /datasets/imagenet
    torchrun --nproc_per_node=8 main_cribo.py --config checkpoints/vits16-in_args.json --data_path ...
    sbatch run_slurm.sh --config checkpoints/vits16-coco_args.json --data_path /datasets/coco/train2017

Resuming is automatic: rerun the same command with the same --output_dir.
Exit status: 0 done; 1 a one-line error (bad configuration or data, not enough memory, non-finite loss,
damaged checkpoints, a lost process); 75 a checkpoint was written on SIGTERM/SIGUSR1 (requeue to resume).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cribo_utils.train import TRAINING_ERRORS, train_cribo
from cribo_utils.train.parser import resolve_args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    return train_cribo(resolve_args(argv))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except TRAINING_ERRORS as error:  # already logged; one line on stderr and status 1, no traceback
        sys.exit(f"main_cribo.py: error: {error}")
