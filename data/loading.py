"""Deterministic, resumable data loading for pretraining.

Two pieces make a resumed run see exactly the batches and augmentations an uninterrupted run sees:

* :class:`ResumableDistributedSampler` shuffles with a generator seeded by ``(seed, epoch)`` (identical on
  every rank, each rank taking its own stride) and can start mid-epoch at a given batch;
* :class:`PerSampleSeededDataset` seeds the augmentation random streams from ``(seed, epoch, index)``
  before transforming a sample, so augmentations do not depend on the worker that loads it, the number of
  workers, or where the run was resumed. It also replaces unreadable files (deterministically) and reports,
  per sample, whether it did, so the training loop can count skipped files across workers and ranks.
"""

from __future__ import annotations

import logging
import math
import random
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data.datasets import ImageReadError

logger = logging.getLogger(__name__)


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

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
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
                f"({batch_size} per process x {num_replicas} processes); lower --batch_size_per_gpu"
            )

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


class UnreadableSampleError(RuntimeError):
    """An image cannot be read and skipping is off (``--skip_bad_files false``), or every image is unreadable.

    A DataLoader worker's exception reaches the main process as ``type(error)(worker traceback text)``;
    the constructor keeps only the original one-line message, so the error stays readable.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class PerSampleSeededDataset(Dataset):
    """Wraps a dataset whose transform is random: sample ``i`` of epoch ``e`` is drawn with RNGs seeded from
    ``(seed, e, i)``, which makes augmentations reproducible across workers, ranks and resumes.

    Unreadable files (the wrapped dataset raises :class:`data.datasets.ImageReadError`): with
    ``skip_bad_files`` sample ``i`` is replaced by the first readable one of ``i + 1, i + 2, ...``
    (cyclically, so the replacement does not depend on the worker or on what was read before), a warning
    names the file (once per process), and the sample is flagged; otherwise :class:`UnreadableSampleError`
    names the file.

    Items are ``(transform(image), target, skipped)`` with ``skipped`` = 1 when file ``i`` itself was
    unreadable and replaced, else 0: summed over an epoch (all workers and ranks) it counts the unreadable
    files met in that epoch, whatever the number of workers.
    """

    def __init__(
        self, dataset: Any, seed: int, transform: Callable | None = None, skip_bad_files: bool = True
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.transform = transform
        self.skip_bad_files = skip_bad_files
        self._unreadable: set[int] = set()  # per process: each bad file is tried and logged once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, index: int) -> tuple[Any, int]:
        """``(item of the first readable index from index on, 1 if index itself is unreadable else 0)``."""
        length = len(self.dataset)
        for offset in range(length):
            candidate = (index + offset) % length
            if candidate in self._unreadable:
                continue
            try:
                item = self.dataset[candidate]
            except ImageReadError as error:
                if not self.skip_bad_files:
                    raise UnreadableSampleError(
                        f"{error} (--skip_bad_files false: stopping; with --skip_bad_files true such files "
                        "are skipped with a warning)"
                    ) from error
                self._unreadable.add(candidate)
                logger.warning("skipping unreadable file %s (sample %d): %s", error.path, candidate, error)
                continue
            return item, int(index in self._unreadable)
        raise UnreadableSampleError(
            f"every one of the {length} images of the dataset is unreadable; "
            "check the files under --data_path"
        )

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        sample_seed = mix_seed(self.seed, self.epoch, index)
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed % (2**32))
        (image, target), skipped = self._read(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, target, skipped


def set_worker_signal_handlers(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGUSR1 and die on SIGTERM.

    SLURM's pre-timeout signal (SIGUSR1, see run_slurm.sh) reaches every process of the job step, DataLoader
    workers included; a worker killed by it would make the main process fail before its checkpoint.
    SIGTERM keeps its default action (a forked worker would otherwise inherit the training process's
    handler), because the DataLoader and multiprocessing stop workers with SIGTERM and wait for them.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def num_iterations(dataset_size: int, batch_size: int, world_size: int) -> int:
    """Iterations per epoch with ``drop_last`` semantics."""
    return math.floor(dataset_size / (batch_size * world_size))
