"""Configuration of the dense-NN evaluation: the protocol parameters, their checks and the CLI mapping.

:class:`DenseNNConfig` holds every parameter of the protocol (dense-nn-protocol.md, Part A);
:func:`config_from_args` builds it from the flags of ``eval_dense_nn.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

INDEX_KINDS = ("torch", "exact", "ivf")
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
                f"--input_size {self.input_size} must be a positive multiple of --patch_size "
                f"{patch_size} (a conv net's dense stride: 32 for its last stage) "
                f"(e.g. {max(1, round(self.input_size / patch_size)) * patch_size})"
            )
        if self.memory_size is not None and self.memory_size <= 0:
            raise ValueError(
                f"--memory_size {self.memory_size} must be positive (or omitted to keep every patch)"
            )
        if self.num_neighbours <= 0:
            raise ValueError(f"--num_neighbours {self.num_neighbours} must be positive (30 in the protocol)")
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
        if self.batch_size <= 0:
            raise ValueError(f"--batch_size {self.batch_size} must be positive")


def resolve_memory_ignore(choice: str, dataset: str) -> bool:
    """``--memory_ignore``: True (ignore pixels -> class 0) for ``background``, and for ``auto`` unless the
    dataset is ADE20K, whose class 0 is a real class ("wall")."""
    if choice not in ("auto", "background", "drop"):
        raise ValueError(f"--memory_ignore {choice!r}: expected auto, background or drop")
    if choice == "auto":
        return dataset != "ade20k"
    return choice == "background"


def config_from_args(args: Any) -> DenseNNConfig:
    """:class:`DenseNNConfig` from parsed flags (``input_size`` None: 512, or the synthetic image size)."""
    input_size = args.input_size
    if input_size is None:
        input_size = args.synthetic_image_size if args.dataset == "synthetic" else 512
    return DenseNNConfig(
        input_size=input_size,
        memory_size=args.memory_size or None,
        num_neighbours=args.num_neighbours,
        temperature=args.temperature,
        augmentation_epochs=args.augmentation_epochs,
        train_fraction=args.train_fraction,
        index=args.index,
        nlist=args.nlist,
        nprobe=args.nprobe,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        ignore_to_background=resolve_memory_ignore(args.memory_ignore, args.dataset),
        progress=not args.no_progress,
    )


def default_output_json(pretrained_weights: str | None) -> str:
    """``<checkpoint dir>/eval_dense_nn.json`` (``output/<name>/`` for a released model's name or a URL), or
    ``./eval_dense_nn.json`` for a random network."""
    from cribo_utils.weights.remote_weights import results_directory

    if pretrained_weights:
        return os.path.abspath(results_directory(pretrained_weights) / "eval_dense_nn.json")
    return os.path.abspath("eval_dense_nn.json")
