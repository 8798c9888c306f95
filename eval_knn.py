"""Weighted k-NN classification on frozen [CLS] features (DINO's protocol; logic in cribo_utils/eval/knn.py).

    python eval_knn.py                              # synthetic scenes, random weights (warned)
    python eval_knn.py --arch resnet50 --pretrained_weights dino_resnet50_pretrain.pth  # conv: pooled stage 4
    python eval_knn.py --pretrained_weights output/teacher_backbone.pth  # arch read from the weights
    python eval_knn.py --arch vit_small --pretrained_weights vits16-in.pth --dataset imagenet1k \\
        --data_path /datasets/imagenet              # 256 -> 224 centre crops, k = 10 20 100 200
    torchrun --nproc_per_node=8 eval_knn.py --pretrained_weights vits16-in.pth --dataset imagenet1k \\
        --data_path /datasets/imagenet

Results (top-1/top-5 per k and the protocol parameters) go to `<checkpoint dir>/eval_knn.json`, or to
`--output_json`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from cribo_utils.eval.knn import get_args_parser, run_knn
from cribo_utils.runtime import distributed
from cribo_utils.runtime.logger import setup_logging
from cribo_utils.weights.checkpoint_formats import LOADING_ERRORS, resolve_backbone_args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    env = distributed.init_distributed()  # before the logging set-up, so only rank 0 logs to stdout
    setup_logging(None, rank=env.rank)
    return run_knn(resolve_backbone_args(args))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except LOADING_ERRORS as error:  # the message names the file and the fix; no traceback
        sys.exit(f"eval_knn.py: error: {error}")
    finally:
        distributed.cleanup()
