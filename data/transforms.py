"""Evaluation transforms, the random-resized-crop box sampler, and paired image/mask transforms.

Contents:

- ``IMAGENET_MEAN`` / ``IMAGENET_STD`` and :func:`normalize` (ToTensor + ImageNet normalisation).
- :func:`sample_crop_box`: torchvision's ``RandomResizedCrop.get_params`` algorithm (same random draws
  from torch's global RNG, so ``DataLoader`` worker seeding applies), returning the box explicitly so
  callers can track geometry (``data/augmentations.py`` uses it for patch-centre coordinates).
- :func:`eval_transform` (DINO k-NN / linear evaluation: resize 256 bicubic, centre crop 224) and
  :func:`linear_train_transform` (DINO linear probe: RandomResizedCrop bilinear + horizontal flip).
- :class:`PairedRandomResizedCrop` and :class:`PairedResize` / :func:`paired_resize`: image and mask
  transformed with the same geometry, bilinear for the image and nearest for the mask, for the dense
  nearest-neighbour evaluation (docs/dense-nn-protocol.md, A.3 memory augmentation and A.6 validation resize).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

# torchvision's sampler tries this many random boxes before falling back to a centre crop.
MAX_CROP_ATTEMPTS = 10

ImageTransform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class CropBox:
    """A crop in original-image pixels: rows ``top .. top+height-1``, columns ``left .. left+width-1``."""

    top: int
    left: int
    height: int
    width: int


def _check_range(name: str, value: Sequence[float], upper: float | None = None) -> tuple[float, float]:
    """Validate a (low, high) range of positive numbers; ``name`` is the flag or argument named in errors."""
    if len(value) != 2:
        raise ValueError(f"`{name}`: expected two numbers (low, high); got {value!r}.")
    low, high = float(value[0]), float(value[1])
    if not (0.0 < low <= high):
        raise ValueError(f"`{name}`: expected 0 < low <= high; got ({low}, {high}).")
    if upper is not None and high > upper:
        raise ValueError(f"`{name}`: the upper bound must be <= {upper}; got ({low}, {high}).")
    return low, high


def _check_size(name: str, size: int) -> int:
    """Validate a positive integer output size."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"`{name}`: expected a positive integer; got {size!r}.")
    return size


