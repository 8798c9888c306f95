"""Configuration of the dense-NN evaluation: the protocol parameters, their checks and the CLI mapping.

:class:`DenseNNConfig` holds every parameter of the protocol (docs/dense-nn-protocol.md, Part A);
:func:`config_from_args` builds it from the flags of ``eval_dense_nn.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

INDEX_KINDS = ("torch", "exact", "ivf")
#: Storage of the memory features: float32, or float16 (half the RAM; similarities still computed in float32).
MEMORY_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DATASETS = ("synthetic", "voc", "ade20k")
# Default training / validation split names per dataset (open-hummingbird-eval's choices).
DEFAULT_SPLITS: dict[str, tuple[str, str]] = {
    "synthetic": ("train", "val"),
    "voc": ("trainaug", "val"),
    "ade20k": ("training", "validation"),
}


@dataclass
class DenseNNConfig:
    """Every parameter of the protocol (all are written to the result file).

    Attributes:
        input_size: side of the square network input, a multiple of the patch size (512 in the literature).
        memory_size: M, the number of memory entries; None keeps every patch of every pass.
        num_neighbours: k.
        temperature: beta of the softmax over neighbour similarities (0.02 in open-hummingbird-eval).
        augmentation_epochs: passes over the training subset when building the memory.
        train_fraction: fraction of training images used (fixed subset drawn with ``seed``).
        index: ``"torch"`` (exact, chunked matmul + topk on the device), ``"exact"`` (faiss IndexFlatIP)
            or ``"ivf"`` (faiss IndexIVFFlat).
        nlist: IVF lists; None picks ``4 sqrt(M)`` (at most M / 39).
        nprobe: IVF lists searched per query (clamped to nlist).
        memory_dtype: storage of the memory features, ``"fp32"`` or ``"fp16"`` (``--index torch``: half the
            memory; faiss indexes copy them to float32).
        batch_size: images per forward pass and per search call (per process).
        num_workers: data-loading workers per process.
        seed: seed of the training subset, the crops, the jitter and the sampling noise.
        crop_scale: area-fraction range of the paired random resized crop.
        crop_ratio: aspect-ratio range of the crop.
        jitter_strength: strength of each of the four colour jitters (0 disables jitter).
        jitter_probability: probability of each jitter.
        ignore_index: label ignored in scoring.
        ignore_to_background: in the memory labels, count ignore pixels as class 0 (the protocol's rule,
            right for VOC and the synthetic scenes where class 0 is background) or drop them (right for
            ADE20K in the 150-class convention, where class 0 is "wall").
        progress: show progress bars (rank 0).
    """

    input_size: int = 512
    memory_size: int | None = None
    num_neighbours: int = 30
    temperature: float = 0.02
    augmentation_epochs: int = 2
    train_fraction: float = 1.0
    index: str = "torch"
    nlist: int | None = None
    nprobe: int = 32
    memory_dtype: str = "fp32"
    batch_size: int = 16
    num_workers: int = 4
    seed: int = 0
    crop_scale: tuple[float, float] = (0.5, 2.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    jitter_strength: float = 0.1
    jitter_probability: float = 0.5
    ignore_index: int = 255
    ignore_to_background: bool = True
    progress: bool = True

    def validate(self, patch_size: int) -> None:
        """Check the values before any work; errors name the flag and the fix."""
        if self.input_size <= 0 or self.input_size % patch_size:
            raise ValueError(
                f"--image_size {self.input_size} must be a positive multiple of --patch_size "
                f"{patch_size} (a conv net's dense stride: 32 for its last stage) "
                f"(e.g. {max(1, round(self.input_size / patch_size)) * patch_size})"
            )
        if self.memory_size is not None and self.memory_size <= 0:
            raise ValueError(
                f"--memory_size {self.memory_size} must be positive (or omitted to keep every patch)"
            )
        if self.num_neighbours <= 0:
            raise ValueError(f"--nb_knn {self.num_neighbours} must be positive (30 in the protocol)")
        if self.temperature <= 0:
            raise ValueError(f"--temperature {self.temperature} must be positive (0.02 in the protocol)")
        if self.augmentation_epochs <= 0:
            raise ValueError(f"--augmentation_epochs {self.augmentation_epochs} must be at least 1")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(
                f"--train_fraction {self.train_fraction} must lie in (0, 1] (e.g. 0.0078125 = 1/128)"
            )
        if self.index not in INDEX_KINDS:
            raise ValueError(f"--index {self.index!r} is not one of {', '.join(INDEX_KINDS)}")
        if self.nprobe <= 0 or (self.nlist is not None and self.nlist <= 0):
            raise ValueError(f"--nprobe {self.nprobe} and --nlist {self.nlist} must be positive")
        if self.memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"--memory_dtype {self.memory_dtype!r} is not one of {', '.join(MEMORY_DTYPES)}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch_size_per_gpu {self.batch_size} must be positive")


def resolve_memory_ignore(choice: str, dataset: str) -> bool:
    """``--memory_ignore``: True (ignore pixels -> class 0) for ``background``, and for ``auto`` unless the
    dataset is ADE20K, whose class 0 is a real class ("wall")."""
    if choice not in ("auto", "background", "drop"):
        raise ValueError(f"--memory_ignore {choice!r}: expected auto, background or drop")
    if choice == "auto":
        return dataset != "ade20k"
    return choice == "background"


def config_from_args(args: Any) -> DenseNNConfig:
    """:class:`DenseNNConfig` from the flags, once
    :func:`cribo_utils.eval.dense_nn.cli.resolve_dense_args` has resolved them."""
    return DenseNNConfig(
        input_size=args.image_size,
        memory_size=args.memory_size or None,
        num_neighbours=args.nb_knn,
        temperature=args.temperature,
        augmentation_epochs=args.augmentation_epochs,
        train_fraction=args.train_fraction,
        index=args.index,
        nlist=args.nlist,
        nprobe=args.nprobe,
        memory_dtype=args.memory_dtype,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        seed=args.seed,
        ignore_to_background=resolve_memory_ignore(args.memory_ignore, args.dataset),
        progress=args.progress,
    )
