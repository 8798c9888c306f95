"""Weighted k-NN classification on frozen [CLS] features (DINO's protocol; logic in cribo_utils/eval/knn.py).

    python eval_knn.py                              # synthetic scenes, random weights (warned)
    python eval_knn.py --pretrained_weights output/teacher_backbone.pth  # arch read from the weights
    python eval_knn.py --pretrained_weights vits16-in.pth --data_path /datasets/imagenet  # k = 10 20 100 200
    torchrun --nproc_per_node=8 eval_knn.py --pretrained_weights vits16-in.pth --checkpoint_key teacher \\
        --data_path /datasets/imagenet --dump_features /scratch/knn_features
    python eval_knn.py --load_features /scratch/knn_features --nb_knn 20    # no network, no images

The dataset is what --data_path holds (the synthetic scenes without it). Results (top-1/top-5 per k and
the protocol parameters) go to `<--output_dir>/eval_knn_<dataset>.json`; --output_dir defaults to the
folder of the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cribo_utils.eval.cli import run_launcher
from cribo_utils.eval.knn import get_args_parser, run_knn
from cribo_utils.runtime import distributed
from cribo_utils.runtime.logger import setup_logging


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    env = distributed.init_distributed(dist_url=args.dist_url)  # before logging: only rank 0 logs to stdout
    setup_logging(None, rank=env.rank)
    return run_knn(args)


if __name__ == "__main__":
    run_launcher("eval_knn.py", main, distributed.cleanup)
