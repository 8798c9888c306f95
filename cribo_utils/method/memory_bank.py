"""FIFO memory bank of per-view teacher object representations (CrIBo, docs/method.md, Sec. 7).

The bank keeps, for the ``Q`` most recently pushed images of all ranks, the view-1 and view-2 teacher
object representations ``q^1_r``, ``q^2_r`` (backbone space, un-normalised, as the teacher head needs
them) of each of the image's ``<= K`` valid objects, and how many objects each image contributed.

Storage: two rings, so that a push writes only the new rows (the reference rebuilds the whole
``(2, K*Q, D)`` tensor every step by prepending and truncating):

- an object ring ``centroids`` of ``K*Q`` slots (both views share a slot index);
- an image ring of ``Q`` entries ``(image_start, image_count)`` pointing into the object ring.

Objects are written contiguously (modulo ``K*Q``) in the same order as images enter the image ring. Since
the ``Q`` newest images hold at most ``K*Q`` objects, they always sit in the last ``<= K*Q`` written slots,
which no later write has touched: evicting the oldest image entries is enough, the object ring never
overwrites a valid object. The valid objects are therefore one cyclic slot range ending at ``slot_head``.

Order ("newest first"), replicating the reference's prepend-and-truncate queue exactly: pushes are
ordered newest first, and within one push the gathered images keep rank order (rank 0's first image is
listed first). Internally a push enters the ring last-rank-last-image first, so that "newest" in ring
order equals "first" in that reference order; ``to_reference_layout`` reads the ring backwards.

The bank starts empty (docs/differences.md, difference 9: the reference's starts with random valid vectors)
and is identical on every rank: ``push`` gathers all ranks' objects itself, and the overflow subset is
drawn from a generator seeded by ``(seed, step)``, identical on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cribo_utils.runtime.distributed import all_gather_varlen, get_world_size

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BankChunk:
    """A contiguous run of valid bank slots (views into the bank's storage, not copies).

    Attributes:
        slots: (n,) long slot indices, usable with ``CentroidMemoryBank.gather_slots``.
        view1: (n, D) raw view-1 representations of these slots.
        view2: (n, D) raw view-2 representations of these slots.
    """

    slots: torch.Tensor
    view1: torch.Tensor
    view2: torch.Tensor


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    """``out[i] = sum_{j<i} values[j]``, shape (n,)."""
    return torch.cumsum(values, 0) - values


def _block_indices(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenate ``arange(starts[b], starts[b] + counts[b])`` over b without a Python loop.

    Args:
        starts: (G,) long block starts.
        counts: (G,) long block lengths (>= 0).

    Returns:
        (sum(counts),) long indices, block after block.
    """
    total = int(counts.sum())
    within = torch.arange(total, device=counts.device) - torch.repeat_interleave(
        _exclusive_cumsum(counts), counts, output_size=total
    )
    return torch.repeat_interleave(starts, counts, output_size=total) + within


@dataclass
class _HostBookkeeping:
    """The bank's scalars and image counts as Python values: what the search and the push need to know,
    without reading the device buffers at every step (each read would wait for the device)."""

    slot_head: int
    image_head: int
    stored_images: int
    stored_objects: int
    image_count: list[int]


class CentroidMemoryBank(nn.Module):
    """Per-view FIFO queue of teacher object representations of the last ``Q`` images.

    Buffers (all in ``state_dict``): ``centroids`` (2, K*Q, D) float32 object ring; ``image_start`` (Q,)
    and ``image_count`` (Q,) long image ring; scalars ``slot_head`` (next object slot to write),
    ``image_head`` (next image entry to write), ``stored_images`` (valid images, <= Q), ``stored_objects``
    (valid objects, <= K*Q) and ``step`` (pushes so far; seeds the overflow subset). The bank also keeps
    the scalars and counts (not ``step``) on the host, read from the buffers once after construction or
    loading and then updated with them, so that a step reads back only the counts it pushes.

    Args:
        queue_size: Q, number of images kept.
        n_tokens: K, maximum number of objects per image.
        dim: D, width of the stored (backbone) representations.
        seed: base seed of the overflow subset generator (same on every rank).
    """

    def __init__(self, queue_size: int, n_tokens: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        if queue_size < 1 or n_tokens < 1 or dim < 1:
            raise ValueError(
                f"CentroidMemoryBank: queue_size ({queue_size}), n_tokens ({n_tokens}) and dim ({dim}) "
                "must all be >= 1 (flags --queue_size, --n_tokens)."
            )
        self.queue_size = queue_size
        self.n_tokens = n_tokens
        self.dim = dim
        self.seed = seed
        self.capacity = queue_size * n_tokens
        self.register_buffer("centroids", torch.zeros(2, self.capacity, dim))
        self.register_buffer("image_start", torch.zeros(queue_size, dtype=torch.long))
        self.register_buffer("image_count", torch.zeros(queue_size, dtype=torch.long))
        for name in ("slot_head", "image_head", "stored_images", "stored_objects", "step"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self._host_copy: _HostBookkeeping | None = None

    # ------------------------------------------------------------------ state

    @property
    def _host(self) -> _HostBookkeeping:
        """The host copy of the bookkeeping, read from the buffers in one go when there is none."""
        if self._host_copy is None:
            scalars = (self.slot_head, self.image_head, self.stored_images, self.stored_objects)
            values = torch.cat((torch.stack(scalars), self.image_count)).tolist()
            self._host_copy = _HostBookkeeping(
                slot_head=values[0],
                image_head=values[1],
                stored_images=values[2],
                stored_objects=values[3],
                image_count=values[4:],
            )
        return self._host_copy

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_copy = None  # the buffers changed: read them again when needed

    @property
    def num_images(self) -> int:
        """Number of stored images (<= Q)."""
        return self._host.stored_images

    @property
    def num_objects(self) -> int:
        """Number of valid object slots (sum of the stored images' counts, <= K*Q)."""
        return self._host.stored_objects

    @property
    def is_full(self) -> bool:
        """True once Q images have been stored (every later push evicts old ones)."""
        return self.num_images == self.queue_size

    @property
    def is_empty(self) -> bool:
        """True while no valid object is stored (retrieval must be skipped)."""
        return self.num_objects == 0

    def extra_repr(self) -> str:
        return f"queue_size={self.queue_size}, n_tokens={self.n_tokens}, dim={self.dim}"

    def reset(self) -> None:
        """Empty the bank (the step counter is kept)."""
        self.centroids.zero_()
        self.image_start.zero_()
        self.image_count.zero_()
        for name in ("slot_head", "image_head", "stored_images", "stored_objects"):
            getattr(self, name).zero_()
        self._host_copy = None

    # ------------------------------------------------------------------ push

    def _check_push_inputs(self, c1: torch.Tensor, c2: torch.Tensor, counts: torch.Tensor) -> list[int]:
        """Check the inputs of :meth:`push`; returns ``counts`` read back (the push's one read)."""
        if c1.ndim != 2 or c1.shape != c2.shape or c1.shape[1] != self.dim:
            raise ValueError(
                f"CentroidMemoryBank.push: c1 {tuple(c1.shape)} and c2 {tuple(c2.shape)} must both be "
                f"(M, {self.dim})."
            )
        if counts.ndim != 1 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise ValueError(f"CentroidMemoryBank.push: counts must be a (B,) integer tensor, got {counts}.")
        values = counts.tolist()
        if values and (min(values) < 0 or max(values) > self.n_tokens):
            raise ValueError(
                f"CentroidMemoryBank.push: counts must lie in [0, n_tokens={self.n_tokens}], got "
                f"min {min(values)}, max {max(values)}."
            )
        if sum(values) != c1.shape[0]:
            raise ValueError(
                f"CentroidMemoryBank.push: sum(counts) = {sum(values)} but c1 has {c1.shape[0]} rows."
            )
        return values

    @torch.no_grad()
    def push(self, c1: torch.Tensor, c2: torch.Tensor, counts: torch.Tensor) -> None:
        """Gather every rank's objects and insert them as the newest images, evicting the oldest.

        With n_old stored images and G <= Q gathered images (rank order), the bank afterwards lists, newest
        first: the G new images in rank order, then the min(n_old, Q - G) newest old images. Only the new
        rows are written (no copy of the bank). When G > Q,
        a random subset of Q new images (same on every rank, relative order kept) replaces the whole bank;
        start-up rejects it anyway (the reference keeps the first Q: docs/differences.md, difference 10).

        Args:
            c1: (M, D) teacher view-1 object representations of this rank, image by image.
            c2: (M, D) teacher view-2 representations, row i the same object as row i of ``c1``.
            counts: (B,) integer number of objects of each local image, ``sum(counts) == M``, each <= K.
        """
        values = self._check_push_inputs(c1, c2, counts)
        device = self.centroids.device
        pairs = torch.stack((c1, c2), dim=1).to(device=device, dtype=self.centroids.dtype)  # (M, 2, D)
        counts = counts.to(device=device, dtype=torch.long)
        if get_world_size() > 1:
            pairs = all_gather_varlen(pairs.contiguous())
            counts = all_gather_varlen(counts)
            values = counts.tolist()
        self.step += 1
        if not values:
            return

        if len(values) > self.queue_size:
            pairs, counts = self._overflow_subset(pairs, counts, int(self.step) - 1)
            values = counts.tolist()

        # Ring order is oldest -> newest and "newest" is rank 0's first image, so enter the images reversed,
        # each image's objects still in ascending cluster order (a stable sort by descending image index).
        n_images, n_objects = len(values), pairs.shape[0]
        image_of_object = torch.repeat_interleave(
            torch.arange(n_images, device=device), counts, output_size=n_objects
        )
        pairs = pairs[torch.argsort(image_of_object, descending=True, stable=True)]
        counts, values = counts.flip(0), values[::-1]

        host = self._host
        slot_head, image_head = host.slot_head, host.image_head
        self._write_ring(self.centroids, 1, slot_head, pairs.transpose(0, 1))
        # Overwritten entries that held a stored image are evicted; free entries always hold count 0.
        entries = [(image_head + i) % self.queue_size for i in range(n_images)]
        evicted = sum(host.image_count[entry] for entry in entries)
        starts = (_exclusive_cumsum(counts) + slot_head) % self.capacity
        self._write_ring(self.image_start, 0, image_head, starts)
        self._write_ring(self.image_count, 0, image_head, counts)
        for entry, count in zip(entries, values, strict=True):
            host.image_count[entry] = count

        host.slot_head = (slot_head + n_objects) % self.capacity
        host.image_head = (image_head + n_images) % self.queue_size
        host.stored_objects = host.stored_objects - evicted + n_objects
        host.stored_images = min(self.queue_size, host.stored_images + n_images)
        self.slot_head.fill_(host.slot_head)
        self.image_head.fill_(host.image_head)
        self.stored_objects.fill_(host.stored_objects)
        self.stored_images.fill_(host.stored_images)

    @staticmethod
    def _write_ring(ring: torch.Tensor, dim: int, head: int, values: torch.Tensor) -> None:
        """``ring[(head + i) % len] = values[i]`` along ``dim``: one slice copy, or two where it wraps."""
        length, count = ring.shape[dim], values.shape[dim]
        first = min(count, length - head)
        ring.narrow(dim, head, first).copy_(values.narrow(dim, 0, first))
        if first < count:
            ring.narrow(dim, 0, count - first).copy_(values.narrow(dim, first, count - first))

    def _overflow_subset(
        self, pairs: torch.Tensor, counts: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep Q of the G > Q gathered images, drawn uniformly by a generator seeded with (seed, step)."""
        n_gathered = counts.numel()
        logger.warning(
            "Memory bank overflow: %d images gathered in one step but queue_size is %d; keeping a random "
            "subset of %d. Increase --queue_size above batch_size_per_gpu * world_size.",
            n_gathered,
            self.queue_size,
            self.queue_size,
        )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        keep = torch.randperm(n_gathered, generator=generator)[: self.queue_size].sort().values
        keep_image = torch.zeros(n_gathered, dtype=torch.bool)
        keep_image[keep] = True
        keep_image = keep_image.to(counts.device)
        keep_object = torch.repeat_interleave(keep_image, counts, output_size=pairs.shape[0])
        return pairs[keep_object], counts[keep_image]

    # ------------------------------------------------------------------ reading

    def _entries_newest_first(self) -> torch.Tensor:
        """(num_images,) image-ring entries from the newest to the oldest stored image."""
        n = self.num_images
        return (self._host.image_head - 1 - torch.arange(n, device=self.image_count.device)) % self.queue_size

    def valid_slots(self) -> torch.Tensor:
        """(num_objects,) slot indices of the valid objects, newest image first, clusters ascending."""
        entries = self._entries_newest_first()
        return _block_indices(self.image_start[entries], self.image_count[entries]) % self.capacity

    def view(self, v: int) -> torch.Tensor:
        """A copy of the valid objects of view ``v`` (1 or 2), newest image first: (num_objects, D).

        Meant for inspection and tests; retrieval uses ``iter_chunks``, which copies nothing.
        """
        if v not in (1, 2):
            raise ValueError(f"CentroidMemoryBank.view: view must be 1 or 2, got {v}.")
        return self.centroids[v - 1, self.valid_slots()]

    def counts_newest_first(self) -> torch.Tensor:
        """(num_images,) long objects per stored image, newest first."""
        return self.image_count[self._entries_newest_first()]

    def iter_chunks(self, chunk_size: int) -> Iterator[BankChunk]:
        """Iterate over the valid slots in runs of at most ``chunk_size`` contiguous slots.

        The valid objects form one cyclic slot range ending at ``slot_head``, so every chunk is a plain
        slice (a view, no copy). Chunks come in slot order (oldest first); ties in a search over them are
        therefore broken towards older slots when the comparison is strict.

        Args:
            chunk_size: maximum number of slots per chunk (>= 1).

        Yields:
            ``BankChunk(slots (n,), view1 (n, D), view2 (n, D))``.
        """
        for start, stop in self.chunk_ranges(chunk_size):
            yield BankChunk(
                slots=torch.arange(start, stop, device=self.centroids.device),
                view1=self.centroids[0, start:stop],
                view2=self.centroids[1, start:stop],
            )

    def chunk_ranges(self, chunk_size: int) -> list[tuple[int, int]]:
        """The slot ranges ``[start, stop)`` of :meth:`iter_chunks`, in the same order (no tensor made).

        Args:
            chunk_size: maximum number of slots per range (>= 1).

        Returns:
            ``[(start, stop), ...]``, oldest slots first.
        """
        if chunk_size < 1:
            raise ValueError(f"CentroidMemoryBank.iter_chunks: chunk_size must be >= 1, got {chunk_size}.")
        n_valid = self.num_objects
        first = (self._host.slot_head - n_valid) % self.capacity
        runs = [(first, min(n_valid, self.capacity - first))]
        if runs[0][1] < n_valid:
            runs.append((0, n_valid - runs[0][1]))
        return [
            (start, min(start + chunk_size, run_start + run_length))
            for run_start, run_length in runs
            for start in range(run_start, run_start + run_length, chunk_size)
        ]

    def slot_range(self, start: int, stop: int) -> torch.Tensor:
        """Both views of the slots ``[start, stop)``: a (2, stop - start, D) view of the storage, no copy."""
        return self.centroids[:, start:stop]

    def gather_views(self, indices: torch.Tensor) -> torch.Tensor:
        """View 1's rows at ``indices[0]`` and view 2's at ``indices[1]``, in one gather.

        Args:
            indices: (2, n) long slot indices.

        Returns:
            (2, n, D) raw rows.
        """
        views = torch.arange(2, device=self.centroids.device).unsqueeze(1)
        return self.centroids[views, indices.to(self.centroids.device)]

    def gather_slots(self, view: int, indices: torch.Tensor) -> torch.Tensor:
        """Raw representations of view ``view`` (1 or 2) at slot ``indices``.

        Args:
            view: 1 or 2.
            indices: (n,) long slot indices (from ``iter_chunks`` / ``valid_slots``).

        Returns:
            (n, D) raw (un-normalised) rows.
        """
        if view not in (1, 2):
            raise ValueError(f"CentroidMemoryBank.gather_slots: view must be 1 or 2, got {view}.")
        return self.centroids[view - 1].index_select(0, indices.to(self.centroids.device))

    # ------------------------------------------------------------------ reference layout

    def to_reference_layout(self) -> dict[str, torch.Tensor]:
        """The bank in the reference checkpoint layout (docs/method.md, Sec. 7 and 10).

        Returns:
            ``{"centroids_queue_cpu": (2, K*Q, D) float32, newest image first, valid objects contiguous
            from slot 0, zeros after them; "cpv_queue_cpu": (Q,) long objects per image, newest first,
            zeros for empty entries}``, on the CPU.
        """
        slots = self.valid_slots()
        centroids = torch.zeros(2, self.capacity, self.dim, dtype=self.centroids.dtype)
        centroids[:, : slots.numel()] = self.centroids[:, slots].cpu()
        cpv = torch.zeros(self.queue_size, dtype=torch.long)
        cpv[: self.num_images] = self.counts_newest_first().cpu()
        return {"centroids_queue_cpu": centroids, "cpv_queue_cpu": cpv}

    @torch.no_grad()
    def load_reference_layout(self, state: dict[str, torch.Tensor], num_images: int | None = None) -> None:
        """Fill the bank from a reference-layout dict (ours or the official checkpoint's).

        ``cpv_queue_cpu`` is trusted: the stored images are the entries up to the last non-zero count
        (trailing zeros are empty entries), and the valid objects are the first ``sum(cpv)`` slots. The
        reference's random-initialised bank (every count K) therefore loads as Q full images. The step
        counter is left unchanged.

        Args:
            state: ``{"centroids_queue_cpu": (2, K*Q, D), "cpv_queue_cpu": (Q,) integer}``.
            num_images: the number of stored images when known (our checkpoints record it), so that the
                oldest images that contributed no object are restored as stored rather than empty.

        Raises:
            KeyError: a key is missing.
            ValueError: shapes do not match this bank's (queue_size, n_tokens, dim) or the counts are
                outside [0, K].
        """
        for key in ("centroids_queue_cpu", "cpv_queue_cpu"):
            if key not in state:
                raise KeyError(f"load_reference_layout: key {key!r} missing (found {sorted(state)}).")
        centroids, cpv = state["centroids_queue_cpu"], state["cpv_queue_cpu"]
        if tuple(centroids.shape) != (2, self.capacity, self.dim) or tuple(cpv.shape) != (self.queue_size,):
            raise ValueError(
                f"load_reference_layout: got centroids {tuple(centroids.shape)} and cpv {tuple(cpv.shape)}, "
                f"expected (2, {self.capacity}, {self.dim}) and ({self.queue_size},) for queue_size="
                f"{self.queue_size}, n_tokens={self.n_tokens}; set --queue_size/--n_tokens/--arch as in the "
                "run that wrote the checkpoint."
            )
        cpv = cpv.to(torch.long)
        if int(cpv.min()) < 0 or int(cpv.max()) > self.n_tokens:
            raise ValueError(f"load_reference_layout: counts must lie in [0, {self.n_tokens}].")
        nonzero = torch.nonzero(cpv).flatten()
        n_images = int(nonzero[-1]) + 1 if nonzero.numel() else 0
        if num_images is not None:
            if not n_images <= num_images <= self.queue_size:
                raise ValueError(
                    f"load_reference_layout: num_images={num_images} is inconsistent with the counts."
                )
            n_images = num_images
        counts_newest_first = cpv[:n_images]
        n_objects = int(counts_newest_first.sum())

        # Ring positions 0..n_images-1 hold the images oldest -> newest; each image keeps its block.
        counts = counts_newest_first.flip(0)
        reference_starts = _exclusive_cumsum(counts_newest_first).flip(0)
        source = _block_indices(reference_starts, counts)
        self.reset()
        device = self.centroids.device
        self.centroids[:, :n_objects] = centroids[:, source].to(device=device, dtype=self.centroids.dtype)
        self.image_start[:n_images] = _exclusive_cumsum(counts).to(device)
        self.image_count[:n_images] = counts.to(device)
        self.slot_head.fill_(n_objects % self.capacity)
        self.image_head.fill_(n_images % self.queue_size)
        self.stored_images.fill_(n_images)
        self.stored_objects.fill_(n_objects)
        self._host_copy = None
