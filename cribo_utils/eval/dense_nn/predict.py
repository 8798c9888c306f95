"""Prediction: the backbone's dense features, label transfer from the neighbours, per-pixel classes.

For a query patch with neighbours j = 1..k, ``w_j = softmax_j(cos(q, x_j) / beta)`` and
``y_hat = sum_j w_j y_j`` (protocol A.5); the (S, S, C) map is upsampled bilinearly and the arg-max class
is taken per pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cribo_utils.eval.dense_nn.config import DenseNNConfig
from cribo_utils.eval.dense_nn.labels import PatchLabels
from cribo_utils.eval.dense_nn.search import DenseMemory

# Host bytes used per prediction chunk when upsampling (C, S, S) maps to (C, H, W).
_UPSAMPLE_BUDGET_BYTES = 256 * 2**20


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
