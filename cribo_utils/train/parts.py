"""What the training loop holds: :class:`TrainingParts`, and the device and precision it runs with."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cribo_utils.method.loss import CrIBoLoss
from cribo_utils.method.memory_bank import CentroidMemoryBank
from cribo_utils.runtime import distributed
from data.loading import PerSampleSeededDataset, ResumableDistributedSampler


@dataclass
class TrainingParts:
    """Everything the loop needs, built once by :func:`build_training_parts`."""

    args: argparse.Namespace
    env: distributed.DistEnv
    device: torch.device
    student: nn.Module  # the plain module (parameters, EMA, checkpoints)
    student_ddp: nn.Module  # what the forward goes through (DDP-wrapped when W > 1)
    teacher: nn.Module
    loss: CrIBoLoss
    bank: CentroidMemoryBank
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast_dtype: torch.dtype | None
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    momentum_schedule: np.ndarray
    iters_per_epoch: int
    loader: torch.utils.data.DataLoader | None = None
    sampler: ResumableDistributedSampler | None = None
    dataset: PerSampleSeededDataset | None = None
    stop_signal: list[int] = field(default_factory=list)


def resolve_device(args: argparse.Namespace, env: distributed.DistEnv) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device("cuda", env.local_rank)


def resolve_precision(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward passes (``None``: fp32). Losses always run in fp32."""
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if (device.type == "cuda" and args.use_fp16) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise SystemExit("--precision fp16 needs a GPU; use --precision bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(parts: TrainingParts) -> contextlib.AbstractContextManager:
    if parts.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=parts.device.type, dtype=parts.autocast_dtype)
