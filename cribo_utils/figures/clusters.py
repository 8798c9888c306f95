"""Figure 1, ``clusters``: two augmented views of each image and the teacher's joint clustering.

:func:`cluster_image_views` runs the teacher side of the training step on CrIBo's two views
(:func:`make_two_views`); :func:`plot_clusters` draws each view with its clusters overlaid
(:func:`overlay_clusters`), one colour per cluster in both views, grey for clusters of one view only.
:func:`highlight_object` is the single-object picture the neighbours figure draws.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from cribo_utils.figures.drawing import (
    DEFAULT_DPI,
    IMAGE_PANEL,
    _finish_layout,
    _frame,
    _new_grid,
    _save,
    _show,
    blend,
    colour_cluster_labels,
    label_boundaries,
    upsample_patch_grid,
)
from cribo_utils.figures.model import _check_image_size, _device_of, _patch_size, _seeded

if TYPE_CHECKING:
    from data.transforms import CropBox
    from models.vision_transformer import VisionTransformer


@dataclass
class ClusteredViews:
    """Two augmented views of B images and the teacher's joint clustering of their patch tokens.

    Attributes:
        pictures: (B, 2, S, S, 3) uint8, the views exactly as the network saw them.
        boxes: per image, the two crop boxes (original-image pixels) and flip flags.
        positions1, positions2: (B, 2, N) patch-centre coordinates of each view.
        tokens1, tokens2: (B, N, D) teacher patch tokens (post-LayerNorm).
        labels1, labels2: (B, h, w) long hard cluster id of every patch of each view.
        valid: (B, K) bool, clusters with members in both views.
        objects1, objects2: (M, D) per-view object representations of the valid clusters.
        object_ids: (M, 2) long (image, cluster) of every object row, image by image, cluster ascending.
        patch_size: p.
    """

    pictures: np.ndarray
    boxes: list[tuple[tuple[CropBox, bool], tuple[CropBox, bool]]]
    positions1: Tensor
    positions2: Tensor
    tokens1: Tensor
    tokens2: Tensor
    labels1: Tensor
    labels2: Tensor
    valid: Tensor
    objects1: Tensor
    objects2: Tensor
    object_ids: Tensor
    patch_size: int

    @property
    def n_clusters(self) -> int:
        return int(self.valid.shape[1])

    def view_labels(self, view: int) -> Tensor:
        """(B, h, w) labels of view 1 or 2."""
        return self.labels1 if view == 1 else self.labels2


def make_two_views(
    images: Sequence[Image.Image],
    image_size: int,
    patch_size: int,
    seed: int = 0,
    photometric: bool = False,
    crop_scale: tuple[float, float] = (0.25, 1.0),
) -> tuple[Tensor, Tensor, Tensor, Tensor, np.ndarray, list[Any]]:
    """Draw CrIBo's two global views of every image with :class:`data.augmentations.TwoViewTransform`.

    The crop, flip and patch-centre coordinates are the training ones; the colour pipeline of each
    view is applied only with ``photometric`` (off by default, so the figures show the scene itself).

    Returns:
        ``(crops1 (B, 3, S, S), crops2, positions1 (B, 2, N), positions2, pictures (B, 2, S, S, 3) uint8,
        boxes)``.
    """
    from data.augmentations import TwoViewTransform

    _check_image_size(image_size, patch_size)
    transform = TwoViewTransform(image_size=image_size, patch_size=patch_size, global_crops_scale=crop_scale)
    crops: list[list[Tensor]] = [[], []]
    positions: list[list[Tensor]] = [[], []]
    pictures, boxes = [], []
    with _seeded(seed):
        for image in images:
            image = image.convert("RGB")
            per_view = []
            for view in range(2):
                box, flipped = transform.global_crop.sample(image)
                picture = transform.global_crop.apply(image, box, flipped)
                if photometric:
                    picture = transform.global_photometric[view](picture)
                crops[view].append(transform.to_tensor(picture))
                positions[view].append(transform.global_crop.positions(box, flipped))
                per_view.append(np.asarray(picture, dtype=np.uint8))
                boxes.append((box, flipped))
            pictures.append(np.stack(per_view))
    paired_boxes = list(zip(boxes[0::2], boxes[1::2], strict=True))
    return (
        torch.stack(crops[0]),
        torch.stack(crops[1]),
        torch.stack(positions[0]),
        torch.stack(positions[1]),
        np.stack(pictures),
        paired_boxes,
    )


@torch.no_grad()
def cluster_image_views(
    backbone: VisionTransformer,
    images: Sequence[Image.Image],
    image_size: int,
    n_clusters: int,
    pos_alpha: float,
    seed: int = 0,
    photometric: bool = False,
    batch_size: int = 16,
) -> ClusteredViews:
    """Two views per image, teacher patch tokens, joint clustering and object representations.

    The same computation as the training step (docs/method.md, Sec. 1, teacher side):
    ``T_tok = teacher([x1; x2])``, ``A, valid = joint_cluster(T_tok, pos1, pos2, alpha)``,
    ``c^v = object_representations(T_tok^v, A_v, valid)``; batched over ``batch_size`` images, with
    per-image cost normalisation so batching changes nothing.

    Args:
        backbone: eval-mode ViT.
        images: B PIL images.
        image_size: S, side of the views (multiple of the patch size).
        n_clusters: K (``--n_tokens``).
        pos_alpha: weight of the positional cost.
        seed: seed of the crops and of the cluster seeds.
        photometric: also apply the training colour augmentation.
        batch_size: images per forward pass.
    Returns:
        :class:`ClusteredViews`.
    """
    from cribo_utils.method.clustering import joint_cluster, object_representations

    if not images:
        raise ValueError("cluster_image_views: no images given")
    patch_size = _patch_size(backbone)
    device = _device_of(backbone)
    crops1, crops2, positions1, positions2, pictures, boxes = make_two_views(
        images, image_size, patch_size, seed=seed, photometric=photometric
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    names = ("tokens1", "tokens2", "labels", "valid", "objects1", "objects2")
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        views = torch.cat([crops1[start:stop], crops2[start:stop]]).to(device)
        _, tokens = backbone.forward_features(views)
        tokens1, tokens2 = tokens.float().split(views.shape[0] // 2)
        clusters = joint_cluster(
            tokens1,
            tokens2,
            positions1[start:stop].to(device),
            positions2[start:stop].to(device),
            n_clusters=n_clusters,
            alpha=pos_alpha,
            generator=generator,
        )
        # Objects of a chunk come image by image, so concatenating the chunks keeps the global order.
        for name, value in zip(
            names,
            (
                tokens1,
                tokens2,
                clusters.labels,
                clusters.valid,
                object_representations(tokens1, clusters.assign1, clusters.valid),
                object_representations(tokens2, clusters.assign2, clusters.valid),
            ),
            strict=True,
        ):
            parts[name].append(value)
    merged = {name: torch.cat(values) for name, values in parts.items()}
    side = image_size // patch_size
    labels = merged["labels"]
    return ClusteredViews(
        pictures=pictures,
        boxes=boxes,
        positions1=positions1,
        positions2=positions2,
        tokens1=merged["tokens1"],
        tokens2=merged["tokens2"],
        labels1=rearrange(labels[:, : side * side], "b (h w) -> b h w", h=side),
        labels2=rearrange(labels[:, side * side :], "b (h w) -> b h w", h=side),
        valid=merged["valid"],
        objects1=merged["objects1"],
        objects2=merged["objects2"],
        object_ids=merged["valid"].nonzero(),
        patch_size=patch_size,
    )


def overlay_clusters(
    picture: np.ndarray, labels: np.ndarray, valid: np.ndarray, patch_size: int, opacity: float = 0.55
) -> np.ndarray:
    """A view with its cluster map (patch resolution) blended on top and cluster borders darkened.

    Args:
        picture: (S, S, 3) uint8 view.
        labels: (h, w) cluster ids of its patches.
        valid: (K,) bool valid clusters (others drawn grey).
        patch_size: p, with S = h p.
    Returns:
        (S, S, 3) uint8.
    """
    pixels = upsample_patch_grid(np.asarray(labels), patch_size)
    out = blend(picture, colour_cluster_labels(pixels, valid), opacity)
    out[label_boundaries(pixels)] = (out[label_boundaries(pixels)] * 0.3).astype(np.uint8)
    return out


def highlight_object(
    picture: np.ndarray, member: np.ndarray, colour: np.ndarray, patch_size: int
) -> np.ndarray:
    """Dim everything outside one object's patches and tint the object with its colour.

    Args:
        picture: (S, S, 3) uint8.
        member: (h, w) bool, the object's patches.
        colour: (3,) uint8.
        patch_size: p.
    Returns:
        (S, S, 3) uint8.
    """
    pixels = upsample_patch_grid(np.asarray(member, dtype=bool), patch_size)
    dimmed = (picture.astype(np.float32) * 0.3).astype(np.uint8)
    tinted = blend(picture, np.broadcast_to(colour, picture.shape), 0.35)
    out = np.where(pixels[..., None], tinted, dimmed)
    out[label_boundaries(pixels.astype(np.int64))] = colour
    return out


# --------------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------------


def plot_clusters(
    backbone: VisionTransformer,
    images: Sequence[Image.Image],
    out_path: str | os.PathLike[str],
    image_size: int,
    n_clusters: int,
    pos_alpha: float = 1.0,
    seed: int = 0,
    photometric: bool = False,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Figure 1: the teacher's joint two-view clustering of each image.

    One row per image: the original image with both crop boxes, then view 1 and view 2 with their
    patch clusters overlaid. A cluster has the same colour in both views; clusters with members in one
    view only (not objects for CrIBo) are grey.

    Args:
        backbone: eval-mode ViT (the teacher's backbone).
        images: PIL images (one row each).
        out_path: PNG to write.
        image_size: side of the views.
        n_clusters: K.
        pos_alpha: positional-cost weight of the clustering.
        seed: crops and cluster seeds.
        photometric: feed the views through the training colour augmentation.
        dpi: resolution (figure is ``3 * 2.5 * dpi`` by ``rows * 2.5 * dpi`` pixels).
    Returns:
        The path written.
    """
    views = cluster_image_views(backbone, images, image_size, n_clusters, pos_alpha, seed, photometric)
    figure, axes = _new_grid(len(images), 3, IMAGE_PANEL, dpi)
    box_colours = ("#00e5ff", "#ff3d00")
    from matplotlib.patches import Rectangle

    for row, image in enumerate(images):
        valid = views.valid[row].cpu().numpy()
        _show(
            axes[row, 0],
            np.asarray(image.convert("RGB")),
            f"image {row}: {int(valid.sum())}/{n_clusters} objects",
        )
        for view in (1, 2):
            box, flipped = views.boxes[row][view - 1]
            axes[row, 0].add_patch(
                Rectangle(
                    (box.left - 0.5, box.top - 0.5),
                    box.width,
                    box.height,
                    fill=False,
                    edgecolor=box_colours[view - 1],
                    linewidth=1.5,
                )
            )
            overlay = overlay_clusters(
                views.pictures[row, view - 1],
                views.view_labels(view)[row].cpu().numpy(),
                valid,
                views.patch_size,
            )
            _show(axes[row, view], overlay, f"view {view}" + (" (flipped)" if flipped else ""))
            _frame(axes[row, view], box_colours[view - 1], 2.0)
    _finish_layout(
        figure,
        "teacher joint clustering (grey: cluster in one view only, discarded)",
        wspace=0.05,
        hspace=0.2,
    )
    return _save(figure, out_path, dpi)