def sample_crop_box(
    image_height: int,
    image_width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> CropBox:
    """Draw a random-resized-crop box with the semantics of torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 attempts: area fraction ``s ~ U(scale)``, aspect ``r = exp(U(log ratio))`` (log-uniform),
    ``w = round(sqrt(s * H * W * r))``, ``h = round(sqrt(s * H * W / r))``; the first attempt with
    ``0 < w <= W`` and ``0 < h <= H`` is placed uniformly: ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``.
    Hence an area fraction above 1 is always rejected (``scale=(0.5, 2.0)`` as in the dense-NN protocol).
    After 10 rejections: centre crop of the whole image, narrowed to the nearest aspect inside ``ratio``.

    The random numbers are drawn from torch's global RNG in the same order and precision as torchvision,
    so for equal seeds the box equals ``get_params``'s and ``DataLoader`` worker seeding applies.

    Args:
        image_height: H, original image height in pixels.
        image_width: W, original image width in pixels.
        scale: (low, high) range of the area fraction; values above 1 are allowed (and rejected when drawn).
        ratio: (low, high) range of the aspect ratio width / height.
    Returns:
        The sampled :class:`CropBox`, always inside the image.
    """
    if image_height <= 0 or image_width <= 0:
        raise ValueError(f"sample_crop_box: image size must be positive; got {image_width}x{image_height}.")
    scale = _check_range("scale", scale)
    ratio = _check_range("ratio", ratio)
    area = image_height * image_width
    # float32 like torchvision, so that equal seeds give bit-identical boxes.
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float32))
    for _ in range(MAX_CROP_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]))).item()
        width = int(round(math.sqrt(target_area * aspect)))
        height = int(round(math.sqrt(target_area / aspect)))
        if 0 < width <= image_width and 0 < height <= image_height:
            top = int(torch.randint(0, image_height - height + 1, size=(1,)).item())
            left = int(torch.randint(0, image_width - width + 1, size=(1,)).item())
            return CropBox(top, left, height, width)
    image_aspect = image_width / image_height
    if image_aspect < ratio[0]:
        width, height = image_width, int(round(image_width / ratio[0]))
    elif image_aspect > ratio[1]:
        width, height = int(round(image_height * ratio[1])), image_height
    else:
        width, height = image_width, image_height
    return CropBox((image_height - height) // 2, (image_width - width) // 2, height, width)


def normalize() -> T.Compose:
    """ToTensor then ImageNet normalisation ``(x / 255 - mean) / std`` per channel; output (3, H, W)."""
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    """DINO's evaluation pre-processing (k-NN and linear-probe validation).

    Shorter side resized to ``resize`` (bicubic, aspect kept), centre crop ``crop x crop``, ImageNet
    normalisation.

    Args:
        resize: target length of the shorter image side.
        crop: side of the square centre crop.
    Returns:
        A transform mapping a PIL RGB image to a (3, crop, crop) float32 tensor.
    """
    _check_size("resize", resize)
    _check_size("crop", crop)
    return T.Compose(
        [
            T.Resize(resize, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            normalize(),
        ]
    )


def linear_train_transform(size: int = 224, scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """DINO's linear-probe training augmentation: RandomResizedCrop (bilinear) + horizontal flip + normalise.

    Args:
        size: output side S.
        scale: area-fraction range of the random crop (torchvision default (0.08, 1.0)).
    Returns:
        A transform mapping a PIL RGB image to a (3, S, S) float32 tensor.
    """
    _check_size("size", size)
    scale = _check_range("scale", scale, upper=1.0)
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip(),
            normalize(),
        ]
    )


def _as_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` in RGB mode; raise TypeError for anything that is not a PIL image."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image for the image; got {type(img).__name__}.")
    return img if img.mode == "RGB" else img.convert("RGB")


def _as_mask_image(mask: Image.Image | np.ndarray) -> Image.Image:
    """Return a label mask as a single-channel PIL image whose pixel values are the class ids.

    Accepted: PIL images of mode "L", "P" (palette indices are the ids), "I", "I;16"; or a 2-D integer
    numpy array (stored as "L" when all ids are in 0..255, else as 32-bit "I").
    """
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(
                f"mask: expected a single-channel label image (mode L, P, I or I;16); "
                f"got mode {mask.mode!r}. "
                "Store class ids in a palette or grayscale PNG."
            )
        return mask
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise ValueError(
                f"mask: expected a 2-D integer numpy array of class ids; got shape {mask.shape}, "
                f"dtype {mask.dtype}."
            )
        if mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.int32).max):
            raise ValueError("mask: class ids must be in [0, 2**31 - 1].")
        if mask.size == 0 or mask.max() <= 255:
            return Image.fromarray(mask.astype(np.uint8), mode="L")
        return Image.fromarray(mask.astype(np.int32), mode="I")
    raise TypeError(f"mask: expected a PIL image or numpy array; got {type(mask).__name__}.")


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Class ids of a single-channel PIL mask as an int64 tensor of shape (H, W) (no scaling)."""
    return torch.from_numpy(np.array(mask, dtype=np.int64))


def _paired_inputs(img: Image.Image, mask: Image.Image | np.ndarray) -> tuple[Image.Image, Image.Image]:
    """Convert and size-check an (image, mask) pair."""
    img, mask_img = _as_rgb(img), _as_mask_image(mask)
    if img.size != mask_img.size:
        raise ValueError(
            f"image and mask sizes differ: image {img.size[0]}x{img.size[1]}, "
            f"mask {mask_img.size[0]}x{mask_img.size[1]} (width x height); check the dataset's mask files."
        )
    return img, mask_img


def image_only_colour_jitter(strength: float = 0.1, p: float = 0.5) -> T.Compose:
    """Brightness, contrast, saturation and hue jitter, each of ``strength``, each applied with prob. ``p``.

    This is the dense-NN memory augmentation (docs/dense-nn-protocol.md, A.3): the four jitters are
    independent, unlike DINO's single ColorJitter applied as a whole.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"jitter probability must be in [0, 1]; got {p}.")
    jitters = [
        T.ColorJitter(brightness=strength),
        T.ColorJitter(contrast=strength),
        T.ColorJitter(saturation=strength),
        T.ColorJitter(hue=strength),
    ]
    return T.Compose([T.RandomApply([jitter], p=p) for jitter in jitters])


class PairedRandomResizedCrop:
    """Random resized crop applied identically to an image and its label mask (dense-NN memory, A.3).

    The box comes from :func:`sample_crop_box` with ``scale=(0.5, 2.0)`` by default: area fractions above
    1 are rejected and, after 10 rejections, the crop falls back to the (aspect-clamped) centre crop.
    The image is resampled bilinearly (antialiased), the mask with nearest neighbour so that only
    original class ids appear. Optional horizontal flip of both, then image-only colour jitter, then
    ImageNet normalisation of the image.

    Args:
        size: output side S.
        scale: area-fraction range of the crop sampler.
        ratio: aspect-ratio range of the crop sampler.
        colour_jitter: apply :func:`image_only_colour_jitter` to the image.
        jitter_strength: strength of each of the four jitters.
        jitter_p: probability of each of the four jitters.
        flip_p: probability of a joint horizontal flip (0 in the protocol).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 2.0),
        ratio: tuple[float, float] = DEFAULT_RATIO,
        colour_jitter: bool = True,
        jitter_strength: float = 0.1,
        jitter_p: float = 0.5,
        flip_p: float = 0.0,
    ) -> None:
        self.size = _check_size("size", size)
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"`flip_p`: expected a probability in [0, 1]; got {flip_p}.")
        self.flip_p = flip_p
        self.jitter = image_only_colour_jitter(jitter_strength, jitter_p) if colour_jitter else None
        self.to_tensor = normalize()

    def __call__(self, img: Image.Image, mask: Image.Image | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform one pair.

        Args:
            img: PIL image (converted to RGB if needed), size W x H.
            mask: PIL label image or (H, W) integer numpy array of class ids, same size as ``img``.
        Returns:
            (image (3, S, S) float32 normalised, mask (S, S) int64 class ids).
        """
        img, mask_img = _paired_inputs(img, mask)
        box = sample_crop_box(img.height, img.width, self.scale, self.ratio)
        out = [self.size, self.size]
        img = F.resized_crop(img, box.top, box.left, box.height, box.width, out, InterpolationMode.BILINEAR)
        mask_img = F.resized_crop(
            mask_img, box.top, box.left, box.height, box.width, out, InterpolationMode.NEAREST
        )
        if self.flip_p > 0 and torch.rand(1).item() < self.flip_p:
            img, mask_img = F.hflip(img), F.hflip(mask_img)
        if self.jitter is not None:
            img = self.jitter(img)
        return self.to_tensor(img), mask_to_tensor(mask_img)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"colour_jitter={self.jitter is not None}, flip_p={self.flip_p})"
        )


def paired_resize(
    img: Image.Image, mask: Image.Image | np.ndarray, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize an image/mask pair to ``size x size`` (aspect not kept) for dense-NN validation (A.6).

    Args:
        img: PIL image, W x H.
        mask: PIL label image or (H, W) integer numpy array, same size as ``img``.
        size: output side S.
    Returns:
        (image (3, S, S) float32 normalised, bilinear; mask (S, S) int64, nearest).
    """
    _check_size("size", size)
    img, mask_img = _paired_inputs(img, mask)
    img = F.resize(img, [size, size], InterpolationMode.BILINEAR)
    mask_img = F.resize(mask_img, [size, size], InterpolationMode.NEAREST)
    return normalize()(img), mask_to_tensor(mask_img)


class PairedResize:
    """Callable form of :func:`paired_resize` for dataset ``transforms=`` arguments."""

    def __init__(self, size: int) -> None:
        self.size = _check_size("size", size)

    def __call__(self, img: Image.Image, mask: Image.Image | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (image (3, S, S) normalised, mask (S, S) int64); see :func:`paired_resize`."""
        return paired_resize(img, mask, self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"
