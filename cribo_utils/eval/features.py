"""Frozen-backbone features for the evaluations, and the data plumbing the k-NN and linear probes share.

Extraction is data-parallel under ``torchrun``/``srun``: each rank reads its shard of a *non-shuffled*
``DistributedSampler`` (which pads the last shard with repeated samples), the features are gathered
with their dataset indices and scattered back into dataset order, so every rank ends with the same
(n_samples, ...) matrix as a single process would compute (repeated samples just overwrite their slot
with identical values). This replaces DINO's scheme in which every rank recomputes the whole
validation set.

Feature kinds (``extract_features(kind=...)``), for a ViT with final LayerNorm ``norm``:

- ``"cls"``: ``norm(z_L)[CLS]``, shape (B, D) (k-NN classifier, docs/dense-nn-protocol.md, Part B);
- ``"patch"``: ``norm(z_L)[1:]``, shape (B, N, D) (dense NN retrieval, Part A);
- ``"linear"``: DINO's linear-probe input (Part C), shape (B, D * (n + avgpool)):
  ``[norm(z_{L-n+1})[CLS], ..., norm(z_L)[CLS], (mean_i norm(z_L)[i] if avgpool)]``.

For a conv backbone (``models.resnet``, ``models.convnext``) ``"cls"`` and ``"linear"`` are its global
feature (global average pool of the last stage) and ``"patch"`` its dense grid (last stage, stride 32),
through the same ``forward`` / ``forward_features`` interface (``models/__init__.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cribo_utils.runtime import distributed
from cribo_utils.runtime.progress import Progress
from data.synthetic import add_scene_args

logger = logging.getLogger(__name__)

FEATURE_KINDS = ("cls", "patch", "linear")
CLASSIFICATION_DATASETS = ("synthetic", "imagenet1k", "imagefolder")
_LOG_EVERY_BATCHES = 50


class IndexedDataset(Dataset):
    """Wrap a dataset so that every item also carries its index: ``(x, y) -> (x, y, index)``.

    Args:
        dataset: any map-style dataset returning ``(input, target)`` pairs.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        sample, target = self.dataset[index]
        return sample, target, index


def build_eval_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Non-shuffled, data-parallel loader yielding ``(images, targets, indices)`` batches.

    Each rank reads the samples ``rank, rank + W, rank + 2W, ...`` of the dataset (padded with the first
    samples so all ranks have ``ceil(n / W)``); :func:`extract_features` reorders the gathered result.

    Args:
        dataset: map-style dataset returning ``(tensor, target)``.
        batch_size: images per rank and batch.
        num_workers: loader worker processes per rank.
    Returns:
        The loader; ``loader.dataset`` is an :class:`IndexedDataset`.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("build_eval_loader: the dataset is empty; check --data_path and the split folders")
    indexed = IndexedDataset(dataset)
    sampler = DistributedSampler(
        indexed,
        num_replicas=distributed.get_world_size(),
        rank=distributed.get_rank(),
        shuffle=False,
        drop_last=False,
    )
    return DataLoader(
        indexed,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )


def linear_probe_features(
    model: nn.Module, images: Tensor, n_last_blocks: int = 4, avgpool: bool = False
) -> Tensor:
    """DINO's linear-probe input: concatenated [CLS] of the last ``n`` blocks, optionally + pooled patches.

    ``f = [c_{L-n+1}, ..., c_L, (mean_i p_{L,i} if avgpool)]`` where ``c_l`` / ``p_{l,i}`` are the [CLS] /
    patch tokens of block ``l`` passed through the final LayerNorm. Unlike DINO's code (which interleaves
    the pooled vector with the [CLS] vector and only supports ``n = 1`` with ``avgpool``), the pooled
    vector is simply appended, for any ``n``.

    A conv net (no ``get_intermediate_layers``) gives its global feature ``model(images)``, the global
    average pool of the last stage that VICRegL's and DINO's ResNet-50 linear evaluations train on;
    ``n_last_blocks`` and ``avgpool`` do not apply to it.

    Args:
        model: ViT with ``get_intermediate_layers(x, n)``, or a conv backbone.
        images: (B, 3, H, W).
        n_last_blocks: n >= 1.
        avgpool: append the mean of the last block's patch tokens.
    Returns:
        (B, D * (n + avgpool)) for a ViT, (B, D) for a conv net.
    """
    if not hasattr(model, "get_intermediate_layers"):
        return model(images)
    outputs = model.get_intermediate_layers(images, n_last_blocks)
    parts = [tokens[:, 0] for tokens in outputs]
    if avgpool:
        parts.append(outputs[-1][:, 1:].mean(dim=1))
    return torch.cat(parts, dim=-1)


def is_vit(model: nn.Module) -> bool:
    """True for a ViT backbone (it has [CLS] and attention), False for a conv net."""
    return bool(getattr(model, "has_attention", hasattr(model, "get_intermediate_layers")))


