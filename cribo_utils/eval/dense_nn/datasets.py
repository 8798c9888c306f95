"""Datasets of the evaluation: the seeded, augmented memory items and the resized validation pairs.

Every random draw of a memory item (crop, jitter, sampling noise) is seeded from (seed, pass, image
index) with :func:`data.loading.mix_seed`, never from the rank, worker or loader order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cribo_utils.eval.dense_nn.config import DenseNNConfig
from data.loading import mix_seed


class MemoryItems(Dataset):
    """The memory items (pass, image): item ``t`` is image ``image_indices[t % I]`` in pass ``t // I``.

    Each item is augmented with torch/python RNGs seeded from ``(seed, pass, image index)`` (the caller's
    RNG state is restored afterwards), and also returns the U(0, 1) sampling noise of its N patches, drawn
    from its own generator; so an item is the same in any worker, rank or loader order.

    Args:
        dataset: yields (PIL image, PIL mask) pairs.
        image_indices: training images used (I of them).
        passes: augmentation passes.
        transform: paired transform ``(image, mask) -> (image (3, S, S), mask (S, S) int64)``.
        num_patches: N, length of the noise vector.
        seed: base seed.
    """

    def __init__(
        self,
        dataset: Any,
        image_indices: Sequence[int],
        passes: int,
        transform: Callable[[Any, Any], tuple[Tensor, Tensor]],
        num_patches: int,
        seed: int,
    ) -> None:
        self.dataset = dataset
        self.image_indices = image_indices
        self.passes = passes
        self.transform = transform
        self.num_patches = num_patches
        self.seed = seed

    def __len__(self) -> int:
        return len(self.image_indices) * self.passes

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor, Tensor]:
        epoch, position = divmod(item, len(self.image_indices))
        index = self.image_indices[position]
        seed = mix_seed(self.seed, epoch, index)
        image, mask = self.dataset[index]
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            image, mask = self.transform(image, mask)
        random.setstate(python_state)
        noise = torch.rand(self.num_patches, generator=torch.Generator().manual_seed(seed ^ 0x5EED))
        return image, mask, noise


class ResizedPairs(Dataset):
    """Validation pairs resized to ``size x size`` (image bilinear, mask nearest) and normalised."""

    def __init__(self, dataset: Any, size: int) -> None:
        self.dataset = dataset
        self.size = size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from data.transforms import paired_resize

        image, mask = self.dataset[index]
        return paired_resize(image, mask, self.size)


def memory_transform(cfg: DenseNNConfig) -> Callable[[Any, Any], tuple[Tensor, Tensor]]:
    """The protocol's memory augmentation (A.3.2): paired random resized crop, image jitter, normalise."""
    from data.transforms import PairedRandomResizedCrop

    return PairedRandomResizedCrop(
        cfg.input_size,
        scale=cfg.crop_scale,
        ratio=cfg.crop_ratio,
        colour_jitter=cfg.jitter_strength > 0,
        jitter_strength=cfg.jitter_strength,
        jitter_p=cfg.jitter_probability,
        flip_p=0.0,
    )
