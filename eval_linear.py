"""Linear probe on frozen features (DINO's protocol; cribo_utils/eval/linear_runner.py).

    python eval_linear.py                                           # synthetic scenes, cached features
    python eval_linear.py --pretrained_weights output/teacher_backbone.pth --epochs 20
    torchrun --nproc_per_node=8 eval_linear.py --pretrained_weights vits16-in.pth --checkpoint_key teacher \\
        --data_path /datasets/imagenet --n_last_blocks 4 --avgpool_patchtokens false --num_labels 1000
    torchrun --nproc_per_node=8 eval_linear.py --arch vit_base --pretrained_weights vitb16-in.pth \\
        --data_path /datasets/imagenet --n_last_blocks 1 --avgpool_patchtokens true --output_dir runs/linear
    python eval_linear.py --pretrained_weights vits16-in.pth --data_path /datasets/imagenet --evaluate

The dataset is what --data_path holds (the synthetic scenes without it). The learning rate is
`--lr * batch_size_per_gpu * world_size / 256` (DINO advises tuning it). For the synthetic scenes the
default is no training augmentation with cached features (`--train_aug false --cache_features true`), a
documented deviation from DINO's augmented protocol. The probe is checkpointed every epoch to
`<--output_dir>/eval_linear_<dataset>_checkpoint.pth` and rerunning the command resumes it; results
(best and last top-1/top-5, history, protocol parameters) go to `eval_linear_<dataset>.json` beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cribo_utils.eval.cli import run_launcher
from cribo_utils.eval.linear_runner import get_args_parser, run_linear
from cribo_utils.runtime import distributed
from cribo_utils.runtime.logger import setup_logging


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    env = distributed.init_distributed(dist_url=args.dist_url)  # before logging: only rank 0 logs to stdout
    setup_logging(None, rank=env.rank)
    return run_linear(args)


if __name__ == "__main__":
    run_launcher("eval_linear.py", main, distributed.cleanup)
