"""DINO's photometric augmentation, batched tensor operations on the training device (docs/method.md, Sec. 2).

The data-loading workers keep what is exact and per image (decode, random resized crop with patch-centre
coordinates, flip) and send uint8 views. They also *draw* the photometric parameters of every view:
:class:`PhotometricSampler` takes the same random numbers from torch's global RNG, in the same order, as the
PIL pipeline (``data.augmentations.photometric_pipeline``) would, so a sample's parameters are seeded per
sample and epoch by :class:`data.loading.PerSampleSeededDataset` (exact resume, independent of workers) and,
for one seed, are the very parameters the PIL path applies. :func:`apply_photometric` then applies them to
the whole batch on the device after the copy:

    colour jitter (prob. 0.8; brightness, contrast, saturation, hue in a random order per sample)
    -> grayscale -> Gaussian blur (sigma = PIL radius) -> solarisation -> ImageNet normalisation.

The formulas are torchvision's tensor ones (``torchvision.transforms.functional.adjust_*``), vectorised with
a per-sample factor; the PIL path differs from them only by its uint8 rounding after every operation, its
box-filter approximation of the Gaussian and its 8-bit hue (tests/test_batched_photometric.py states the
tolerances). Per-sample choices (which op runs, in which order) are read from the parameters on the host
before the copy, so no device synchronisation is needed and every sample goes through each op once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf

from data.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

# Columns of the (P,) parameter vector of one view; P = NUM_PARAMS.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # ORDER[k]: index (into BRIGHTNESS..HUE, 0-based) of the k-th jitter operation
GRAYSCALE, BLUR, SIGMA, SOLARIZE = 9, 10, 11, 12
NUM_PARAMS = 13
NEUTRAL = (0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0)

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


@dataclass(frozen=True)
class PhotometricConfig:
    """One view's photometric pipeline (DINO): jitter with prob. ``jitter_p``, grayscale, blur, solarisation.

    Defaults are DINO's: ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale p = 0.2, blur radius
    U(0.1, 2.0), solarisation threshold 128 (on the 0..255 scale).
    """

    blur_p: float
    solarization_p: float
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_radius_min: float = 0.1
    blur_radius_max: float = 2.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    jitter_p: float = 0.8
    solarization_threshold: int = 128

    def __post_init__(self) -> None:
        for name in ("blur_p", "solarization_p", "grayscale_p", "jitter_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1]; got {value}.")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"`--hue_jitter`: expected a value in [0, 0.5]; got {self.hue}.")


class PhotometricSampler:
    """Draws one view's photometric parameters (a (P,) float32 vector) from torch's global RNG.

    The draws are those of the PIL pipeline, in its order: ``RandomApply`` (``rand``), then only if the
    jitter applies ColorJitter's ``randperm(4)`` and its four uniform factors; ``RandomGrayscale``
    (``rand``); the blur (``rand``, then the radius only if it applies); the solarisation (``rand``), only
    when its probability is above 0 (the PIL pipeline has no solarisation op otherwise).
    """

    def __init__(self, config: PhotometricConfig) -> None:
        self.config = config

    def sample(self) -> torch.Tensor:
        """Return (P,) float32: see the column constants of this module; unused entries are neutral."""
        c = self.config
        params = list(NEUTRAL)  # filled as a list, one tensor at the end: per-element tensor writes cost more
        if not c.jitter_p < torch.rand(1):  # torchvision's RandomApply: skip if p < rand
            params[JITTER] = 1.0
            params[ORDER] = torch.randperm(4).tolist()
            # ColorJitter draws no factor for a strength of 0 (its range is then None).
            for column, strength, centre in (
                (BRIGHTNESS, c.brightness, 1.0),
                (CONTRAST, c.contrast, 1.0),
                (SATURATION, c.saturation, 1.0),
                (HUE, c.hue, 0.0),
            ):
                if strength > 0:
                    low = max(0.0, centre - strength) if centre else -strength
                    params[column] = torch.empty(1).uniform_(low, centre + strength).item()
        params[GRAYSCALE] = float(torch.rand(1).item() < c.grayscale_p)
        if torch.rand(1).item() < c.blur_p:
            params[BLUR] = 1.0
            params[SIGMA] = torch.empty(1).uniform_(c.blur_radius_min, c.blur_radius_max).item()
        if c.solarization_p > 0 and torch.rand(1).item() < c.solarization_p:
            params[SOLARIZE] = 1.0
        return torch.tensor(params, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


# ----------------------------------------------------------------------------------- batched operations
# Every op maps (n, 3, H, W) float in [0, 1] and (n,) factors to (n, 3, H, W) in [0, 1]. The ops may
# overwrite their input (apply_photometric owns every tensor it passes): fresh 20 MB temporaries per op
# cost more than the arithmetic on a CPU.


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1).to(torch.float32)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma ``0.2989 R + 0.587 G + 0.114 B`` (torchvision's weights)."""
    r, g, b = images.unbind(1)
    gray = r * GRAY_WEIGHTS[0]
    gray.add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])
    return gray.unsqueeze(1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f x, 0, 1)`` per sample (torchvision ``adjust_brightness``)."""
    return images.mul_(_per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f x + (1 - f) m, 0, 1)``, m = the image's mean luma (torchvision ``adjust_contrast``).

    m is taken as the luma of the channel means (the same number: the luma is linear).
    """
    channel_means = images.mean(dim=(2, 3))  # (n, 3)
    weights = torch.tensor(GRAY_WEIGHTS, device=images.device, dtype=images.dtype)
    mean = (channel_means * weights).sum(dim=1).view(-1, 1, 1, 1)
    factor = _per_sample(factor)
    return images.mul_(factor).add_((1 - factor) * mean).clamp_(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f x + (1 - f) gray(x), 0, 1)`` per pixel (torchvision ``adjust_saturation``)."""
    factor = _per_sample(factor)
    gray = grayscale(images).mul_(1 - factor)
    return images.mul_(factor).add_(gray).clamp_(0.0, 1.0)


def _mod6(values: torch.Tensor) -> torch.Tensor:
    """``values mod 6`` in [0, 6), in place (``v - 6 floor(v / 6)``: torch's remainder is slow on CPU)."""
    return values.sub_((values / 6.0).floor_().mul_(6.0))  # in-place floor_: the out-of-place one is slow


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``factor`` turns, keeping saturation and value (torchvision ``adjust_hue``).

    With V = max(r, g, b), C = V - min(r, g, b) and the hue in sixths of a turn
    ``h6 = (g - b) / C`` if R is the max, else ``2 + (b - r) / C`` if G is, else ``4 + (r - g) / C``
    (torchvision's priority on ties; 0 when C = 0), the shifted image is, per channel n = 5 (R), 3 (G), 1 (B),

        out_n = V - C * clamp(2 - |k_n - 2|, 0, 1),     k_n = (n + h6 + 6 f) mod 6,

    which is the HSV -> RGB map (``clamp(min(k, 4 - k), 0, 1)`` written with one ``abs``) evaluated without
    forming S = C / V. The masks are blended arithmetically: ``torch.where`` is slow on CPU.
    """
    r, g, b = images.unbind(1)
    value = images.amax(dim=1)  # (n, H, W)
    chroma = value - images.amin(dim=1)
    is_r = (r == value).to(images.dtype)
    is_g = (g == value).to(images.dtype).mul_(1 - is_r)
    numerator_b = chroma * 4.0 + r - g  # (4 + (r - g) / C) C
    numerator = numerator_b + is_r * ((g - b) - numerator_b) + is_g * ((chroma * 2.0 + b - r) - numerator_b)
    hue6 = numerator.div_(chroma + (chroma == 0).to(images.dtype))
    hue6 = _mod6(hue6.add_(6.0 * factor.view(-1, 1, 1).to(images.dtype)))
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = _mod6(torch.add(hue6.unsqueeze(1), offsets, out=images))  # (n, 3, H, W), reuses the input's memory
    ramp = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return ramp.mul_(chroma.unsqueeze(1)).neg_().add_(value.unsqueeze(1))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``sigma`` (per sample), taps ``-radius..radius``.

    Borders replicate the edge pixels, as PIL's ``GaussianBlur`` does.
    """
    n, channels, height, width = images.shape
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    weights = torch.exp(-0.5 * (taps[None] / sigma[:, None].to(images.dtype)) ** 2)  # (n, 2R + 1)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = images.reshape(1, n * channels, height, width)
    flat = nnf.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = nnf.conv2d(flat, weights.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = nnf.conv2d(flat, weights.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


def solarize(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """Values ``>= threshold`` (on the [0, 1] scale) become ``1 - value`` (PIL ``ImageOps.solarize``)."""
    inverted = (images >= threshold).to(images.dtype)
    return images.add_(inverted.mul_(1.0 - 2.0 * images))  # x + [x >= t] (1 - 2x); torch.where is slow


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 3, H, W) with every channel the luma (torchvision ``rgb_to_grayscale``, 3 out)."""
    return images.copy_(grayscale(images).expand_as(images))


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# ----------------------------------------------------------------------------------- the whole pipeline


def _indices(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Host-side (n,) bool -> device index tensor; None when every sample is selected."""
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1).to(device, non_blocking=True)


def _apply(
    images: torch.Tensor,
    mask: torch.Tensor,
    op: Callable[..., torch.Tensor],
    *per_sample: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """``op`` on the samples where the host-side bool ``mask`` is True, in place on ``images``."""
    if not bool(mask.any()):
        return images
    index = _indices(mask, images.device)
    if index is None:
        return op(images, *per_sample, **kwargs)
    images[index] = op(images[index], *(value[index] for value in per_sample), **kwargs)
    return images


def blur_radius(blur_radius_max: float) -> int:
    """Taps on each side of the blur kernel: 3 standard deviations of the largest sigma, at least 1."""
    return max(1, math.ceil(3.0 * blur_radius_max))


# On a CPU the ops are memory-bound: a block of 4 views of 224 px (2.4 MB in float32) stays in cache through
# the ~40 passes of the pipeline, which makes it 20 % faster than whole batches (hue alone 45 %). GPUs take
# the whole batch at once.
CPU_BLOCK = 4


def apply_photometric(
    images: torch.Tensor,
    params: torch.Tensor,
    radius: int,
    solarization_threshold: int = 128,
    normalize: bool = True,
) -> torch.Tensor:
    """Colour jitter, grayscale, blur, solarisation and normalisation of a batch, per-sample parameters.

    Args:
        images: (B, 3, H, W) uint8 views (on the training device).
        params: (B, P) float32 parameters from :class:`PhotometricSampler`, on the host (the per-sample
            choices are read there; the factors are copied to the device).
        radius: blur taps on each side (:func:`blur_radius` of the largest configured radius).
        solarization_threshold: on the 0..255 scale (PIL's).
        normalize: finish with ImageNet normalisation ``(x - mean) / std``; otherwise return [0, 1] values.
    Returns:
        (B, 3, H, W) float32 on the device of ``images``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W) uint8; got {tuple(images.shape)} {images.dtype}")
    if params.shape != (images.shape[0], NUM_PARAMS):
        raise ValueError(f"params: expected ({images.shape[0]}, {NUM_PARAMS}); got {tuple(params.shape)}")
    params = params.cpu()
    block = CPU_BLOCK if images.device.type == "cpu" else images.shape[0]
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    for first in range(0, images.shape[0], block):
        last = first + block
        out[first:last] = _photometric_block(
            images[first:last], params[first:last], radius, solarization_threshold
        )
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN, device=out.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=out.device).view(1, 3, 1, 1)
        out = out.sub_(mean).div_(std)
    return out


def _photometric_block(
    images: torch.Tensor, params: torch.Tensor, radius: int, solarization_threshold: int
) -> torch.Tensor:
    """:func:`apply_photometric` without the normalisation, on one block of samples; values in [0, 1]."""
    factors = params.to(images.device, non_blocking=True)
    x = images.to(torch.float32).div_(255.0)
    jittered = params[:, JITTER] > 0
    order = params[:, ORDER].long()
    for position in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            mask = jittered & (order[:, position] == op_index)
            x = _apply(x, mask, op, factors[:, BRIGHTNESS + op_index])
    x = _apply(x, params[:, GRAYSCALE] > 0, to_grayscale)
    x = _apply(x, params[:, BLUR] > 0, gaussian_blur, factors[:, SIGMA], radius=radius)
    return _apply(x, params[:, SOLARIZE] > 0, solarize, threshold=solarization_threshold / 255.0)
