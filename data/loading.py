"""Deterministic, resumable data loading for pretraining.

Two pieces make a resumed run see exactly the batches and augmentations an uninterrupted run sees:

* :class:`ResumableDistributedSampler` shuffles with a generator seeded by ``(seed, epoch)`` (identical on
  every rank, each rank taking its own stride) and can start mid-epoch at a given batch;
* :class:`PerSampleSeededDataset` seeds the augmentation random streams from ``(seed, epoch, index)``
  before transforming a sample, so augmentations do not depend on the worker that loads it, the number of
  workers, or where the run was resumed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (a stable hash, the same in every process)."""
    sequence = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values] + [len(values)])
    return int(sequence.generate_state(1, dtype=np.uint64)[0]) >> 1


class ResumableDistributedSampler(Sampler[int]):
    """Epoch-shuffled, rank-strided sampler that drops the tail so every rank sees whole batches.

    Per epoch ``e`` the permutation is ``randperm(n, seed=(seed, e))``; rank ``r`` of ``W`` takes positions
    ``r, r + W, ...`` of its first ``iters * B * W`` entries. ``start_batch`` skips the first batches of the
    current epoch (mid-epoch resume); it applies to the next iteration only.
    """

    def __init__(self, dataset_size: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0
        self.iters_per_epoch = dataset_size // (batch_size * num_replicas)
        if self.iters_per_epoch == 0:
            raise ValueError(
                f"the dataset has {dataset_size} images, fewer than one global batch "
                f"({batch_size} per process x {num_replicas} processes); lower --batch_size_per_gpu")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_indices(self, epoch: int) -> list[int]:
        """All indices this rank takes in ``epoch`` (before skipping)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        used = order[: self.iters_per_epoch * self.batch_size * self.num_replicas]
        return used[self.rank :: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)[self.start_batch * self.batch_size :]
        return iter(indices)

    def __len__(self) -> int:
        return (self.iters_per_epoch - self.start_batch) * self.batch_size


class PerSampleSeededDataset(Dataset):
    """Wraps a dataset whose transform is random: sample ``i`` of epoch ``e`` is drawn with RNGs seeded from
    ``(seed, e, i)``, which makes augmentations reproducible across workers, ranks and resumes."""

    def __init__(self, dataset: Any, seed: int, transform: Callable | None = None) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample_seed = mix_seed(self.seed, self.epoch, index)
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed % (2**32))
        image, target = self.dataset[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def num_iterations(dataset_size: int, batch_size: int, world_size: int) -> int:
    """Iterations per epoch with ``drop_last`` semantics."""
    return math.floor(dataset_size / (batch_size * world_size))