def global_feature_name(model: nn.Module) -> str:
    """What ``model(images)`` is, for result files: the [CLS] token or the pooled last stage."""
    if is_vit(model):
        return "final-norm [CLS]"
    return f"global-average-pooled last-stage ({type(model).__name__})"


def compute_features(
    model: nn.Module, images: Tensor, kind: str = "cls", n_last_blocks: int = 4, avgpool: bool = False
) -> Tensor:
    """Features of one batch: (B, D) ``"cls"``, (B, N, D) ``"patch"``, (B, D(n + avgpool)) ``"linear"``.

    Args:
        model: ViT backbone (``forward``, ``forward_features``, ``get_intermediate_layers``).
        images: (B, 3, H, W) on the model's device.
        kind: one of ``FEATURE_KINDS``.
        n_last_blocks: blocks used by ``"linear"``.
        avgpool: pooled patch tokens appended by ``"linear"``.
    Returns:
        The batch's features (not L2-normalised).
    """
    if kind == "cls":
        return model(images)
    if kind == "patch":
        return model.forward_features(images)[1]
    if kind == "linear":
        return linear_probe_features(model, images, n_last_blocks, avgpool)
    raise ValueError(f"feature kind {kind!r} is not one of {FEATURE_KINDS}")


def ordered_gather(values: Tensor, indices: Tensor, total: int, device: torch.device | None = None) -> Tensor:
    """Gather per-rank rows tagged with dataset indices into one matrix in dataset order.

    ``out[indices_r[j]] = values_r[j]`` for every rank ``r`` and row ``j``; rows that appear on several
    ranks (the sampler's padding) must be identical and simply overwrite each other.

    Args:
        values: (L_r, ...) rows computed on this rank (same trailing shape and dtype on every rank).
        indices: (L_r,) dataset index of each row.
        total: dataset size n; every index in [0, n) must be present on some rank.
        device: device for the collective (``cuda`` with NCCL, ``cpu`` with gloo); default: ``values``'.
    Returns:
        (n, ...) on the CPU, identical on every rank.
    Raises:
        RuntimeError: some dataset index was never computed, or an index is out of range.
    """
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"ordered_gather: {values.shape[0]} rows but {indices.shape[0]} indices")
    device = values.device if device is None else device
    all_values = distributed.all_gather_varlen(values.to(device)).cpu()
    all_indices = distributed.all_gather_varlen(indices.to(device=device, dtype=torch.long)).cpu()
    if all_indices.numel() and (int(all_indices.min()) < 0 or int(all_indices.max()) >= total):
        raise RuntimeError(f"ordered_gather: dataset indices outside [0, {total})")
    out = all_values.new_zeros((total, *all_values.shape[1:]))
    out[all_indices] = all_values
    covered = torch.zeros(total, dtype=torch.bool)
    covered[all_indices] = True
    if not bool(covered.all()):
        missing = int((~covered).sum())
        raise RuntimeError(
            f"ordered_gather: {missing} of {total} dataset items were not computed by any rank"
        )
    return out


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    kind: str = "cls",
    n_last_blocks: int = 4,
    avgpool: bool = False,
) -> tuple[Tensor, Tensor]:
    """Features and targets of a whole dataset, in dataset order, identical on every rank.

    Args:
        model: frozen backbone in eval mode, on ``device``.
        loader: from :func:`build_eval_loader` (batches ``(images, targets, indices)``).
        device: where the forward passes (and the gathers) run.
        kind: ``"cls"``, ``"patch"`` or ``"linear"`` (see :func:`compute_features`).
        n_last_blocks: blocks used by ``"linear"``.
        avgpool: pooled patch tokens appended by ``"linear"``.
    Returns:
        ``(features, targets)``: features (n, ...) float32 on the CPU; targets (n, ...) as the dataset
        returns them (class ids give (n,) int64).
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind {kind!r} is not one of {FEATURE_KINDS}")
    if model.training:
        raise ValueError("extract_features: the model is in training mode; call model.eval() first")
    device = torch.device(device)
    features, targets, indices = [], [], []
    progress = Progress(
        len(loader),
        f"{kind} features",
        enabled=distributed.is_main_process(),
        every=_LOG_EVERY_BATCHES,
        items_per_step=loader.batch_size or 1,
    )
    for batch in loader:
        if len(batch) != 3:
            raise ValueError(
                "extract_features: batches must be (images, targets, indices); use build_eval_loader"
            )
        images, batch_targets, batch_indices = batch
        batch_features = compute_features(
            model, images.to(device, non_blocking=True), kind, n_last_blocks, avgpool
        )
        features.append(batch_features.float().cpu())
        targets.append(torch.as_tensor(batch_targets).cpu())
        indices.append(torch.as_tensor(batch_indices))
        progress.update(1)
    progress.close()
    total = len(loader.dataset)  # type: ignore[arg-type]
    # NCCL only moves CUDA tensors; gloo only CPU tensors.
    gather_device = (
        device if device.type == "cuda" and distributed.get_world_size() > 1 else torch.device("cpu")
    )
    local_indices = torch.cat(indices)
    all_features = ordered_gather(torch.cat(features), local_indices, total, gather_device)
    all_targets = ordered_gather(torch.cat(targets), local_indices, total, gather_device)
    return all_features, all_targets


# --------------------------------------------------------------------------------------------------
# Data plumbing shared by eval_knn.py and eval_linear.py
# --------------------------------------------------------------------------------------------------


def add_eval_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the dataset and pre-processing flags shared by the k-NN and linear evaluations.

    Args:
        parser: parser to extend in place.
    Returns:
        The same parser.
    """
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_type",
        "--dataset",
        dest="dataset",
        default=None,
        choices=CLASSIFICATION_DATASETS,
        help="Default: what --data_path holds (ImageNet's train/ or ILSVRC2012_img_train/ with WordNet-id "
        "class folders: imagenet1k; other class folders: imagefolder), the built-in synthetic scenes without "
        "--data_path. Naming one that contradicts the folder is an error.",
    )
    group.add_argument(
        "--data_path",
        default=None,
        type=str,
        help="Dataset root: train/ and val/ (or ILSVRC2012_img_{train,val}/) of class folders. Default: "
        "none, the built-in synthetic scenes.",
    )
    group.add_argument(
        "--image_size",
        "--input_size",
        dest="image_size",
        default=None,
        type=int,
        help="Centre-crop (and train-crop) side. Default: 224 for folders, 128 for the synthetic scenes.",
    )
    group.add_argument(
        "--resize",
        default=None,
        type=int,
        help="Shorter side before the centre crop. Default: 256 for folders, --image_size for the synthetic "
        "scenes (which are rendered at this size).",
    )
    group.add_argument("--synthetic_num_train", default=5000, type=int, help="Synthetic training images.")
    group.add_argument("--synthetic_num_val", default=500, type=int, help="Synthetic validation images.")
    group.add_argument("--synthetic_seed", default=0, type=int, help="Seed of the synthetic scene generator.")
    add_scene_args(group)
    return parser


