"""Dense nearest-neighbour retrieval (Hummingbird) evaluation of a frozen backbone: mIoU by label transfer.

Protocol: docs/dense-nn-protocol.md. Flags: cribo_utils/eval/dense_nn/cli.py; logic:
cribo_utils/eval/dense_nn/.

    python eval_dense_nn.py --pretrained_weights output/checkpoint.pth         # synthetic scenes, CPU
    torchrun --nproc_per_node=8 eval_dense_nn.py --pretrained_weights vits16-in.pth \\
        --data_path /datasets/VOCdevkit/VOC2012 --protocol voc              # the paper's Pascal VOC setting
    torchrun --nproc_per_node=8 eval_dense_nn.py --pretrained_weights vits16-in.pth \\
        --data_path /datasets/ADEChallengeData2016 --protocol ade20k         # the paper's ADE20K setting
    python eval_dense_nn.py --pretrained_weights convnext_small_alpha0.75.pth   # VICRegL ConvNeXt-S

The dataset is what --data_path holds (the synthetic scenes without it) and --protocol defaults to the
dataset's; `--help` lists each protocol's settings, RAM and time. Each process holds 1/W of the memory (exact
top-k merged across processes), searched on its own device. The result (mIoU with the identity class
mapping, mIoU over present classes, pixel accuracy, per-class IoU, the Hungarian-matched mIoU, the protocol
and every override) goes to `<--output_dir>/eval_dense_nn_<protocol>.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cribo_utils.eval.cli import run_launcher
from cribo_utils.eval.dense_nn import run_dense_nn
from cribo_utils.eval.dense_nn.cli import get_args_parser
from cribo_utils.runtime import distributed
from cribo_utils.runtime.logger import setup_logging

__all__ = ["get_args_parser", "main"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and run the evaluation; returns the result dict."""
    args = get_args_parser().parse_args(argv)
    env = distributed.init_distributed(dist_url=args.dist_url)
    setup_logging(None, env.rank)
    try:
        return run_dense_nn(args)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    run_launcher("eval_dense_nn.py", main, distributed.cleanup)
