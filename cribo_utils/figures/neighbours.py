"""Figure 2, ``neighbours``: objects, their nearest objects in a memory bank, and the cycle check.

:func:`build_object_bank` fills a fresh memory bank from other images and remembers where each stored
object came from (:class:`ObjectBank`); :func:`plot_neighbours` retrieves every shown object's nearest
bank object from each view with the cycle-consistency test and draws the pairs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cribo_utils.figures.clusters import ClusteredViews, cluster_image_views, highlight_object
from cribo_utils.figures.drawing import (
    DEFAULT_DPI,
    IMAGE_PANEL,
    _finish_layout,
    _frame,
    _new_grid,
    _save,
    _show,
    cluster_palette,
)

if TYPE_CHECKING:
    from cribo_utils.method.memory_bank import CentroidMemoryBank
    from models.vision_transformer import VisionTransformer


@dataclass
class ObjectBank:
    """A memory bank filled from a set of images, remembering where each stored object came from.

    Attributes:
        bank: the :class:`cribo_utils.method.memory_bank.CentroidMemoryBank` holding the objects.
        views: the clustered views of the bank images.
        slot_image: (K * Q,) long bank image of every slot (-1 for empty slots).
        slot_cluster: (K * Q,) long cluster id of every slot (-1 for empty slots).
    """

    bank: CentroidMemoryBank
    views: ClusteredViews
    slot_image: Tensor
    slot_cluster: Tensor

    def locate(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """(bank image, cluster id) of each slot in ``slots``."""
        slots = slots.to(self.slot_image.device)
        return self.slot_image[slots], self.slot_cluster[slots]


def build_object_bank(
    backbone: VisionTransformer,
    images: Sequence[Image.Image],
    image_size: int,
    n_clusters: int,
    pos_alpha: float,
    seed: int = 0,
    photometric: bool = False,
) -> ObjectBank:
    """Run teacher + clustering over the bank images and push their objects into a fresh memory bank.

    The bank holds Q = ``len(images)`` images, filled by one push of every object (view-1 and view-2
    representations in the same slot), as the training step pushes a batch (docs/method.md, Sec. 7).

    Returns:
        :class:`ObjectBank`, whose ``locate`` maps bank slots back to (image, cluster).
    """
    from cribo_utils.method.memory_bank import CentroidMemoryBank

    views = cluster_image_views(backbone, images, image_size, n_clusters, pos_alpha, seed, photometric)
    bank = CentroidMemoryBank(len(images), n_clusters, views.objects1.shape[1]).to(views.objects1.device)
    bank.push(views.objects1, views.objects2, views.valid.sum(dim=1))
    slots = bank.valid_slots()
    # One push lists its images in order, clusters ascending: slot i of valid_slots is object row i.
    if not torch.equal(bank.view(1), views.objects1) or not torch.equal(bank.view(2), views.objects2):
        raise RuntimeError(
            "build_object_bank: the memory bank does not list one push's objects in push order; "
            "cribo_utils.method.memory_bank changed its layout"
        )
    slot_image = torch.full((bank.capacity,), -1, dtype=torch.long, device=slots.device)
    slot_cluster = slot_image.clone()
    slot_image[slots] = views.object_ids[:, 0].to(slots.device)
    slot_cluster[slots] = views.object_ids[:, 1].to(slots.device)
    return ObjectBank(bank=bank, views=views, slot_image=slot_image, slot_cluster=slot_cluster)


def _largest_objects(views: ClusteredViews, per_image: int) -> list[int]:
    """Object rows to show: per image, the ``per_image`` objects covering most patches (both views)."""
    sizes = torch.stack(
        [F.one_hot(views.view_labels(v).flatten(1), views.n_clusters).sum(1) for v in (1, 2)]
    ).sum(0)
    rows = []
    for image in range(views.valid.shape[0]):
        object_rows = (views.object_ids[:, 0] == image).nonzero().flatten()
        clusters = views.object_ids[object_rows, 1]
        order = sizes[image, clusters].argsort(descending=True, stable=True)
        rows.extend(object_rows[order[:per_image]].tolist())
    return rows


def plot_neighbours(
    backbone: VisionTransformer,
    query_images: Sequence[Image.Image],
    bank_images: Sequence[Image.Image],
    out_path: str | os.PathLike[str],
    image_size: int,
    n_clusters: int,
    pos_alpha: float = 1.0,
    objects_per_image: int = 2,
    seed: int = 0,
    photometric: bool = False,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Figure 2: objects, their nearest objects in a memory bank of other images, and the cycle check.

    The bank is built from ``bank_images`` (:func:`build_object_bank`); the query objects are all valid
    objects of ``query_images``; retrieval is
    :func:`cribo_utils.method.neighbours.find_cycle_consistent_neighbours`
    (docs/method.md, Sec. 8): ``j_v(i) = argmax_r cos(c^v_i, q^v_r)``, accepted if the neighbour's other view
    points back to the query's other view among all current objects. One row per shown object: query
    view 1, its neighbour (bank view 1), query view 2, its neighbour (bank view 2); a neighbour is framed
    green when the cycle-consistency test passed and red when it failed.

    Args:
        backbone: eval-mode ViT.
        query_images: images whose objects retrieve neighbours (they form the "current batch").
        bank_images: images stored in the bank.
        out_path: PNG to write.
        image_size: side of the views.
        n_clusters: K.
        pos_alpha: positional-cost weight.
        objects_per_image: objects shown per query image (the largest ones).
        seed: crops and cluster seeds (the bank uses ``seed + 1``).
        photometric: apply the training colour augmentation.
        dpi: resolution (figure is ``4 * 2.5 * dpi`` wide, ``2.5 * dpi`` per shown object high).
    Returns:
        The path written.
    """
    from cribo_utils.method.neighbours import find_cycle_consistent_neighbours

    if not bank_images:
        raise ValueError("plot_neighbours: the memory bank needs at least one image (--bank_images)")
    if objects_per_image < 1:
        raise ValueError(f"--objects_per_image {objects_per_image} must be >= 1")
    memory = build_object_bank(
        backbone, bank_images, image_size, n_clusters, pos_alpha, seed + 1, photometric
    )
    if memory.bank.is_empty:
        raise ValueError(
            "plot_neighbours: no bank image has an object present in both views, the bank is empty; "
            "use more --bank_images or a larger --image_size"
        )
    queries = cluster_image_views(
        backbone, query_images, image_size, n_clusters, pos_alpha, seed, photometric
    )
    result = find_cycle_consistent_neighbours(queries.objects1, queries.objects2, memory.bank)
    shown = _largest_objects(queries, objects_per_image)
    if not shown:
        raise ValueError(
            "plot_neighbours: no query image has an object present in both views; "
            "use more --num_images or a larger --image_size"
        )
    palette = cluster_palette(n_clusters)
    figure, axes = _new_grid(len(shown), 4, IMAGE_PANEL, dpi)
    for row, index in enumerate(shown):
        image, cluster = queries.object_ids[index].tolist()
        colour = palette[cluster]
        for view, slot, mask in (
            (1, result.index1[index], result.mask1[index]),
            (2, result.index2[index], result.mask2[index]),
        ):
            query_member = (queries.view_labels(view)[image] == cluster).cpu().numpy()
            column = 2 * (view - 1)
            _show(
                axes[row, column],
                highlight_object(queries.pictures[image, view - 1], query_member, colour, queries.patch_size),
                f"query {image} obj {cluster}, view {view}",
            )
            bank_image, bank_cluster = (int(t) for t in memory.locate(slot.reshape(1)))
            query_vector = (queries.objects1 if view == 1 else queries.objects2)[index]
            similarity = F.cosine_similarity(
                query_vector, memory.bank.gather_slots(view, slot.reshape(1))[0], dim=0
            )
            bank_member = (memory.views.view_labels(view)[bank_image] == bank_cluster).cpu().numpy()
            passed = bool(mask)
            _show(
                axes[row, column + 1],
                highlight_object(
                    memory.views.pictures[bank_image, view - 1],
                    bank_member,
                    colour,  # the query's colour: the pair reads as one object
                    queries.patch_size,
                ),
                f"bank {bank_image} obj {bank_cluster}: cos {float(similarity):.2f}\n"
                f"cycle {'passed' if passed else 'failed'}",
            )
            _frame(axes[row, column + 1], "#00c853" if passed else "#d50000")
    accepted = (result.mask1.float().mean().item(), result.mask2.float().mean().item())
    _finish_layout(
        figure,
        f"nearest objects in a bank of {len(bank_images)} images ({memory.bank.num_objects} objects); "
        f"cycle-consistent: {accepted[0]:.0%} (view 1), {accepted[1]:.0%} (view 2)",
        wspace=0.08,
        hspace=0.35,
        title_inches=0.85,  # the bank panels' two-line titles sit under the figure's title
    )
    return _save(figure, out_path, dpi)
