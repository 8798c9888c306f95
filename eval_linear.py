"""Linear probe on frozen ViT features (DINO's protocol; logic in cribo_utils/eval/linear_probe.py).

    python eval_linear.py                                           # synthetic scenes, cached features
    python eval_linear.py --arch convnext_small --pretrained_weights convnext_small_alpha0.75.pth  # VICRegL
    python eval_linear.py --pretrained_weights output/teacher_backbone.pth --epochs 20
    torchrun --nproc_per_node=8 eval_linear.py --arch vit_small --pretrained_weights vits16-in.pth \\
        --dataset imagenet1k --data_path /datasets/imagenet --n_last_blocks 4 --avgpool_patchtokens false
    torchrun --nproc_per_node=8 eval_linear.py --arch vit_base --pretrained_weights vitb16-in.pth \\
        --dataset imagenet1k --data_path /datasets/imagenet --n_last_blocks 1 --avgpool_patchtokens true

The learning rate is `--lr * batch_size_per_gpu * world_size / 256` (DINO advises tuning it). For the
synthetic scenes the default is no training augmentation with cached features (`--no_train_aug
--cache_features`), a documented deviation from DINO's augmented protocol (`--train_aug` restores it).
Results (best and last top-1/top-5, history, protocol parameters) go to `<checkpoint dir>/eval_linear.json`
(and the classifier to `eval_linear_classifier.pth` beside it), or to `--output_json`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from cribo_utils.eval.linear_probe import get_args_parser, run_linear
from cribo_utils.runtime import distributed
from cribo_utils.runtime.logger import setup_logging
from cribo_utils.weights.checkpoint_formats import LOADING_ERRORS, resolve_backbone_args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    env = distributed.init_distributed()  # before the logging set-up, so only rank 0 logs to stdout
    setup_logging(None, rank=env.rank)
    return run_linear(resolve_backbone_args(args))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except LOADING_ERRORS as error:  # the message names the file and the fix; no traceback
        sys.exit(f"eval_linear.py: error: {error}")
    finally:
        distributed.cleanup()
