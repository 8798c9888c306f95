"""Dense nearest-neighbour retrieval evaluation ("Hummingbird", in-context scene understanding).

Protocol: ``dense-nn-protocol.md``, Part A (Balažević et al., NeurIPS 2023; open-hummingbird-eval). The
backbone is frozen; no parameter is trained.

1. **Memory** (A.3). ``augmentation_epochs`` passes over a fixed, seeded subset of the training images
   (``train_fraction``). Each pass crops every image/mask pair with a paired random resized crop to
   ``input_size`` (area fraction U(0.5, 2.0), draws above 1 rejected; aspect (3/4, 4/3)), jitters the
   image only (brightness, contrast, saturation, hue 0.1, each with p = 0.5) and normalises it. Ignore
   pixels (255) are **relabelled as class 0** before any statistics, as open-hummingbird-eval does (for
   VOC this counts unlabelled boundary pixels as background in the memory labels; the synthetic scenes
   have no ignore pixels). For ADE20K in the standard 150-class convention class 0 is "wall", not a
   background, so there the ignore pixels are dropped instead (``ignore_to_background=False``, the
   ``auto`` choice of ``--memory_ignore``). For a patch with pixel set P (|P| = p^2)::

       y_patch[c] = #{i in P : mask_i = c} / p^2                  (a soft label summing to 1, or less
                                                                   when ignore pixels are dropped)

   With a bounded memory of M entries each image keeps ``n = max(1, M // (images * passes))`` of its
   N = S^2 patches: with ``f_c`` = number of patches of the image that contain class c,
   ``score_patch = (sum_{c present in patch} f_c) * u``, ``u ~ U(0, 1)``, and the n lowest scores are kept
   (patches of classes rare within the image are favoured).
2. **Search** (A.4). Inner product on L2-normalised features (= cosine) over a memory **sharded across
   ranks** (:mod:`cribo_utils.sharded_search`: each rank holds ``M / W`` entries, exact top-k merged across
   ranks). The local search is ``torch`` (exact, chunked matrix products and ``topk`` on the evaluation
   device: the GPU of a GPU node; the default), faiss ``exact`` (``IndexFlatIP``, the former reference)
   or faiss ``ivf`` (``IndexIVFFlat``, approximate, for large memories); faiss is an optional extra
   (``pip install cribo[faiss]``). The search returns the similarities, so only the neighbours' labels
   are read.
3. **Label transfer** (A.5). For a query patch q with neighbours j = 1..k::

       w_j = softmax_j(cos(q, x_j) / beta),      y_hat(q) = sum_j w_j y_j            (k = 30, beta = 0.02)

   The (S, S, C) map is upsampled bilinearly to ``input_size`` and the arg-max class is taken per pixel.
4. **Scoring** (A.6). Validation pairs are resized to ``input_size`` (mask nearest); a confusion matrix is
   accumulated per batch (ignore label excluded) and all-reduced; see :mod:`cribo_utils.metrics`.

Data parallelism: the memory items (pass, image) and the validation images are split into global batches
of ``batch_size`` and each rank takes a contiguous run of whole batches, so every image is processed in
the same batch whatever the world size. All randomness of an item is seeded from (seed, pass, image
index), never from the rank or the loader order, and the memory is assembled on every rank in global
item order; results are therefore identical for 1 and W processes.

Memory layout: features are float32, (M / W, D) per rank inside its shard's index only; labels are kept
on every rank (a neighbour may live on any shard) as at most L (class id, pixel count) pairs per patch
(uint8 or int16), L being the largest number of classes in any stored patch, instead of a dense (M, C)
float32 matrix: about 16 bytes per entry against 4 D for the features.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cribo_utils import distributed
from cribo_utils.metrics import ConfusionMatrixAccumulator
from cribo_utils.sharded_search import LocalIndex, ShardedIndex, TorchShardIndex

logger = logging.getLogger(__name__)

INDEX_KINDS = ("torch", "exact", "ivf")
DATASETS = ("synthetic", "voc", "ade20k")
# Default training / validation split names per dataset (open-hummingbird-eval's choices).
DEFAULT_SPLITS: dict[str, tuple[str, str]] = {
    "synthetic": ("train", "val"),
    "voc": ("trainaug", "val"),
    "ade20k": ("training", "validation"),
}
# Host bytes used per prediction chunk when upsampling (C, S, S) maps to (C, H, W).
_UPSAMPLE_BUDGET_BYTES = 256 * 2**20
# Rows of features sent per broadcast when the memory is assembled from the ranks' shards.
_ASSEMBLY_CHUNK_ROWS = 65536
# Expected (class, count) pairs per stored patch, for the RAM estimate made before the labels exist.
_EXPECTED_CLASSES_PER_PATCH = 8


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Patch labels: compact soft labels
# --------------------------------------------------------------------------------------------------


def _smallest_int_dtype(max_value: int) -> torch.dtype:
    """uint8, int16 or int32: the smallest of them holding ``0..max_value``."""
    if max_value <= 255:
        return torch.uint8
    if max_value <= 32767:
        return torch.int16
    return torch.int32


@dataclass
class PatchLabels:
    """Soft labels of M memory patches as L (class id, pixel count) pairs each.

    ``y[m, c] = sum_l [classes[m, l] == c] * counts[m, l] / pixels_per_patch``; unused pairs have count 0.

    Attributes:
        classes: (M, L) class ids, uint8 (C <= 256) or int16.
        counts: (M, L) pixel counts, uint8 (p^2 <= 255) or int16.
        num_classes: C.
        pixels_per_patch: p^2.
    """

    classes: Tensor
    counts: Tensor
    num_classes: int
    pixels_per_patch: int

    @classmethod
    def from_counts(cls, counts: Tensor, pixels_per_patch: int) -> PatchLabels:
        """Compress dense per-class pixel counts, exactly: L = the largest number of classes in a row.

        Args:
            counts: (M, C) integer pixel counts per class.
            pixels_per_patch: p^2 (the row sums).
        Returns:
            The labels, on the device of ``counts``; pairs sorted by decreasing count.
        """
        num_rows, num_classes = counts.shape
        width = max(1, int((counts > 0).sum(1).max())) if num_rows else 1
        values, class_ids = counts.topk(width, dim=1)
        class_ids = torch.where(values > 0, class_ids, torch.zeros_like(class_ids))
        return cls(
            class_ids.to(_smallest_int_dtype(num_classes - 1)),
            values.to(_smallest_int_dtype(pixels_per_patch)),
            num_classes,
            pixels_per_patch,
        )

    @classmethod
    def empty(cls, num_classes: int, pixels_per_patch: int, width: int = 1) -> PatchLabels:
        """Zero rows of width ``width``."""
        return cls(
            torch.zeros(0, width, dtype=_smallest_int_dtype(num_classes - 1)),
            torch.zeros(0, width, dtype=_smallest_int_dtype(pixels_per_patch)),
            num_classes,
            pixels_per_patch,
        )

    @property
    def width(self) -> int:
        """L, the (class, count) pairs per patch."""
        return int(self.classes.shape[1])

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def padded(self, width: int) -> PatchLabels:
        """The same labels with ``width - L`` zero-count pairs appended."""
        extra = width - self.width
        if extra < 0:
            raise ValueError(f"cannot pad labels of width {self.width} to {width}")
        if extra == 0:
            return self
        return PatchLabels(
            F.pad(self.classes, (0, extra)),
            F.pad(self.counts, (0, extra)),
            self.num_classes,
            self.pixels_per_patch,
        )

    @staticmethod
    def concatenate(parts: Sequence[PatchLabels], num_classes: int, pixels_per_patch: int) -> PatchLabels:
        """Row-wise concatenation, padded to the widest part."""
        if not parts:
            return PatchLabels.empty(num_classes, pixels_per_patch)
        width = max(part.width for part in parts)
        padded = [part.padded(width) for part in parts]
        return PatchLabels(
            torch.cat([p.classes for p in padded]),
            torch.cat([p.counts for p in padded]),
            num_classes,
            pixels_per_patch,
        )

    def to(self, device: torch.device | str) -> PatchLabels:
        """The labels on ``device``."""
        return PatchLabels(
            self.classes.to(device), self.counts.to(device), self.num_classes, self.pixels_per_patch
        )

    def to_dense(self) -> Tensor:
        """(M, C) float32 distributions (for tests and small memories only)."""
        dense = torch.zeros(len(self), self.num_classes, dtype=torch.float32, device=self.classes.device)
        dense.scatter_add_(1, self.classes.long(), self.counts.float())
        return dense / self.pixels_per_patch

    def nbytes(self) -> int:
        """Bytes held by the two tensors."""
        return (
            self.classes.numel() * self.classes.element_size()
            + self.counts.numel() * self.counts.element_size()
        )


def patch_class_counts(
    masks: Tensor,
    patch_size: int,
    num_classes: int,
    ignore_index: int = 255,
    ignore_to_background: bool = True,
) -> Tensor:
    """Per-patch class histograms of label masks (protocol A.3).

    ``counts[b, n, c] = #{pixels i of patch n of image b : mask_bi = c}``, patches numbered row-major like
    the ViT tokens. Ignore pixels are counted as class 0 (``ignore_to_background``, the protocol's rule)
    or not counted at all (then rows sum to less than p^2). One ``bincount`` over ``(b * N + n) * C' + c``
    (C' = C + 1 with a discarded bin for dropped pixels), never a (B, H, W, C) one-hot.

    Args:
        masks: (B, H, W) integer class ids, H and W multiples of ``patch_size``.
        patch_size: p.
        num_classes: C.
        ignore_index: the ignore label.
        ignore_to_background: relabel ignore pixels as class 0 instead of dropping them.
    Returns:
        (B, N, C) int64 with N = (H / p) * (W / p).
    """
    masks = masks.long()
    ignored = masks == ignore_index
    masks = torch.where(
        ignored,
        torch.zeros_like(masks) if ignore_to_background else torch.full_like(masks, num_classes),
        masks,
    )
    valid = masks[~ignored]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise ValueError(
            f"training masks must hold class ids in [0, {num_classes}) or the ignore label "
            f"{ignore_index}; found values in [{int(valid.min())}, {int(valid.max())}]. Check the "
            "dataset's class mapping."
        )
    bins = num_classes + 1
    patches = rearrange(masks, "b (h p1) (w p2) -> b (h w) (p1 p2)", p1=patch_size, p2=patch_size)
    batch, num_patches, _ = patches.shape
    offsets = torch.arange(batch * num_patches, device=masks.device).view(batch, num_patches, 1) * bins
    counts = torch.bincount((patches + offsets).reshape(-1), minlength=batch * num_patches * bins)
    return counts.view(batch, num_patches, bins)[..., :num_classes]


def select_memory_patches(counts: Tensor, noise: Tensor, num_keep: int) -> Tensor:
    """Patches kept in a bounded memory: the ``num_keep`` lowest rarity scores per image (protocol A.3.5).

    ``f[b, c] = #{n : counts[b, n, c] > 0}`` (patches of image b containing class c),
    ``score[b, n] = (sum_c [counts[b, n, c] > 0] * f[b, c]) * noise[b, n]``; keep the ``num_keep`` smallest.
    A patch without any counted pixel (only possible when ignore pixels are dropped) scores +inf, so it is
    kept last.

    Args:
        counts: (B, N, C) per-patch class histograms.
        noise: (B, N) uniform noise in [0, 1).
        num_keep: patches kept per image, at most N.
    Returns:
        (B, num_keep) int64 patch indices, ascending within each image.
    """
    num_patches = counts.shape[1]
    if num_keep > num_patches:
        raise ValueError(f"cannot keep {num_keep} patches per image out of {num_patches}")
    present = (counts > 0).float()
    class_frequency = present.sum(1)
    score = torch.einsum("bnc,bc->bn", present, class_frequency) * noise.to(present)
    score = torch.where(present.any(-1), score, torch.full_like(score, math.inf))
    keep = score.topk(num_keep, dim=1, largest=False).indices
    return keep.sort(dim=1).values


# --------------------------------------------------------------------------------------------------
# Memory plan, training subset and RAM check
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """How the memory is filled.

    Attributes:
        num_images: training images used.
        passes: augmentation passes.
        patches_per_image: N = S^2 patches of one crop.
        patches_kept_per_image: n patches kept per (image, pass).
        size: entries in the memory, ``num_images * passes * n``.
    """

    num_images: int
    passes: int
    patches_per_image: int
    patches_kept_per_image: int

    @property
    def size(self) -> int:
        return self.num_images * self.passes * self.patches_kept_per_image


def plan_memory(num_images: int, passes: int, patches_per_image: int, memory_size: int | None) -> MemoryPlan:
    """``n = max(1, M // (images * passes))`` patches per image, or all N when M is None.

    Raises:
        ValueError: when n > N (the memory cannot be filled), naming the flags that fix it.
    """
    if num_images <= 0:
        raise ValueError("the training split is empty: check --data_path and --train_fraction")
    if memory_size is None:
        return MemoryPlan(num_images, passes, patches_per_image, patches_per_image)
    keep = max(1, memory_size // (num_images * passes))
    if keep > patches_per_image:
        needed_passes = math.ceil(memory_size / (num_images * patches_per_image))
        raise ValueError(
            f"--memory_size {memory_size} asks for {keep} patches per image, but a crop has only "
            f"{patches_per_image} patches ({num_images} training images x {passes} passes, see "
            f"--train_fraction and --augmentation_epochs). Use --augmentation_epochs {needed_passes} or "
            f"more, or --memory_size {num_images * passes * patches_per_image} or less."
        )
    return MemoryPlan(num_images, passes, patches_per_image, keep)


def training_subset_size(num_images: int, fraction: float) -> int:
    """Images in the training subset: all for ``fraction >= 1``, else ``max(1, round(fraction n))``."""
    return num_images if fraction >= 1.0 else max(1, round(fraction * num_images))


def training_subset(num_images: int, fraction: float, seed: int) -> Sequence[int]:
    """The fixed training subset: the first :func:`training_subset_size` entries of ``randperm(n, seed)``,
    sorted (``range(n)`` for the full split)."""
    count = training_subset_size(num_images, fraction)
    if count == num_images:
        return range(num_images)
    permutation = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return sorted(permutation[:count].tolist())


def available_memory_bytes() -> int | None:
    """Host memory available to new allocations: /proc/meminfo ``MemAvailable``, else sysconf, else None."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory_bytes(
    size: int,
    dim: int,
    num_classes: int,
    patch_size: int,
    index: str = "exact",
    world_size: int = 1,
    processes_per_node: int = 1,
) -> dict[str, int]:
    """Host bytes the memory needs on one node, before anything is built.

    Per process: its shard of the index (``M / W * D * 4``, plus 8-byte ids for IVF; for ``torch`` on a
    GPU this lives in GPU memory but is counted here anyway), the compact labels of the whole memory
    (``M * L * bytes``, L estimated as ``min(C, p^2, 8)``) and the process's extracted feature shard
    (``M / W * D * 4``); times the processes on the node.

    Returns:
        dict with ``features``, ``labels``, ``index`` (per process) and ``total`` (per node) in bytes.
    """
    width = min(num_classes, patch_size**2, _EXPECTED_CLASSES_PER_PATCH)
    label_bytes = (
        size
        * width
        * (_smallest_int_dtype(num_classes - 1).itemsize + _smallest_int_dtype(patch_size**2).itemsize)
    )
    shard_rows = math.ceil(size / world_size)
    index_bytes = shard_rows * dim * 4 + (shard_rows * 8 if index == "ivf" else 0)
    shard_bytes = shard_rows * dim * 4
    total = processes_per_node * (index_bytes + label_bytes + shard_bytes)
    return {"features": shard_bytes, "labels": label_bytes, "index": index_bytes, "total": total}


def processes_per_node() -> int:
    """Processes on this node: torchrun ``LOCAL_WORLD_SIZE``, SLURM ``SLURM_NTASKS_PER_NODE``, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def check_memory_fits(
    plan: MemoryPlan,
    dim: int,
    num_classes: int,
    patch_size: int,
    index: str,
    requested_size: int | None,
    available: int | None = None,
) -> dict[str, int]:
    """Fail early when the memory would not fit in host RAM.

    Args:
        plan: the memory plan.
        dim: feature width D.
        num_classes: C.
        patch_size: p.
        index: one of ``INDEX_KINDS``.
        requested_size: the ``--memory_size`` flag (for the message).
        available: bytes available (default :func:`available_memory_bytes`).
    Returns:
        The estimate of :func:`estimate_memory_bytes`.
    Raises:
        MemoryError: with both numbers and a ``--memory_size`` that would fit.
    """
    local_processes = processes_per_node()
    estimate = estimate_memory_bytes(
        plan.size, dim, num_classes, patch_size, index, distributed.get_world_size(), local_processes
    )
    available = available_memory_bytes() if available is None else available
    if available is None:
        logger.warning("could not read the available memory; skipping the RAM check of the memory bank")
        return estimate
    if estimate["total"] > available:
        fitting = int(plan.size * 0.8 * available / estimate["total"])
        flag = (
            f"--memory_size {requested_size}"
            if requested_size
            else f"--memory_size unset (every patch: {plan.size})"
        )
        gib = 2.0**30
        raise MemoryError(
            f"{flag}: the dense-NN memory of {plan.size} patches x {dim} dims needs about "
            f"{estimate['total'] / gib:.1f} GiB of RAM on this node ({local_processes} process(es), each "
            f"holding its index shard {estimate['index'] / gib:.1f} GiB + labels "
            f"{estimate['labels'] / gib:.1f} GiB + its feature shard {estimate['features'] / gib:.1f} GiB), "
            f"but only {available / gib:.1f} GiB are available (MemAvailable in /proc/meminfo). Use "
            f"--memory_size {max(1, fitting)} or less, or spread the run over more nodes (each process holds "
            "1/W of the memory; --index ivf needs as much as exact)."
        )
    logger.info(
        "memory bank: %d entries, about %.2f GiB of %.2f GiB available",
        plan.size,
        estimate["total"] / 2**30,
        available / 2**30,
    )
    return estimate


# --------------------------------------------------------------------------------------------------
# Datasets with per-item seeded augmentation
# --------------------------------------------------------------------------------------------------


def item_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (the same in every process): NumPy's SeedSequence."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


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
        seed = item_seed(self.seed, epoch, index)
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


def shard_range(num_items: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous run of whole global batches: items ``[start, stop)``.

    Batch b covers items ``[b B, (b + 1) B)``; rank r takes batches ``[r nb / W, (r + 1) nb / W)``.
    """
    num_batches = math.ceil(num_items / batch_size)
    first = rank * num_batches // world_size
    last = (rank + 1) * num_batches // world_size
    return min(first * batch_size, num_items), min(last * batch_size, num_items)


def _shard_loader(dataset: Any, cfg: DenseNNConfig, device: torch.device) -> DataLoader:
    start, stop = shard_range(
        len(dataset), cfg.batch_size, distributed.get_rank(), distributed.get_world_size()
    )
    return DataLoader(
        torch.utils.data.Subset(dataset, range(start, stop)),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def _progress(loader: DataLoader, cfg: DenseNNConfig, description: str) -> Any:
    """Iterate ``loader`` with a throughput/ETA line on rank 0 (plain periodic lines when not a terminal)."""
    if not (cfg.progress and distributed.is_main_process()):
        return loader
    from cribo_utils.progress import Progress

    def iterate() -> Any:
        progress = Progress(len(loader), description, items_per_step=loader.batch_size or 1)
        for batch in loader:
            yield batch
            progress.update(1)
        progress.close()

    return iterate()


# --------------------------------------------------------------------------------------------------
# Features and the faiss index
# --------------------------------------------------------------------------------------------------


def backbone_attribute(backbone: nn.Module, name: str) -> int:
    """An integer attribute of the backbone (``embed_dim``, ``patch_size``), with a clear error if missing."""
    value = getattr(backbone, name, None)
    if value is None:
        raise AttributeError(
            f"the backbone ({type(backbone).__name__}) has no `{name}`; the dense-NN evaluation expects a "
            "backbone of models/ (ViT, ResNet-50, ConvNeXt) or a module with `embed_dim`, `patch_size` "
            "(the dense grid's stride) and `forward_features`"
        )
    return int(value)


def dense_feature_dim(backbone: nn.Module) -> int:
    """Width of the dense grid: ``dense_dim`` (a conv net's chosen stage), else ``embed_dim``."""
    value = getattr(backbone, "dense_dim", None)
    return int(value) if value is not None else backbone_attribute(backbone, "embed_dim")


def patch_features(backbone: nn.Module, images: Tensor, patch_size: int) -> Tensor:
    """L2-normalised last-layer patch tokens (after the final norm) of ``backbone.forward_features``.

    Args:
        backbone: a ViT with ``forward_features(x) -> ((B, D) cls, (B, N, D) patches)``.
        images: (B, 3, H, W).
        patch_size: p, to check N = (H / p) (W / p).
    Returns:
        (B, N, D) float32 unit vectors.
    """
    forward_features = getattr(backbone, "forward_features", None)
    if not callable(forward_features):
        raise AttributeError(f"the backbone ({type(backbone).__name__}) has no `forward_features` method")
    _, patches = forward_features(images)
    expected = (images.shape[-2] // patch_size) * (images.shape[-1] // patch_size)
    if patches.ndim != 3 or patches.shape[1] != expected:
        raise ValueError(
            f"backbone.forward_features returned patch tokens of shape {tuple(patches.shape)}; "
            f"expected (B, {expected}, D) for {images.shape[-2]}x{images.shape[-1]} inputs and "
            f"--patch_size {patch_size}. Check --patch_size against the checkpoint."
        )
    return F.normalize(patches.float(), dim=-1)


def _import_faiss() -> Any:
    # faiss logs every instruction-set variant it fails to load at INFO level; only its warnings matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "--index exact / ivf need faiss, an optional extra: pip install faiss-cpu (or cribo[faiss]); "
            "--index torch (the default) needs nothing else"
        ) from error
    return faiss


def default_nlist(size: int) -> int:
    """IVF lists: ``4 sqrt(M)``, at most ``M / 39`` (faiss wants >= 39 training points per list)."""
    return max(1, min(int(4 * math.sqrt(size)), size // 39))


class PatchIndex:
    """faiss inner-product index over unit-norm memory features: cosine similarity search.

    Args:
        dim: D.
        kind: ``"exact"`` (``IndexFlatIP``) or ``"ivf"`` (``IndexIVFFlat`` with a flat inner-product
            quantiser; needs :meth:`train`).
        nlist: IVF lists.
        nprobe: IVF lists visited per query (clamped to ``nlist``).
    """

    def __init__(self, dim: int, kind: str = "exact", nlist: int = 1, nprobe: int = 1) -> None:
        faiss = _import_faiss()
        self.dim = dim
        self.kind = kind
        self.nlist = nlist
        self.nprobe = min(nprobe, nlist)
        if kind == "exact":
            self.index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            # The IVF index does not own its quantiser: keep a reference so that it outlives the index.
            self.quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(self.quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.nprobe = self.nprobe
        else:
            raise ValueError(f"--index {kind!r} is not one of {', '.join(INDEX_KINDS)}")

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, sample: Tensor) -> None:
        """Train the IVF coarse quantiser (k-means) on (n, D) unit vectors, ``n >= nlist``."""
        if sample.shape[0] < self.nlist:
            raise ValueError(
                f"--nlist {self.nlist} needs at least as many memory entries; the memory has "
                f"{sample.shape[0]}. Lower --nlist or use --index exact."
            )
        self.index.train(np.ascontiguousarray(sample.float().cpu().numpy()))

    def add(self, features: Tensor) -> None:
        """Append (n, D) unit vectors; their ids continue from :meth:`__len__`."""
        if features.shape[0]:
            self.index.add(np.ascontiguousarray(features.float().cpu().numpy()))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k inner products.

        Args:
            queries: (Q, D) unit vectors.
            k: neighbours.
        Returns:
            (similarities (Q, k) float32 descending, ids (Q, k) int64), on the CPU; id -1 where an IVF
            search found fewer than k candidates.
        """
        similarities, ids = self.index.search(np.ascontiguousarray(queries.float().cpu().numpy()), k)
        return torch.from_numpy(similarities), torch.from_numpy(ids)


@dataclass
class DenseMemory:
    """The searchable memory: the index (features), the labels in the same order, and the plan."""

    index: ShardedIndex
    labels: PatchLabels
    plan: MemoryPlan
    image_indices: Sequence[int] = ()

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class MemoryShard:
    """This rank's part of the memory, in global item order: features (m, D) float32 and labels (m, L)."""

    features: Tensor
    labels: PatchLabels


# --------------------------------------------------------------------------------------------------
# Building the memory
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_memory_shard(
    backbone: nn.Module,
    items: MemoryItems,
    plan: MemoryPlan,
    patch_size: int,
    num_classes: int,
    cfg: DenseNNConfig,
    device: torch.device,
) -> MemoryShard:
    """Features and labels of this rank's memory items (a contiguous run of whole global batches).

    Args:
        backbone: eval-mode ViT.
        items: the (pass, image) items.
        plan: memory plan (patches kept per item).
        patch_size: p.
        num_classes: C.
        cfg: protocol parameters.
        device: compute device.
    Returns:
        The shard, on the CPU; row ``t * n + j`` is the j-th kept patch of the t-th local item.
    """
    loader = _shard_loader(items, cfg, device)
    num_local = len(loader.dataset)  # type: ignore[arg-type]
    keep = plan.patches_kept_per_image
    dim = dense_feature_dim(backbone)
    features = torch.empty(num_local * keep, dim, dtype=torch.float32)
    label_parts: list[PatchLabels] = []
    row = 0
    for images, masks, noise in _progress(loader, cfg, "dense-NN memory"):
        images, masks, noise = images.to(device, non_blocking=True), masks.to(device), noise.to(device)
        tokens = patch_features(backbone, images, patch_size)
        counts = patch_class_counts(
            masks, patch_size, num_classes, cfg.ignore_index, cfg.ignore_to_background
        )
        if keep < plan.patches_per_image:
            chosen = select_memory_patches(counts, noise, keep)
            tokens = tokens.gather(1, chosen.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            counts = counts.gather(1, chosen.unsqueeze(-1).expand(-1, -1, counts.shape[-1]))
        rows = tokens.shape[0] * keep
        features[row : row + rows] = tokens.reshape(rows, dim).cpu()
        label_parts.append(
            PatchLabels.from_counts(counts.reshape(rows, num_classes), patch_size**2).to("cpu")
        )
        row += rows
    return MemoryShard(features, PatchLabels.concatenate(label_parts, num_classes, patch_size**2))


def _comm_device() -> torch.device:
    """Device that collectives of the current backend accept (CUDA for NCCL)."""
    if distributed.is_dist() and str(torch.distributed.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank_sizes(local_size: int) -> list[int]:
    sizes = distributed.all_gather_fixed(torch.tensor([local_size], dtype=torch.long, device=_comm_device()))
    return [int(s) for s in sizes.tolist()]


def _broadcast_rows(
    local: Tensor, src: int, start: int, stop: int, dim_shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """Rows ``[start, stop)`` of rank ``src``'s tensor, on every rank (CPU result)."""
    device = _comm_device()
    if distributed.get_rank() == src:
        buffer = local[start:stop].to(device=device, dtype=dtype).contiguous()
    else:
        buffer = torch.empty(stop - start, *dim_shape, dtype=dtype, device=device)
    distributed.broadcast(buffer, src=src)
    return buffer.cpu()


def _ivf_training_sample(shard: MemoryShard, sizes: list[int], nlist: int, seed: int) -> Tensor:
    """A seeded sample of ``min(M, 256 nlist)`` memory rows, in global order, gathered from every rank."""
    total = sum(sizes)
    count = min(total, 256 * nlist)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    offset = sum(sizes[: distributed.get_rank()])
    local_rows = chosen[(chosen >= offset) & (chosen < offset + shard.features.shape[0])] - offset
    local = shard.features[local_rows].to(_comm_device())
    return distributed.all_gather_varlen(local).cpu()


def _local_index(
    shard: MemoryShard, sizes: list[int], cfg: DenseNNConfig, device: torch.device
) -> LocalIndex:
    """This rank's index of its own shard: torch (on ``device``) or faiss (IVF: globally trained lists)."""
    dim = shard.features.shape[1]
    if cfg.index == "torch":
        local: TorchShardIndex | PatchIndex = TorchShardIndex(dim, device)
    else:
        nlist = (cfg.nlist or default_nlist(sum(sizes))) if cfg.index == "ivf" else 1
        local = PatchIndex(dim, cfg.index, nlist, cfg.nprobe)
        if not local.is_trained:
            # Every rank trains the same quantiser on the same global sample, so the lists agree.
            local.train(_ivf_training_sample(shard, sizes, nlist, cfg.seed))
    for start in range(0, shard.features.shape[0], _ASSEMBLY_CHUNK_ROWS):
        local.add(shard.features[start : start + _ASSEMBLY_CHUNK_ROWS])
    return local


def _all_labels(labels: PatchLabels, sizes: list[int]) -> PatchLabels:
    """The labels of the whole memory on every rank, in global order (each rank's rows broadcast)."""
    if distributed.get_world_size() == 1:
        return labels
    width = labels.width
    class_parts, count_parts = [], []
    for src, size in enumerate(sizes):
        for start in range(0, size, _ASSEMBLY_CHUNK_ROWS):
            stop = min(size, start + _ASSEMBLY_CHUNK_ROWS)
            # int32 on the wire: gloo and NCCL do not all support int16.
            class_parts.append(_broadcast_rows(labels.classes, src, start, stop, (width,), torch.int32))
            count_parts.append(_broadcast_rows(labels.counts, src, start, stop, (width,), torch.int32))
    classes = torch.cat(class_parts) if class_parts else labels.classes.int()
    counts = torch.cat(count_parts) if count_parts else labels.counts.int()
    return PatchLabels(
        classes.to(labels.classes.dtype),
        counts.to(labels.counts.dtype),
        labels.num_classes,
        labels.pixels_per_patch,
    )


def assemble_memory(
    shard: MemoryShard,
    plan: MemoryPlan,
    cfg: DenseNNConfig,
    device: torch.device,
    image_indices: Sequence[int] = (),
) -> DenseMemory:
    """Index this rank's shard and gather the label table of the whole memory, in global item order.

    The features stay sharded: rank r indexes only its own rows ``[offset_r, offset_r + m_r)`` (its
    extracted items, contiguous in global order) and searches go through
    :class:`cribo_utils.sharded_search.ShardedIndex`. The labels (a few bytes per entry) are broadcast so
    that every rank can read the labels of neighbours found on any shard. For IVF the quantiser is trained
    on a seeded sample of the whole memory, identical on every rank.

    Args:
        shard: this rank's features and labels.
        plan: memory plan.
        cfg: protocol parameters (index kind, nlist, nprobe, seed).
        device: where the torch index and the label table are kept (the queries' device).
        image_indices: training images used (recorded).
    Returns:
        The memory.
    """
    sizes = _rank_sizes(shard.features.shape[0])
    width = max(_rank_sizes(shard.labels.width))
    local = _local_index(shard, sizes, cfg, device)
    all_labels = _all_labels(shard.labels.padded(width), sizes)
    index = ShardedIndex(local, sizes, _comm_device())
    logger.info(
        "dense-NN memory shard of rank %d: rows [%d, %d) of %d (%s index)",
        distributed.get_rank(),
        index.offset,
        index.offset + len(local),
        len(index),
        cfg.index,
    )
    return DenseMemory(index, all_labels.to(device), plan, image_indices)


def build_memory(
    backbone: nn.Module,
    train_dataset: Any,
    cfg: DenseNNConfig,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> DenseMemory:
    """Check the plan and the RAM, extract this rank's memory items, then assemble the whole memory.

    Args:
        backbone: eval-mode ViT with ``embed_dim``, ``patch_size`` and ``forward_features``.
        train_dataset: yields (PIL image, PIL mask) pairs with class ids in [0, C) or ``cfg.ignore_index``.
        cfg: protocol parameters.
        num_classes: C.
        device: compute device.
    Returns:
        The memory, identical on every rank.
    Raises:
        ValueError: for inconsistent flags (before any work).
        MemoryError: when the memory would not fit in RAM (before any work).
    """
    device = torch.device(device)
    patch_size = backbone_attribute(backbone, "patch_size")
    cfg.validate(patch_size)
    side = cfg.input_size // patch_size
    num_images = training_subset_size(len(train_dataset), cfg.train_fraction)
    plan = plan_memory(num_images, cfg.augmentation_epochs, side * side, cfg.memory_size)
    check_memory_fits(plan, dense_feature_dim(backbone), num_classes, patch_size, cfg.index, cfg.memory_size)
    image_indices = training_subset(len(train_dataset), cfg.train_fraction, cfg.seed)
    items = MemoryItems(
        train_dataset, image_indices, cfg.augmentation_epochs, memory_transform(cfg), side * side, cfg.seed
    )
    backbone.eval()
    start_time = time.perf_counter()
    shard = extract_memory_shard(backbone, items, plan, patch_size, num_classes, cfg, device)
    memory = assemble_memory(shard, plan, cfg, device, image_indices)
    logger.info(
        "dense-NN memory: %d entries (%d images x %d passes x %d patches), label width %d, %.1f s",
        len(memory),
        plan.num_images,
        plan.passes,
        plan.patches_kept_per_image,
        memory.labels.width,
        time.perf_counter() - start_time,
    )
    return memory


# --------------------------------------------------------------------------------------------------
# Label transfer and prediction
# --------------------------------------------------------------------------------------------------


def transfer_labels(
    similarities: Tensor, neighbour_ids: Tensor, labels: PatchLabels, temperature: float
) -> Tensor:
    """Softmax-weighted average of the neighbours' soft labels (protocol A.5).

    ``w_j = softmax_j(s_j / beta)``, ``y_hat = sum_j w_j y_j``; only the neighbours' labels are read.
    Ids of -1 (an IVF search that found fewer than k candidates) get weight 0.

    Args:
        similarities: (Q, k) cosine similarities.
        neighbour_ids: (Q, k) int64 memory rows.
        labels: memory labels (on the device where the result is wanted).
        temperature: beta.
    Returns:
        (Q, C) float32 class distributions (rows sum to 1; all zeros where no neighbour was found).
    """
    device = labels.classes.device
    similarities = similarities.to(device=device, dtype=torch.float32)
    neighbour_ids = neighbour_ids.to(device)
    found = neighbour_ids >= 0
    logits = torch.where(found, similarities / temperature, torch.full_like(similarities, -math.inf))
    weights = torch.softmax(logits, dim=1).nan_to_num(0.0)
    rows = neighbour_ids.clamp_min(0)
    classes = labels.classes[rows].long()
    fractions = labels.counts[rows].float() / labels.pixels_per_patch
    contributions = weights.unsqueeze(-1) * fractions
    prediction = torch.zeros(rows.shape[0], labels.num_classes, dtype=torch.float32, device=device)
    return prediction.scatter_add_(1, classes.flatten(1), contributions.flatten(1))


def upsample_argmax(patch_predictions: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (B, C, S, S) class distributions to ``size``, then the arg-max per pixel.

    Processed in chunks of images so that the (chunk, C, H, W) float map stays below 256 MiB.

    Returns:
        (B, H, W) int64.
    """
    batch, num_classes = patch_predictions.shape[:2]
    chunk = max(1, _UPSAMPLE_BUDGET_BYTES // (num_classes * size[0] * size[1] * 4))
    out = [
        F.interpolate(part, size=size, mode="bilinear", align_corners=False).argmax(1)
        for part in patch_predictions.split(chunk)
    ]
    return torch.cat(out) if out else patch_predictions.new_zeros((0, *size), dtype=torch.long)


@torch.no_grad()
def predict(backbone: nn.Module, images: Tensor, memory: DenseMemory, cfg: DenseNNConfig) -> Tensor:
    """Per-pixel class predictions of a batch of images by nearest-neighbour label transfer.

    Args:
        backbone: eval-mode backbone (ViT or conv net: its dense grid of stride p).
        images: (B, 3, H, W) normalised, H and W multiples of p.
        memory: the memory (the search is a collective over the ranks holding its shards).
        cfg: ``num_neighbours`` (k) and ``temperature`` (beta).
    Returns:
        (B, H, W) int64 class ids.
    """
    patch_size = backbone_attribute(backbone, "patch_size")
    batch, _, height, width = images.shape
    queries = patch_features(backbone, images, patch_size)
    k = min(cfg.num_neighbours, len(memory))
    similarities, ids = memory.index.search(queries.reshape(-1, queries.shape[-1]), k)
    distributions = transfer_labels(similarities, ids, memory.labels, cfg.temperature).to(images.device)
    maps = rearrange(distributions, "(b h w) c -> b c h w", b=batch, h=height // patch_size)
    return upsample_argmax(maps, (height, width))


def evaluate_memory(
    backbone: nn.Module,
    memory: DenseMemory,
    val_dataset: Any,
    num_classes: int,
    cfg: DenseNNConfig,
    device: torch.device | str = "cpu",
) -> ConfusionMatrixAccumulator:
    """Predict every validation image of this rank's shard; return the all-reduced confusion matrix.

    Args:
        backbone: eval-mode ViT.
        memory: the memory.
        val_dataset: yields (PIL image, PIL mask) pairs; resized to ``cfg.input_size`` here.
        num_classes: C.
        cfg: protocol parameters.
        device: compute device.
    Returns:
        The accumulator holding the confusion matrix of the whole validation set.
    """
    device = torch.device(device)
    backbone.eval()
    loader = _shard_loader(ResizedPairs(val_dataset, cfg.input_size), cfg, device)
    accumulator = ConfusionMatrixAccumulator(num_classes, cfg.ignore_index, device=_comm_device())
    if len(memory) < cfg.num_neighbours:
        logger.warning(
            "the memory holds only %d entries; using k = %d instead of --num_neighbours %d",
            len(memory),
            len(memory),
            cfg.num_neighbours,
        )
    local_batches = 0
    for images, masks in _progress(loader, cfg, "dense-NN validation"):
        prediction = predict(backbone, images.to(device, non_blocking=True), memory, cfg)
        accumulator.update(prediction, masks.to(prediction.device))
        local_batches += 1
    # The sharded search is a collective: a rank with fewer batches joins the others' remaining searches.
    dim = dense_feature_dim(backbone)
    for _ in range(local_batches, _max_batches_per_rank(len(val_dataset), cfg.batch_size)):
        memory.index.search(torch.zeros(0, dim), min(cfg.num_neighbours, len(memory)))
    accumulator.all_reduce()
    return accumulator


def _max_batches_per_rank(num_items: int, batch_size: int) -> int:
    """The largest number of batches any rank's :func:`shard_range` gives (the same on every rank)."""
    world_size = distributed.get_world_size()
    return max(
        math.ceil((stop - start) / batch_size)
        for start, stop in (
            shard_range(num_items, batch_size, rank, world_size) for rank in range(world_size)
        )
    )


def dataset_classes(dataset: Any) -> tuple[int, list[str]]:
    """(C, class names) of a segmentation dataset (``num_classes`` and ``class_names`` attributes)."""
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"{type(dataset).__name__} has no `num_classes`; pass num_classes explicitly")
    names = getattr(dataset, "class_names", None) or [str(c) for c in range(num_classes)]
    return int(num_classes), list(names)


def evaluate_dense_nn(
    backbone: nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    cfg: DenseNNConfig,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The whole protocol: memory from ``train_dataset``, label transfer and mIoU on ``val_dataset``.

    Args:
        backbone: eval-mode ViT (``forward_features``, ``embed_dim``, ``patch_size``).
        train_dataset: yields (PIL image, PIL mask) pairs (no transform; the protocol's is applied here).
        val_dataset: the same for validation.
        cfg: protocol parameters.
        device: compute device.
        num_classes: C (default: ``val_dataset.num_classes``).
        class_names: C names (default: ``val_dataset.class_names``).
    Returns:
        dict with the scores of :func:`cribo_utils.metrics.segmentation_scores` (fractions in [0, 1]; the
        identity class mapping), the confusion matrix, the memory plan and every protocol parameter.
    """
    if num_classes is None:
        num_classes, default_names = dataset_classes(val_dataset)
        class_names = class_names or default_names
    start_time = time.perf_counter()
    memory = build_memory(backbone, train_dataset, cfg, num_classes, device)
    accumulator = evaluate_memory(backbone, memory, val_dataset, num_classes, cfg, device)
    scores = accumulator.compute(class_names, with_hungarian=True)
    plan = memory.plan
    results: dict[str, Any] = {
        **scores,
        "class_mapping": "identity",
        "num_classes": num_classes,
        "num_train_images": plan.num_images,
        "num_val_images": len(val_dataset),
        "patch_size": backbone_attribute(backbone, "patch_size"),
        "patches_per_image": plan.patches_per_image,
        "patches_kept_per_image": plan.patches_kept_per_image,
        "memory_entries": len(memory),
        "label_width": memory.labels.width,
        "memory_ignore_pixels": "class 0" if cfg.ignore_to_background else "dropped",
        "nlist": getattr(memory.index.local, "nlist", None) if cfg.index == "ivf" else None,
        "nprobe_used": getattr(memory.index.local, "nprobe", None) if cfg.index == "ivf" else None,
        "memory_entries_per_rank": memory.index.shard_sizes,
        "world_size": distributed.get_world_size(),
        "seconds": time.perf_counter() - start_time,
        "confusion_matrix": accumulator.confusion.cpu().tolist(),
        "protocol": {**asdict(cfg), "crop_scale": list(cfg.crop_scale), "crop_ratio": list(cfg.crop_ratio)},
    }
    logger.info(
        "dense-NN retrieval: mIoU %.2f (present classes %.2f), pixel accuracy %.2f over %d images",
        100 * results["miou"],
        100 * results["miou_present"],
        100 * results["pixel_accuracy"],
        len(val_dataset),
    )
    return results


# --------------------------------------------------------------------------------------------------
# Launcher entry point
# --------------------------------------------------------------------------------------------------


def build_datasets(args: Any) -> tuple[Any, Any]:
    """(train, val) segmentation datasets yielding (PIL image, PIL mask) pairs, from the flags."""
    default_train, default_val = DEFAULT_SPLITS[args.dataset]
    train_split = args.train_split or default_train
    val_split = args.val_split or default_val
    if args.dataset != "synthetic" and not args.data_path:
        raise ValueError(
            f"--dataset {args.dataset} needs --data_path (see dense-nn-protocol.md A.7 for the "
            "folder layouts)"
        )
    from data.datasets import build_segmentation_dataset

    synthetic_kwargs = None
    if args.dataset == "synthetic":
        synthetic_kwargs = dict(
            image_size=args.synthetic_image_size,
            num_train=args.synthetic_num_train,
            num_val=args.synthetic_num_val,
            seed=args.synthetic_seed,
            object_colours=args.synthetic_object_colours,
            level=args.synthetic_level,
        )
    return (
        build_segmentation_dataset(args.dataset, args.data_path, train_split, None, synthetic_kwargs),
        build_segmentation_dataset(args.dataset, args.data_path, val_split, None, synthetic_kwargs),
    )


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
    """``<checkpoint dir>/eval_dense_nn.json``, or ``./eval_dense_nn.json`` for a random network."""
    if pretrained_weights:
        return os.path.join(os.path.dirname(os.path.abspath(pretrained_weights)), "eval_dense_nn.json")
    return os.path.abspath("eval_dense_nn.json")


def run_dense_nn(args: Any) -> dict[str, Any]:
    """Run the evaluation described by the flags of ``eval_dense_nn.py`` and write the JSON (rank 0).

    Returns:
        The result dict (on every rank).
    """
    import json

    from cribo_utils.checkpoint_formats import backbone_from_args
    from models import dense_stride

    env = distributed.init_distributed()
    cfg = config_from_args(args)
    # A ViT's patch grid has the stride --patch_size; a conv net's dense grid that of --dense_stage.
    cfg.validate(dense_stride(args.arch, args.patch_size, getattr(args, "dense_stage", 4)))
    torch.manual_seed(args.seed)
    output_json = args.output_json or default_output_json(args.pretrained_weights)
    train_dataset, val_dataset = build_datasets(args)
    num_classes, class_names = dataset_classes(val_dataset)
    backbone = backbone_from_args(args).to(env.device)
    results = evaluate_dense_nn(
        backbone, train_dataset, val_dataset, cfg, env.device, num_classes, class_names
    )
    results.update(
        {
            "dataset": args.dataset,
            "data_path": args.data_path,
            "train_split": args.train_split or DEFAULT_SPLITS[args.dataset][0],
            "val_split": args.val_split or DEFAULT_SPLITS[args.dataset][1],
            "arch": args.arch,
            "pretrained_weights": args.pretrained_weights,
            "checkpoint_key": args.checkpoint_key,
            "random_init": not args.pretrained_weights,
        }
    )
    if args.dataset == "synthetic":
        results["synthetic"] = {
            "image_size": args.synthetic_image_size,
            "num_train": args.synthetic_num_train,
            "num_val": args.synthetic_num_val,
            "seed": args.synthetic_seed,
            "object_colours": args.synthetic_object_colours,
            "level": args.synthetic_level,
        }
    if distributed.is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
        with open(output_json, "w") as handle:
            json.dump(results, handle, indent=2)
        logger.info("wrote %s", output_json)
    distributed.barrier()
    return results
