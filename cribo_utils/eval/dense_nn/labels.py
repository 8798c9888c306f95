"""Memory labels: per-patch class histograms, their compact (class, count) storage and rarity sampling.

:func:`patch_class_counts` turns label masks into per-patch histograms (protocol A.3), :class:`PatchLabels`
stores them as L (class id, pixel count) pairs per patch, and :func:`select_memory_patches` picks the
patches a bounded memory keeps (rarity scores, A.3.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


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
