"""The typed configurations of the modules below the training loop, built from the resolved training flags.

The network builder (:mod:`models.student_teacher`) and the memory estimate
(:mod:`cribo_utils.train.resources`) take small frozen dataclasses, so a reader of those modules sees what
they depend on without opening the parser; this module is the one place that maps the flags onto them.
"""

from __future__ import annotations

import argparse

from cribo_utils.train.resources import RunShape
from models.head import HEAD_BOTTLENECK_DIM, HEAD_HIDDEN_DIM, HEAD_NLAYERS
from models.student_teacher import NetworkConfig


def network_config(args: argparse.Namespace) -> NetworkConfig:
    """The student / teacher settings of the flags of the same names (the optional ones default)."""
    return NetworkConfig(
        arch=args.arch,
        patch_size=args.patch_size,
        out_dim=args.out_dim,
        out_dim_c=args.out_dim_c,
        drop_path_rate=args.drop_path_rate,
        image_size=getattr(args, "image_size", 224),
        depth=getattr(args, "depth", None),
        use_bn_in_head=args.use_bn_in_head,
        head_hidden_dim=getattr(args, "head_hidden_dim", HEAD_HIDDEN_DIM),
        head_nlayers=getattr(args, "head_nlayers", HEAD_NLAYERS),
        head_bottleneck_dim=getattr(args, "head_bottleneck_dim", HEAD_BOTTLENECK_DIM),
        norm_last_layer=args.norm_last_layer,
        grad_checkpointing=getattr(args, "grad_checkpointing", False),
    )


def run_shape(args: argparse.Namespace) -> RunShape:
    """What the memory estimate depends on: the networks, the batch, centroids, bank and optimiser flags."""
    return RunShape(
        network_config(args),
        args.batch_size_per_gpu,
        args.n_tokens,
        args.queue_size,
        args.optimizer,
        args.local_crops_number,
        args.local_crops_size,
    )
