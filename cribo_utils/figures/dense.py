"""Figure 3, ``dense``: dense nearest-neighbour label transfer against the ground truth.

:func:`plot_dense` builds a memory of patch features and labels with :mod:`cribo_utils.eval.dense_nn`
(docs/dense-nn-protocol.md, Part A), predicts every image and draws image, ground truth, prediction and a
legend in the dataset's palette.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cribo_utils.figures.drawing import (
    DEFAULT_DPI,
    IMAGE_PANEL,
    _finish_layout,
    _new_grid,
    _save,
    _show,
    colourise_mask,
    denormalize,
)
from cribo_utils.figures.model import _device_of

if TYPE_CHECKING:
    from models.vision_transformer import VisionTransformer


@torch.no_grad()
def plot_dense(
    backbone: VisionTransformer,
    memory_dataset: Any,
    images: Sequence[Image.Image],
    masks: Sequence[np.ndarray | Image.Image | None],
    out_path: str | os.PathLike[str],
    num_classes: int,
    palette: np.ndarray,
    class_names: Sequence[str] | None = None,
    image_size: int = 96,
    num_neighbours: int = 30,
    temperature: float = 0.02,
    ignore_index: int = 255,
    seed: int = 0,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Figure 3: dense nearest-neighbour label transfer (docs/dense-nn-protocol.md, Part A).

    A memory of patch features and soft patch labels is built from ``memory_dataset`` with
    :func:`cribo_utils.eval.dense_nn.build_memory` (one augmentation pass, every patch kept), then each image
    is predicted with :func:`cribo_utils.eval.dense_nn.predict`:
    ``y_hat(q) = sum_j softmax_j(cos(q, x_j) / beta) y_j`` over the k nearest memory patches,
    upsampled bilinearly and arg-maxed per pixel. One row per image: image, ground truth (if given),
    prediction, and a legend of the classes shown.

    Args:
        backbone: eval-mode ViT.
        memory_dataset: yields (PIL image, PIL mask) pairs with class ids in [0, C) or ``ignore_index``.
        images: PIL images to predict.
        masks: ground truth per image ((H, W) class ids or PIL mask), None where unknown.
        out_path: PNG to write.
        num_classes: C.
        palette: (256, 3) uint8 colours (:func:`dataset_palette`).
        class_names: C names for the legend.
        image_size: the network input side (images and masks resized to it, as the protocol's validation).
        num_neighbours: k.
        temperature: beta.
        ignore_index: label not scored (drawn with palette[255]).
        seed: memory crop / jitter / noise seed.
        dpi: resolution (figure is ``4 * 2.5 * dpi`` by ``rows * 2.5 * dpi`` pixels).
    Returns:
        The path written.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from cribo_utils.eval.dense_nn import DenseNNConfig, build_memory, predict
    from data.transforms import normalize, paired_resize

    if len(masks) != len(images):
        raise ValueError(
            f"plot_dense: {len(images)} images but {len(masks)} masks (use None for unknown masks)"
        )
    device = _device_of(backbone)
    config = DenseNNConfig(
        input_size=image_size,
        memory_size=None,
        num_neighbours=num_neighbours,
        temperature=temperature,
        augmentation_epochs=1,
        batch_size=8,
        num_workers=0,
        seed=seed,
        ignore_index=ignore_index,
        progress=False,
    )
    memory = build_memory(backbone, memory_dataset, config, num_classes, device)
    inputs: list[Tensor] = []
    targets: list[np.ndarray | None] = []
    for image, mask in zip(images, masks, strict=True):
        if mask is None:
            resized = TF.resize(image.convert("RGB"), [image_size, image_size], InterpolationMode.BILINEAR)
            inputs.append(normalize()(resized))
            targets.append(None)
        else:
            tensor, resized_mask = paired_resize(image.convert("RGB"), mask, image_size)
            inputs.append(tensor)
            targets.append(resized_mask.numpy())
    batch = torch.stack(inputs)
    predictions = torch.cat(
        [predict(backbone, part.to(device), memory, config).cpu() for part in batch.split(8)]
    )
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    figure, axes = _new_grid(len(images), 4, IMAGE_PANEL, dpi)
    from matplotlib.patches import Patch

    pictures = denormalize(batch)
    for row, (target, prediction) in enumerate(zip(targets, predictions.numpy(), strict=True)):
        _show(axes[row, 0], pictures[row], f"image {row}")
        present = set(np.unique(prediction).tolist())
        if target is None:
            _show(axes[row, 1], np.full_like(pictures[row], 255), "no ground truth")
            title = "prediction"
        else:
            scored = target != ignore_index
            accuracy = float((prediction[scored] == target[scored]).mean()) if scored.any() else float("nan")
            _show(axes[row, 1], colourise_mask(target, palette), "ground truth")
            present |= set(np.unique(target[scored]).tolist())
            title = f"prediction (pixel acc. {accuracy:.0%})"
        _show(axes[row, 2], colourise_mask(prediction, palette), title)
        axes[row, 3].axis("off")
        handles = [
            Patch(
                facecolor=palette[c] / 255.0,
                edgecolor="black",
                linewidth=0.5,
                label=names[c] if c < len(names) else str(c),
            )
            for c in sorted(present)[:12]
        ]
        axes[row, 3].legend(handles=handles, loc="center left", fontsize=7, frameon=False)
    _finish_layout(
        figure,
        f"dense nearest-neighbour retrieval: memory of {len(memory)} patches from "
        f"{len(memory_dataset)} images, k = {min(num_neighbours, len(memory))}",
        wspace=0.05,
        hspace=0.25,
    )
    return _save(figure, out_path, dpi)