def resolve_classification_dataset(args: argparse.Namespace, script: str) -> str:
    """Set ``args.dataset`` to the dataset actually evaluated (:func:`data.layouts.resolve_dataset`).

    Raises:
        DatasetLayoutError: a contradiction between ``--dataset_type`` and ``--data_path``, or a folder that
            holds no labelled class folders (one line).
    """
    from data.layouts import resolve_dataset

    args.dataset = resolve_dataset(args.dataset, args.data_path, CLASSIFICATION_DATASETS, script)
    return args.dataset


def resolve_image_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """``(resize, crop)``: the flags if given, else 256/224 for folders and crop/crop (128) for synthetic."""
    if args.dataset is None:
        resolve_classification_dataset(args, "the evaluation")
    if args.dataset == "synthetic":
        crop = args.image_size or 128
        resize = args.resize or crop
    else:
        crop = args.image_size or 224
        resize = args.resize or 256
    if resize < crop:
        raise ValueError(
            f"--resize {resize} is smaller than --image_size {crop}; the centre crop would not fit"
        )
    return resize, crop


def build_classification_split(args: argparse.Namespace, split: str, transform: Any) -> Dataset:
    """One split (``"train"`` / ``"val"``) of the dataset chosen by ``--dataset``.

    Args:
        args: parsed flags from :func:`add_eval_data_args`.
        split: ``"train"`` or ``"val"``.
        transform: PIL image -> tensor.
    Returns:
        A dataset of ``(tensor, class id)`` with a ``classes`` attribute.
    """
    from data.datasets import build_classification_dataset

    if args.dataset is None:
        resolve_classification_dataset(args, "the evaluation")
    resize, _ = resolve_image_sizes(args)
    synthetic_kwargs = {
        "image_size": resize,
        "num_train": args.synthetic_num_train,
        "num_val": args.synthetic_num_val,
        "seed": args.synthetic_seed,
        "object_colours": args.synthetic_object_colours,
        "level": args.synthetic_level,
    }
    return build_classification_dataset(args.dataset, args.data_path, split, transform, synthetic_kwargs)


def num_classes_of(dataset: Dataset, targets: Sequence[Tensor]) -> int:
    """Number of classes: ``len(dataset.classes)`` when the dataset lists them, else ``max(target) + 1``.

    Args:
        dataset: the training dataset.
        targets: class-id tensors (e.g. train and val) used when the dataset has no ``classes``.
    Returns:
        C >= 1.
    """
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    return max(int(target.max()) for target in targets if target.numel()) + 1


def write_results_json(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``results`` as indented JSON (atomically: temporary file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp_path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    os.replace(tmp_path, path)
    logger.info("wrote %s", path)
    return path
