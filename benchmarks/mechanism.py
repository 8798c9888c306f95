"""Does CrIBo's own mechanism work? Teacher clusters against objects, cross-image neighbours against classes.

For random initialisations (several seeds) and trained checkpoints, on synthetic scenes whose instance masks
are known, this runs the teacher side of the training step exactly as training does (two views cut, flipped,
re-coloured and jittered by the training transform, with the run's clustering settings), carries every
view's instance mask through the same crop, and measures at patch resolution (a patch's instance is the
majority instance of its pixels):

Clusters (joint two-view clustering, ``--n_tokens`` K and the run's last ``pos_alpha``):

- ``ari_instances``: adjusted Rand index of the clusters against the instances over the 2N tokens of both
  views (1 = the clusters are the instances; about 0 = unrelated). Splitting an object lowers it;
- ``ari_tiles``: the same against *position-only tiles*: the clustering of constant tokens with the same
  seeds, which sees nothing but where the tokens are. Clusters that tile the image score high here;
- ``ari_tiles_instances``: the tiles against the instances (what position alone achieves);
- ``purity``: share of tokens in their cluster's majority instance (1 = no cluster straddles two
  instances; object parts are fine);
- ``objects_per_image``: valid clusters (present in both views) per image; ``instances_per_image``:
  instances (background included) visible in both views;
- ``same_instance``: objects whose two views have the same majority instance (the cross-view object loss
  asks the student to match those two views, so this is the share of its targets that are right);
- ``oracle_ari_instances``, ``oracle_ari_tiles``, ``oracle_purity``: the same for the clustering of
  *instance-oracle* tokens (every patch's token is the one-hot of its instance, identical in both views)
  with the same seeds and positional weight: the ceiling of the clustering itself, whatever the network.

Cross-image neighbours (cycle check of training, bank of ``--num_bank`` scenes, queries in batches of each
``--batch_sizes``: the back-search runs over the objects of one batch, as in training):

- ``acceptance`` / ``acceptance_foreground``: share of query objects (both directions; all, or those whose
  majority instance is an object) whose nearest bank object passes the cycle check;
- ``precision`` / ``precision_foreground``: accepted neighbours whose class (the majority class of the bank
  object's patches) is the query's class; ``precision_foreground_before_check``: the same over all
  foreground queries, before the check; ``chance_foreground``: what a random bank object would score;
- ``background_share_of_accepted``: accepted pairs whose query is background.

Ceilings of retrieval (cosine nearest bank entry, no cycle check, foreground queries of both views):

- ``mask_object_precision_foreground``: objects pooled over each view's instance masks (what a clustering
  equal to the instances would give) retrieve a bank object of their class (``..._chance_...``: a random
  bank object);
- ``mask_object_precision_among_objects``: the same against the foreground bank objects only (chance: 1 /
  classes when classes are balanced): is the class, not only "object or background", retrieved?
- ``mask_object_colour_ratio``: mean colour distance (L1, normalised RGB) between a foreground query and
  its nearest foreground bank object, over that to a random one (1: colour plays no part in the choice;
  below 1: neighbours are chosen by colour);
- ``patch_precision_foreground``: single foreground patches retrieve a bank patch of their class: how much
  class the features hold at all; ``patch_precision_among_foreground``: against the foreground bank patches
  only (the chance of the objects' figure, ``patch_chance_among_foreground``);
- ``patch_linear_probe_foreground`` and ``mask_object_linear_probe``: test accuracy of a logistic regression
  fitted on the bank's foreground patches / mask objects and scored on the queries' (``..._train``: on the
  bank itself; ``linear_probe_chance``: the most frequent class). Nearest-neighbour precision well above a
  probe at chance means the class is in the features only locally (near-duplicate patches), not as a
  direction that survives averaging a whole object.

Object targets (checkpoints only: the teacher's object head and centre at the run's last epoch), over the
foreground query objects of both views:

- ``target_prototypes``: effective number of prototypes the targets use (1 = collapsed);
- ``target_same_class`` / ``target_other_class``: how often two objects of different images get the same
  arg-max prototype when they share the class / when they do not (equal: the targets carry no class, so
  neither object loss can teach it, and a cross-image neighbour of another class gives the same target);
- ``target_foreground_information`` (over all query objects) / ``target_class_information`` (foreground
  objects): the share of the entropy of "foreground or background" / of the class that the arg-max
  prototype explains (:func:`cribo_utils.eval.mechanism.explained_share`; 1 = the prototype names it);
- ``target_view_agreement_foreground``: share of foreground objects whose two views get the same arg-max
  prototype (what the cross-view loss asks for).

Under ``--centering_c sinkhorn`` the targets are balanced over the objects of ``batch_size_per_gpu`` query
images at a time, as in a training step.

    python benchmarks/mechanism.py --checkpoints output/checkpoint.pth --random_seeds 3

Settings (views, clustering, batch size) come from each checkpoint's stored training arguments; random
initialisations use those of ``python main_cribo.py`` (the preset). ``--views``, ``--n_tokens`` and
``--pos_alpha`` override them for every row.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import format_table, machine_info, write_json  # noqa: E402
from benchmarks.learning_signal import PROTOCOL_SEED  # noqa: E402
from cribo_utils.eval.mechanism import (  # noqa: E402
    NeighbourTally,
    adjusted_rand_index,
    class_match_chance,
    cluster_purity,
    cosine_nearest,
    explained_share,
    linear_probe_accuracy,
    nearest_class_precision,
    object_labels,
    patch_majority_labels,
    pool_by_labels,
    target_statistics,
)
from cribo_utils.method.clustering import draw_seed_indices, joint_cluster, positional_alpha  # noqa: E402
from cribo_utils.method.loss import sinkhorn_potential  # noqa: E402
from cribo_utils.method.memory_bank import CentroidMemoryBank  # noqa: E402
from cribo_utils.method.neighbours import find_cycle_consistent_neighbours  # noqa: E402
from cribo_utils.method.schedules import teacher_temperature  # noqa: E402
from cribo_utils.train.parser import resolve_args  # noqa: E402
from cribo_utils.weights.checkpoint_formats import (  # noqa: E402
    build_pretrained_backbone,
    load_checkpoint_file,
    stored_training_args,
)
from data.scene_render import render_scene  # noqa: E402
from data.synthetic import (  # noqa: E402
    SYNTHETIC_VIEWS,
    SyntheticScenes,
    apply_synthetic_views,
    synthetic_view_flags,
    synthetic_views_name,
)
from models.object_pooling import object_representations  # noqa: E402

CLUSTER_KEYS = (
    "ari_instances",
    "ari_tiles",
    "ari_tiles_instances",
    "oracle_ari_instances",
    "oracle_ari_tiles",
    "oracle_purity",
    "purity",
    "tile_purity",
    "objects_per_image",
    "instances_per_image",
    "same_instance",
)
CEILING_KEYS = (
    "mask_object_precision_foreground",
    "mask_object_chance_foreground",
    "mask_object_precision_among_objects",
    "mask_object_chance_among_objects",
    "patch_precision_foreground",
    "patch_chance_foreground",
)
NEIGHBOUR_KEYS = (
    "acceptance",
    "acceptance_foreground",
    "precision",
    "precision_foreground",
    "precision_foreground_before_check",
    "chance_foreground",
    "background_share_of_accepted",
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "CrIBo mechanism: clusters vs objects, neighbours vs classes",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoints", nargs="*", default=[], help="Trained checkpoints (teacher is used).")
    parser.add_argument("--random_seeds", default=3, type=int, help="Random initialisations (preset shape).")
    parser.add_argument("--num_bank", default=1024, type=int, help="Scenes in the memory bank (train split).")
    parser.add_argument("--num_queries", default=256, type=int, help="Query scenes (val split).")
    parser.add_argument(
        "--batch_sizes",
        nargs="*",
        default=None,
        type=int,
        help="Query batch sizes of the cycle check (default: the run's --batch_size_per_gpu and 16).",
    )
    parser.add_argument(
        "--synthetic_seed",
        default=PROTOCOL_SEED,
        type=int,
        help="Seed of the scenes (the protocol's by default; tune with another one).",
    )
    parser.add_argument(
        "--views", default=None, choices=tuple(SYNTHETIC_VIEWS), help="Override the runs' view rendering."
    )
    parser.add_argument("--n_tokens", default=None, type=int, help="Override the runs' --n_tokens.")
    parser.add_argument("--pos_alpha", default=None, type=float, help="Override the runs' last pos_alpha.")
    parser.add_argument("--seed", default=0, type=int, help="Seed of the crops, colours and cluster seeds.")
    parser.add_argument("--out", default="benchmarks/results/mechanism.json")
    return parser


# Bumped whenever a change of this benchmark changes its numbers, so stored scores (benchmarks/ablation.py)
# are recomputed: 2 = the neighbours' classes are read by bank slot (1 read object row <slot>: chance).
SCORING_VERSION = 2


@dataclass
class Views:
    """Two training views of a set of scenes with their ground truth per patch.

    Attributes:
        images: (2, B, 3, S, S) float32 normalised views (view 1, view 2).
        positions: (2, B, 2, N) patch-centre coordinates.
        instances: (2, B, N) long majority instance per patch (0 = background).
        classes: (2, B, N) long class of that instance (0 = background, c + 1 = object class c).
    """

    images: Tensor
    positions: Tensor
    instances: Tensor
    classes: Tensor


def make_views(settings: argparse.Namespace, split: str, count: int, scene_seed: int, seed: int) -> Views:
    """The training transform's two views of scenes ``0 .. count - 1`` of ``split``, with instance masks.

    The renderings are made as :class:`data.synthetic.SyntheticScenes` makes them for training (second
    rendering re-coloured / re-textured by the run's ``--synthetic_views``); the photometric stages are the
    reference's PIL ones (``--augment_on workers``, the same distribution as the device ones).
    """
    from data.augmentations import TwoViewTransform

    transform = TwoViewTransform(
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        global_crops_scale=tuple(settings.global_crops_scale),
        hue=settings.hue_jitter,
        grayscale_p=settings.grayscale_p,
        blur_radius_max=settings.blur_radius_max,
        augment_on="workers",
    )
    flags = synthetic_view_flags(settings)
    dataset = SyntheticScenes(
        split=split,
        image_size=settings.synthetic_image_size,
        num_train=max(count, 1),
        num_val=max(count, 1),
        seed=scene_seed,
        object_colours=settings.synthetic_object_colours,
        level=settings.synthetic_level,
        colourings=2 if flags["recolour_views"] else 1,
        recolour_background=flags["recolour_background"],
        retexture=flags["retexture"],
    )
    images, positions, instance_maps, class_tables = [], [], [], []
    with torch.random.fork_rng(devices=[]):
        for index in range(count):
            torch.manual_seed(seed * 1_000_003 + index)
            scene = dataset.scene(index)
            picture, _, instances = render_scene(scene)
            renderings = [_pil(picture)]
            if dataset.colourings > 1:
                renderings += dataset.recoloured_renderings(scene, dataset.colourings - 1)
            crops, crop_positions, labels = transform(renderings, label_map=instances)
            images.append(torch.stack(crops[:2]))
            positions.append(torch.stack(crop_positions[:2]))
            instance_maps.append(torch.stack(labels[:2]))
            table = torch.zeros(256, dtype=torch.long)
            table[1 : len(scene.objects) + 1] = torch.tensor([item.class_id + 1 for item in scene.objects])
            class_tables.append(table)
    instance_patches = patch_majority_labels(
        torch.stack(instance_maps).flatten(0, 1), settings.patch_size
    ).view(count, 2, -1)
    classes = torch.stack(
        [table[patches] for table, patches in zip(class_tables, instance_patches, strict=True)]
    )
    return Views(
        images=torch.stack(images).transpose(0, 1).contiguous(),
        positions=torch.stack(positions).transpose(0, 1).contiguous(),
        instances=instance_patches.transpose(0, 1).contiguous(),
        classes=classes.transpose(0, 1).contiguous(),
    )


def _pil(array: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(array)


@dataclass
class ClusteredObjects:
    """Teacher clustering of :class:`Views` and its objects.

    Attributes:
        labels: (B, 2N) cluster id per token (view 1 then view 2); ``tiles`` the same for constant tokens.
        valid: (B, K) bool; ``counts`` (B,) objects per image.
        objects1, objects2: (M, D) teacher object representations per view, image by image.
        image_of_object: (M,) long image index of each object.
        instance, cls: (M,) long majority instance / class of each object over both views;
        instance1, instance2: (M,) long majority instance per view;
        oracle: (B, 2N) the clustering of *instance-oracle* tokens (one-hot of every patch's instance, the
            same in both views) with the same seeds and positional weight: what perfect features reach;
        mask_objects, mask_classes, mask_colours: (M', D) teacher tokens pooled over each view's instance
            masks (the objects of a clustering equal to the instances), their classes and (M', 3) the mean
            colour of their pixels (normalised RGB);
        patches, patch_classes: (2BN, D) every teacher patch token of both views and its class.
    """

    labels: Tensor
    tiles: Tensor
    valid: Tensor
    counts: Tensor
    objects1: Tensor
    objects2: Tensor
    image_of_object: Tensor
    instance: Tensor
    cls: Tensor
    instance1: Tensor
    instance2: Tensor
    oracle: Tensor
    mask_objects: Tensor
    mask_classes: Tensor
    mask_colours: Tensor
    patches: Tensor
    patch_classes: Tensor


@torch.no_grad()
def cluster_views(
    backbone: torch.nn.Module,
    views: Views,
    settings: argparse.Namespace,
    alpha: float,
    seed: int,
    chunk: int = 64,
) -> ClusteredObjects:
    """Teacher tokens, joint clustering (the run's settings) and position-only tiles with the same seeds."""
    count = views.images.shape[1]
    n_tokens = views.positions.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    seeds = draw_seed_indices(count, 2 * n_tokens, settings.n_tokens, generator=generator)
    cluster_kwargs = {
        "n_clusters": settings.n_tokens,
        "n_iter": settings.n_iter,
        "sinkhorn_lambda": settings.sinkhorn_lambda,
        "sinkhorn_iterations": settings.sinkhorn_iterations,
        "update_c": settings.update_c,
        "cost_normalization": settings.cost_normalization,
    }
    names = (
        "labels",
        "tiles",
        "oracle",
        "valid",
        "o1",
        "o2",
        "masked",
        "masked_cls",
        "masked_rgb",
        "patches",
        "patch_cls",
    )
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    n_instances = int(views.instances.max()) + 1
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        images = torch.cat([views.images[0, start:stop], views.images[1, start:stop]])
        _, tokens = backbone.forward_features(images)
        tokens1, tokens2 = tokens.float().split(stop - start)
        positions1, positions2 = views.positions[0, start:stop], views.positions[1, start:stop]
        clusters = joint_cluster(
            tokens1,
            tokens2,
            positions1,
            positions2,
            alpha=alpha,
            seed_indices=seeds[start:stop],
            **cluster_kwargs,
        )
        constant = torch.ones(stop - start, n_tokens, 8)
        tiles = joint_cluster(
            constant,
            constant,
            positions1,
            positions2,
            alpha=1.0,
            seed_indices=seeds[start:stop],
            **cluster_kwargs,
        )
        instances1, instances2 = views.instances[0, start:stop], views.instances[1, start:stop]
        oracle = joint_cluster(
            F.one_hot(instances1, n_instances).float(),
            F.one_hot(instances2, n_instances).float(),
            positions1,
            positions2,
            alpha=alpha,
            seed_indices=seeds[start:stop],
            **cluster_kwargs,
        )
        for view, view_tokens in enumerate((tokens1, tokens2)):
            view_instances = views.instances[view, start:stop]
            view_classes = views.classes[view, start:stop].unsqueeze(-1).float()
            patch_colours = F.avg_pool2d(views.images[view, start:stop], settings.patch_size)
            parts["masked"].append(pool_by_labels(view_tokens, view_instances)[0])
            parts["masked_cls"].append(pool_by_labels(view_classes, view_instances)[0].squeeze(-1))
            parts["masked_rgb"].append(
                pool_by_labels(patch_colours.flatten(2).transpose(1, 2), view_instances)[0]
            )
            parts["patches"].append(view_tokens.flatten(0, 1))
            parts["patch_cls"].append(views.classes[view, start:stop].flatten())
        parts["labels"].append(clusters.labels)
        parts["tiles"].append(tiles.labels)
        parts["oracle"].append(oracle.labels)
        parts["valid"].append(clusters.valid)
        parts["o1"].append(object_representations(tokens1, clusters.assign1, clusters.valid))
        parts["o2"].append(object_representations(tokens2, clusters.assign2, clusters.valid))
    labels, valid = torch.cat(parts["labels"]), torch.cat(parts["valid"])
    instances = object_labels(
        labels[:, :n_tokens],
        labels[:, n_tokens:],
        views.instances[0],
        views.instances[1],
        valid,
        settings.n_tokens,
    )
    classes = object_labels(
        labels[:, :n_tokens],
        labels[:, n_tokens:],
        views.classes[0],
        views.classes[1],
        valid,
        settings.n_tokens,
    )
    return ClusteredObjects(
        labels=labels,
        tiles=torch.cat(parts["tiles"]),
        valid=valid,
        counts=valid.sum(dim=1),
        objects1=torch.cat(parts["o1"]),
        objects2=torch.cat(parts["o2"]),
        image_of_object=valid.nonzero()[:, 0],
        instance=instances.both,
        cls=classes.both,
        instance1=instances.view1,
        instance2=instances.view2,
        oracle=torch.cat(parts["oracle"]),
        mask_objects=torch.cat(parts["masked"]),
        mask_classes=torch.cat(parts["masked_cls"]).round().long(),
        mask_colours=torch.cat(parts["masked_rgb"]),
        patches=torch.cat(parts["patches"]),
        patch_classes=torch.cat(parts["patch_cls"]),
    )


def cluster_metrics(clustered: ClusteredObjects, views: Views) -> dict[str, float]:
    """The cluster half of the table (means over images; ``same_instance`` over objects)."""
    instances = torch.cat([views.instances[0], views.instances[1]], dim=1)
    shared = [
        len(set(a.tolist()) & set(b.tolist()))
        for a, b in zip(views.instances[0], views.instances[1], strict=True)
    ]
    return {
        "ari_instances": float(adjusted_rand_index(clustered.labels, instances).mean()),
        "ari_tiles": float(adjusted_rand_index(clustered.labels, clustered.tiles).mean()),
        "ari_tiles_instances": float(adjusted_rand_index(clustered.tiles, instances).mean()),
        "oracle_ari_instances": float(adjusted_rand_index(clustered.oracle, instances).mean()),
        "oracle_ari_tiles": float(adjusted_rand_index(clustered.oracle, clustered.tiles).mean()),
        "oracle_purity": float(cluster_purity(clustered.oracle, instances).mean()),
        "purity": float(cluster_purity(clustered.labels, instances).mean()),
        "tile_purity": float(cluster_purity(clustered.tiles, instances).mean()),
        "objects_per_image": float(clustered.counts.double().mean()),
        "instances_per_image": statistics.mean(shared),
        "same_instance": float((clustered.instance1 == clustered.instance2).double().mean()),
    }


def neighbour_metrics(
    bank_objects: ClusteredObjects, queries: ClusteredObjects, batch_size: int
) -> dict[str, float]:
    """Retrieval with the cycle check of training, queries in batches of ``batch_size`` scenes."""
    n_bank_images = int(bank_objects.counts.numel())
    bank = CentroidMemoryBank(n_bank_images, int(bank_objects.valid.shape[1]), bank_objects.objects1.shape[1])
    bank.push(bank_objects.objects1, bank_objects.objects2, bank_objects.counts)
    # The retrieval returns bank *slots*; the ring stores a push's images in reverse, so slot s is not object
    # row s. One push lists its objects in push order (``valid_slots``, newest image first): check that,
    # then map every slot back to its object row.
    slots = bank.valid_slots()
    if not torch.equal(bank.view(1), bank_objects.objects1) or not torch.equal(
        bank.view(2), bank_objects.objects2
    ):
        raise RuntimeError("the memory bank does not list one push's objects in push order")
    bank_classes = torch.full((bank.capacity,), -1, dtype=torch.long)  # by slot; -1: a free slot
    bank_classes[slots] = bank_objects.cls
    tally = NeighbourTally()
    n_queries = int(queries.counts.numel())
    for start in range(0, n_queries - batch_size + 1, batch_size):
        in_batch = (queries.image_of_object >= start) & (queries.image_of_object < start + batch_size)
        c1, c2 = queries.objects1[in_batch], queries.objects2[in_batch]
        result = find_cycle_consistent_neighbours(c1, c2, bank)
        foreground = queries.instance[in_batch] > 0
        query_class = queries.cls[in_batch]
        for mask, index in ((result.mask1, result.index1), (result.mask2, result.index2)):
            tally.add(mask, bank_classes[index] == query_class, foreground, query_class)
    return tally.summary(bank_objects.cls)


@torch.no_grad()
def ceiling_metrics(bank: ClusteredObjects, queries: ClusteredObjects) -> dict[str, float]:
    """Class precision of the nearest bank entry (cosine, no cycle check) for foreground objects pooled
    over the instance masks, and for single foreground patches: what retrieval could reach with perfect
    clusters, and what the features hold patch by patch. Among foreground entries only (chance 25 % with
    four balanced classes), the same for patches, and a linear probe (fitted on the bank, scored on the
    queries) of patches and of mask objects: whether the class is linearly in the features at all."""
    masks = nearest_class_precision(
        queries.mask_objects, queries.mask_classes, bank.mask_objects, bank.mask_classes
    )
    patches = nearest_class_precision(
        queries.patches, queries.patch_classes, bank.patches, bank.patch_classes, chunk=512
    )
    # Among the foreground objects only: the class, and is the nearest one chosen by colour? Mean colour
    # distance to it, over the distance to a foreground bank object drawn at random (1: colour plays no
    # part; below 1: neighbours share colours).
    in_bank, asking = bank.mask_classes > 0, queries.mask_classes > 0
    query_classes, bank_classes = queries.mask_classes[asking], bank.mask_classes[in_bank]
    nearest = cosine_nearest(queries.mask_objects[asking], bank.mask_objects[in_bank])
    generator = torch.Generator().manual_seed(0)
    drawn = torch.randint(int(in_bank.sum()), nearest.shape, generator=generator)
    colours, bank_colours = queries.mask_colours[asking], bank.mask_colours[in_bank]
    colour_ratio = (colours - bank_colours[nearest]).abs().sum(dim=1).mean() / (
        (colours - bank_colours[drawn]).abs().sum(dim=1).mean()
    )
    patch_in_bank, patch_asking = bank.patch_classes > 0, queries.patch_classes > 0
    bank_patches, bank_patch_classes = bank.patches[patch_in_bank], bank.patch_classes[patch_in_bank]
    query_patches, query_patch_classes = queries.patches[patch_asking], queries.patch_classes[patch_asking]
    patches_among = nearest_class_precision(
        query_patches, query_patch_classes, bank_patches, bank_patch_classes, chunk=512
    )
    patch_probe = linear_probe_accuracy(bank_patches, bank_patch_classes, query_patches, query_patch_classes)
    object_probe = linear_probe_accuracy(
        bank.mask_objects[in_bank], bank_classes, queries.mask_objects[asking], query_classes
    )
    return {
        "mask_object_precision_foreground": masks["precision"],
        "mask_object_chance_foreground": masks["chance"],
        "mask_object_precision_among_objects": float(
            (bank_classes[nearest] == query_classes).double().mean()
        ),
        "mask_object_chance_among_objects": class_match_chance(query_classes, bank_classes),
        "mask_object_colour_ratio": float(colour_ratio),
        "patch_precision_foreground": patches["precision"],
        "patch_chance_foreground": patches["chance"],
        "patch_precision_among_foreground": patches_among["precision"],
        "patch_chance_among_foreground": patches_among["chance"],
        "patch_linear_probe_foreground": patch_probe["test"],
        "patch_linear_probe_foreground_train": patch_probe["train"],
        "mask_object_linear_probe": object_probe["test"],
        "mask_object_linear_probe_train": object_probe["train"],
        "linear_probe_chance": object_probe["chance"],
    }


@torch.no_grad()
def object_target_metrics(
    checkpoint: dict[str, Any], settings: argparse.Namespace, queries: ClusteredObjects
) -> dict[str, float]:
    """:func:`cribo_utils.eval.mechanism.target_statistics` of the teacher's object targets of a loaded
    training checkpoint (its head and object centre ``C_c`` at the last epoch's temperature), foreground
    objects."""
    from models.head import CrIBoHead, head_widths

    if "teacher" not in checkpoint or "dino_loss" not in checkpoint:
        return {}
    state = {
        key[len("head.") :]: value for key, value in checkpoint["teacher"].items() if key.startswith("head.")
    }
    head = CrIBoHead(
        queries.objects1.shape[1], use_bn=settings.use_bn_in_head, norm_last_layer=False, **head_widths(state)
    )
    head.load_state_dict(state)
    temperature = teacher_temperature(
        settings.warmup_teacher_temp_c,
        settings.teacher_temp_c,
        settings.warmup_teacher_temp_epochs,
        settings.epochs - 1,
    )
    objects = torch.cat([queries.objects1, queries.objects2])
    if settings.centering_c == "sinkhorn":
        scores = head.forward_c(objects) / temperature
        targets = sinkhorn_targets(scores, queries, settings.batch_size_per_gpu)
    else:
        logits = head.forward_c(objects) - checkpoint["dino_loss"]["center_c"]
        targets = torch.softmax(logits / temperature, dim=1)
    foreground = torch.cat([queries.instance, queries.instance]) > 0
    images = torch.cat([queries.image_of_object, queries.image_of_object])
    classes = torch.cat([queries.cls, queries.cls])
    stats = target_statistics(targets[foreground], classes[foreground], images[foreground])
    winners = targets.argmax(dim=1)
    winners1, winners2 = winners.view(2, -1)
    return {
        "target_prototypes": stats["prototypes"],
        "target_same_class": stats["same_prototype_same_class"],
        "target_other_class": stats["same_prototype_other_class"],
        "target_foreground_information": explained_share(winners, foreground.long()),
        "target_class_information": explained_share(winners[foreground], classes[foreground]),
        "target_view_agreement_foreground": float(
            (winners1 == winners2)[queries.instance > 0].double().mean()
        ),
    }


def sinkhorn_targets(scores: Tensor, queries: ClusteredObjects, batch_size: int) -> Tensor:
    """Targets under ``--centering_c sinkhorn`` as training makes them: the objects of both views of
    ``batch_size`` consecutive query images balanced together. ``scores``: (2M, Oc) logits over tau_c, view 1
    rows then view 2 rows; returns (2M, Oc) target distributions."""
    step = torch.cat([queries.image_of_object, queries.image_of_object]) // batch_size
    targets = torch.empty_like(scores)
    for index in step.unique().tolist():
        rows = step == index
        targets[rows] = torch.softmax(scores[rows] + sinkhorn_potential(scores[rows]), dim=1)
    return targets


def run_settings(args: argparse.Namespace, stored: dict[str, Any]) -> argparse.Namespace:
    """The preset's settings, then a checkpoint's stored ones, then this command's overrides."""
    settings = copy.copy(resolve_args([]))
    for key, value in stored.items():
        if hasattr(settings, key):
            setattr(settings, key, value)
    if args.views is not None:
        apply_synthetic_views(settings, args.views)
    if args.n_tokens is not None:
        settings.n_tokens = args.n_tokens
    return settings


VIEW_KEYS = (
    "image_size",
    "patch_size",
    "global_crops_scale",
    "hue_jitter",
    "grayscale_p",
    "blur_radius_max",
    "synthetic_image_size",
    "synthetic_object_colours",
    "synthetic_level",
)


def cached_views(
    settings: argparse.Namespace, args: argparse.Namespace, cache: dict[Any, tuple[Views, Views]]
) -> tuple[Views, Views]:
    """Bank and query views for ``settings``, made once per distinct view setting."""
    key = (
        tuple(str(getattr(settings, name)) for name in VIEW_KEYS),
        tuple(synthetic_view_flags(settings).values()),
    )
    if key not in cache:
        cache[key] = (
            make_views(settings, "train", args.num_bank, args.synthetic_seed, args.seed),
            make_views(settings, "val", args.num_queries, args.synthetic_seed, args.seed + 1),
        )
    return cache[key]


def measure(
    backbone: torch.nn.Module,
    settings: argparse.Namespace,
    args: argparse.Namespace,
    cache: dict[Any, tuple[Views, Views]],
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    alpha = positional_alpha(settings.epochs - 1, settings.epochs, settings.pos_alpha)
    if args.pos_alpha is not None:
        alpha = args.pos_alpha
    bank_views, query_views = cached_views(settings, args, cache)
    bank = cluster_views(backbone, bank_views, settings, alpha, args.seed)
    queries = cluster_views(backbone, query_views, settings, alpha, args.seed + 1)
    batch_sizes = args.batch_sizes or sorted({settings.batch_size_per_gpu, 16})
    result: dict[str, Any] = {
        "settings": {
            "views": synthetic_views_name(synthetic_view_flags(settings)),
            "n_tokens": settings.n_tokens,
            "pos_alpha": alpha,
            "batch_size_per_gpu": settings.batch_size_per_gpu,
        },
        **cluster_metrics(queries, query_views),
        **ceiling_metrics(bank, queries),
    }
    for batch_size in batch_sizes:
        result[f"batch_{batch_size}"] = neighbour_metrics(bank, queries, batch_size)
    if checkpoint is not None:
        result.update(object_target_metrics(checkpoint, settings, queries))
    return result


def _row(name: str, result: dict[str, Any], batch_sizes: list[int]) -> list[str]:
    cells = [name] + [
        f"{result[key]:.2f}" for key in ("ari_instances", "ari_tiles", "purity", "objects_per_image")
    ]
    cells.append(f"{result['same_instance']:.2f}")
    cells += [
        f"{result.get(key, float('nan')):.2f}"
        for key in (
            "target_prototypes",
            "target_same_class",
            "target_other_class",
            "target_foreground_information",
            "target_class_information",
            "target_view_agreement_foreground",
        )
    ]
    ceilings = (
        "mask_object_precision_foreground",
        "mask_object_precision_among_objects",
        "patch_precision_foreground",
        "patch_precision_among_foreground",
        "patch_linear_probe_foreground",
        "mask_object_linear_probe",
    )
    cells += [f"{100 * result.get(key, float('nan')):.1f}" for key in ceilings]
    cells.append(f"{result['mask_object_colour_ratio']:.2f}")
    for batch_size in batch_sizes:
        stats = result.get(f"batch_{batch_size}", {})
        cells += [
            f"{100 * stats.get(key, float('nan')):.1f}"
            for key in (
                "acceptance",
                "acceptance_foreground",
                "precision_foreground",
                "precision_foreground_before_check",
            )
        ]
    return cells


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    rows: dict[str, Any] = {}
    cache: dict[Any, tuple[Views, Views]] = {}
    for seed in range(args.random_seeds):
        settings = run_settings(args, {})
        backbone = build_pretrained_backbone(
            settings.arch, settings.patch_size, None, depth=settings.depth, init_seed=seed
        )
        rows[f"random init {seed}"] = measure(backbone, settings, args, cache)
    for path in args.checkpoints:
        checkpoint = load_checkpoint_file(path)
        settings = run_settings(args, stored_training_args(checkpoint, path))
        backbone = build_pretrained_backbone(settings.arch, settings.patch_size, path)
        rows[path] = measure(backbone, settings, args, cache, checkpoint=checkpoint)
    batch_sizes = sorted(
        {int(key.split("_")[1]) for row in rows.values() for key in row if key.startswith("batch_")}
    )
    header = [
        "network",
        "ARI inst",
        "ARI tiles",
        "purity",
        "objects",
        "same inst",
        "prototypes",
        "same cls",
        "other cls",
        "fg info",
        "cls info",
        "fg views agree",
        "mask objects prec fg",
        "among objects",
        "patch prec fg",
        "patches among fg",
        "patch linear fg",
        "object linear fg",
        "colour ratio",
    ]
    for batch_size in batch_sizes:
        header += [
            f"acc@{batch_size}",
            f"acc fg@{batch_size}",
            f"prec fg@{batch_size}",
            f"before@{batch_size}",
        ]
    print(format_table(header, [_row(name, row, batch_sizes) for name, row in rows.items()]))
    first = next(iter(rows.values()))
    print(
        f"position-only tiles: ARI against instances {first['ari_tiles_instances']:.2f}, purity "
        f"{first['tile_purity']:.2f}; chance precision (foreground) "
        f"{100 * first[f'batch_{batch_sizes[0]}']['chance_foreground']:.1f} % (mask objects "
        f"{100 * first['mask_object_chance_foreground']:.1f} %, among objects "
        f"{100 * first['mask_object_chance_among_objects']:.1f} %, patches "
        f"{100 * first['patch_chance_foreground']:.1f} %, patches among foreground "
        f"{100 * first['patch_chance_among_foreground']:.1f} %, linear probes "
        f"{100 * first['linear_probe_chance']:.1f} %)"
    )
    for name, row in rows.items():
        print(
            f"instance-oracle tokens at the settings of {name}: ARI against instances "
            f"{row['oracle_ari_instances']:.2f}, against tiles {row['oracle_ari_tiles']:.2f}, purity "
            f"{row['oracle_purity']:.2f}"
        )
    summary = {
        "protocol": vars(args),
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "machine": machine_info(),
    }
    write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
