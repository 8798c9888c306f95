"""CrIBo's two-view augmentation with exact patch-centre coordinates (docs/method.md, Sec. 2).

Every view is a random resized crop (box sampled explicitly with torchvision's semantics), an optional
horizontal flip, then a photometric pipeline (DINO's). Because the box and flip are known, the
original-image coordinates of every patch centre follow in closed form; no coordinate map is warped
(the reference's 2 x 10000 x 10000 table and per-sample 2 x 224 x 224 maps are not needed).

All randomness comes from torch's global RNG (as in torchvision), so ``DataLoader`` worker seeding makes
the augmentation streams distinct per worker and reproducible per seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from einops import rearrange
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode

from data.batched_photometric import PhotometricConfig, PhotometricSampler, blur_radius
from data.transforms import DEFAULT_RATIO, CropBox, _as_rgb, _check_range, normalize, sample_crop_box

logger = logging.getLogger(__name__)

AUGMENT_ON = ("workers", "device")
PilTransform = Callable[[Image.Image], Image.Image]


def patch_grid_shape(out_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Rows and columns of the patch grid of a view of size ``out_size``; both sides must divide by the patch.

    Args:
        out_size: S (square) or (H_out, W_out).
        patch_size: p.
    Returns:
        (H_out // p, W_out // p).
    """
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"`--patch_size`: expected a positive integer; got {patch_size!r}.")
    if out_h <= 0 or out_w <= 0 or out_h % patch_size or out_w % patch_size:
        raise ValueError(
            f"crop size {out_h}x{out_w} is not a positive multiple of `--patch_size` {patch_size}: "
            f"choose an image/crop size divisible by {patch_size} "
            f"(e.g. {max(1, out_h // patch_size) * patch_size})."
        )
    return out_h // patch_size, out_w // patch_size


def patch_centre_coordinates_batched(
    boxes: torch.Tensor,
    flipped: torch.Tensor,
    out_size: int | tuple[int, int],
    patch_size: int,
) -> torch.Tensor:
    """Original-image coordinates of every patch centre for a batch of crops (docs/method.md, Sec. 2).

    A crop box (top t, left l, height h, width w) resized to H_out x W_out maps output pixel u to input
    coordinate ``l + (u + 1/2) w / W_out - 1/2`` (pixel centres at integers). Averaging over the p pixels
    ``u = p b .. p b + p - 1`` of patch column b (and likewise rows a) gives

        x(b) = l + (p b + p/2) w / W_out - 1/2,      y(a) = t + (p a + p/2) h / H_out - 1/2.

    A horizontally flipped view shows original column ``ncols - 1 - b`` at column b: ``x(ncols - 1 - b)``.

    Args:
        boxes: (B, 4) crop boxes as (top, left, height, width) in original pixels.
        flipped: (B,) bool, True where the view was flipped after resizing.
        out_size: S or (H_out, W_out), the resized view size.
        patch_size: p.
    Returns:
        (B, 2, N) float32, N = (H_out / p) (W_out / p); row 0 = x, row 1 = y; tokens row-major.
    """
    rows, cols = patch_grid_shape(out_size, patch_size)
    out_h, out_w = rows * patch_size, cols * patch_size
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"boxes: expected shape (B, 4) = (top, left, height, width); got {tuple(boxes.shape)}."
        )
    if flipped.shape != boxes.shape[:1]:
        raise ValueError(f"flipped: expected shape ({boxes.shape[0]},); got {tuple(flipped.shape)}.")
    boxes = boxes.to(torch.float64)
    top, left, height, width = boxes.unbind(dim=1)
    offsets_x = torch.arange(cols, dtype=torch.float64) * patch_size + patch_size / 2  # (cols,)
    offsets_y = torch.arange(rows, dtype=torch.float64) * patch_size + patch_size / 2  # (rows,)
    x = left[:, None] + offsets_x[None] * (width / out_w)[:, None] - 0.5  # (B, cols)
    y = top[:, None] + offsets_y[None] * (height / out_h)[:, None] - 0.5  # (B, rows)
    x = torch.where(flipped.to(torch.bool)[:, None], x.flip(-1), x)
    grid = torch.stack(
        [x[:, None, :].expand(-1, rows, cols), y[:, :, None].expand(-1, rows, cols)], dim=1
    )  # (B, 2, rows, cols)
    return rearrange(grid, "b c h w -> b c (h w)").to(torch.float32)


def patch_centre_coordinates(
    top: float,
    left: float,
    height: float,
    width: float,
    out_size: int | tuple[int, int],
    patch_size: int,
    flipped: bool,
) -> torch.Tensor:
    """Original-image coordinates of every patch centre of one view (docs/method.md, Sec. 2).

        x(b) = left + (p b + p/2) width / W_out - 1/2,    y(a) = top + (p a + p/2) height / H_out - 1/2,

    with ``x(ncols - 1 - b)`` in place of ``x(b)`` when the view is flipped. See
    :func:`patch_centre_coordinates_batched` for the derivation.

    Args:
        top, left, height, width: crop box in original-image pixels.
        out_size: S or (H_out, W_out), the resized view size.
        patch_size: p.
        flipped: whether the view was horizontally flipped after resizing.
    Returns:
        (2, N) float32: row 0 = x, row 1 = y, tokens row-major (the ViT patch order).
    """
    # The batched formula, operation for operation, in numpy: bit-identical to
    # ``patch_centre_coordinates_batched`` and a fifth of its cost per view (no per-op torch dispatch), which
    # matters as it runs for every view in the data-loading workers.
    rows, cols = patch_grid_shape(out_size, patch_size)
    out_h, out_w = rows * patch_size, cols * patch_size
    offsets_x = np.arange(cols, dtype=np.float64) * patch_size + patch_size / 2
    offsets_y = np.arange(rows, dtype=np.float64) * patch_size + patch_size / 2
    x = float(left) + offsets_x * (float(width) / out_w) - 0.5
    y = float(top) + offsets_y * (float(height) / out_h) - 0.5
    if flipped:
        x = x[::-1]
    grid = np.empty((2, rows, cols), dtype=np.float32)
    grid[0], grid[1] = x[None, :], y[:, None]
    return torch.from_numpy(grid.reshape(2, rows * cols))


class RandomGaussianBlur:
    """PIL Gaussian blur with radius ~ U(radius_min, radius_max), applied with probability ``p`` (DINO)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"blur probability must be in [0, 1]; got {p}.")
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    @staticmethod
    def blur(img: Image.Image, radius: float) -> Image.Image:
        """Gaussian blur of standard deviation ``radius`` pixels."""
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return img
        radius = torch.empty(1).uniform_(self.radius_min, self.radius_max).item()
        return self.blur(img, radius)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class RandomSolarization:
    """PIL solarisation (values >= ``threshold`` become 255 - value) with probability ``p`` (DINO)."""

    def __init__(self, p: float, threshold: int = 128) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"solarisation probability must be in [0, 1]; got {p}.")
        self.p, self.threshold = p, threshold

    @staticmethod
    def solarize(img: Image.Image, threshold: int) -> Image.Image:
        """Invert every channel value at or above ``threshold``."""
        return ImageOps.solarize(img, threshold=threshold)

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return img
        return self.solarize(img, self.threshold)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, threshold={self.threshold})"


def colour_distortion(hue: float = 0.1, grayscale_p: float = 0.2) -> T.Compose:
    """DINO's colour pipeline: ColorJitter(0.4, 0.4, 0.2, hue) with p = 0.8, then grayscale (p = grayscale_p).

    DINO uses hue 0.1 and grayscale 0.2 (the defaults).
    """
    return T.Compose(
        [
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=hue)], p=0.8),
            T.RandomGrayscale(p=grayscale_p),
        ]
    )


def photometric_pipeline(
    blur_p: float,
    solarization_p: float,
    hue: float = 0.1,
    grayscale_p: float = 0.2,
    blur_radius_max: float = 2.0,
) -> T.Compose:
    """Colour distortion, Gaussian blur (prob. ``blur_p``, radius U(0.1, blur_radius_max)), solarisation."""
    return pil_photometric(
        PhotometricConfig(
            blur_p,
            solarization_p,
            hue,
            grayscale_p,
            blur_radius_min=min(0.1, blur_radius_max),
            blur_radius_max=blur_radius_max,
        )
    )


def pil_photometric(config: PhotometricConfig) -> T.Compose:
    """The PIL pipeline of one view (the reference's): ColorJitter, grayscale, blur, then solarisation."""
    ops: list[PilTransform] = [
        T.Compose(
            [
                T.RandomApply(
                    [T.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue)],
                    p=config.jitter_p,
                ),
                T.RandomGrayscale(p=config.grayscale_p),
            ]
        ),
        RandomGaussianBlur(config.blur_p, config.blur_radius_min, config.blur_radius_max),
    ]
    if config.solarization_p > 0:
        ops.append(RandomSolarization(config.solarization_p, config.solarization_threshold))
    return T.Compose(ops)


def view_photometric_configs(
    image_size: int = 224, hue: float = 0.1, grayscale_p: float = 0.2, blur_radius_max: float | None = None
) -> tuple[PhotometricConfig, PhotometricConfig, PhotometricConfig]:
    """Photometric settings of (global view 1, global view 2, local crops) (docs/method.md, Sec. 2).

    View 1: blur p = 1.0, no solarisation; view 2: blur p = 0.1, solarisation p = 0.2; local crops (DINO):
    blur p = 0.5. DINO's blur radius U(0.1, 2.0) is meant for 224 px crops; by default its maximum scales
    with the crop size so that small crops (e.g. 96 px on the synthetic scenes) keep their textures.
    """
    if blur_radius_max is None:
        blur_radius_max = 2.0 * image_size / 224.0
    radius_min = min(0.1, blur_radius_max)
    return tuple(  # type: ignore[return-value]  # three items
        PhotometricConfig(blur_p, solarization_p, hue, grayscale_p, radius_min, blur_radius_max)
        for blur_p, solarization_p in ((1.0, 0.0), (0.1, 0.2), (0.5, 0.0))
    )


def blur_kernel_radius(image_size: int, blur_radius_max: float | None = None) -> int:
    """Taps on each side of the device blur kernel for the views of :func:`view_photometric_configs`."""
    configs = view_photometric_configs(image_size, blur_radius_max=blur_radius_max)
    return blur_radius(max(config.blur_radius_max for config in configs))


class RandomResizedCropWithPositions:
    """Random resized crop and horizontal flip that also returns the patch-centre coordinates of the view.

    Args:
        size: output side S (a multiple of ``patch_size``).
        patch_size: p.
        scale: area-fraction range of the crop (torchvision semantics, see ``sample_crop_box``).
        ratio: aspect-ratio range, sampled log-uniformly.
        interpolation: resampling of the image (bicubic in DINO/CrIBo).
        flip_p: probability of a horizontal flip.
    """

    def __init__(
        self,
        size: int,
        patch_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float] = DEFAULT_RATIO,
        interpolation: InterpolationMode = InterpolationMode.BICUBIC,
        flip_p: float = 0.5,
    ) -> None:
        patch_grid_shape(size, patch_size)
        self.size, self.patch_size = size, patch_size
        self.scale, self.ratio = scale, ratio
        self.interpolation, self.flip_p = interpolation, flip_p

    def sample(self, img: Image.Image) -> tuple[CropBox, bool]:
        """Draw a crop box and a flip decision for ``img`` from torch's global RNG."""
        box = sample_crop_box(img.height, img.width, self.scale, self.ratio)
        return box, bool(torch.rand(1).item() < self.flip_p)

    def apply(self, img: Image.Image, box: CropBox, flipped: bool) -> Image.Image:
        """Crop ``box``, resize to S x S, then flip if ``flipped``."""
        out = F.resized_crop(
            img, box.top, box.left, box.height, box.width, [self.size, self.size], self.interpolation
        )
        return F.hflip(out) if flipped else out

    def apply_nearest(self, labels: Image.Image, box: CropBox, flipped: bool) -> Image.Image:
        """:meth:`apply` for a label map: the same box and flip, nearest-neighbour resampling."""
        out = F.resized_crop(
            labels,
            box.top,
            box.left,
            box.height,
            box.width,
            [self.size, self.size],
            InterpolationMode.NEAREST,
        )
        return F.hflip(out) if flipped else out

    def positions(self, box: CropBox, flipped: bool) -> torch.Tensor:
        """(2, N) patch-centre coordinates of the view cut by ``box`` (see ``patch_centre_coordinates``)."""
        return patch_centre_coordinates(
            box.top, box.left, box.height, box.width, self.size, self.patch_size, flipped
        )

    def __call__(self, img: Image.Image) -> tuple[Image.Image, torch.Tensor]:
        """Return (the S x S view as a PIL image, its (2, N) float32 patch-centre coordinates)."""
        box, flipped = self.sample(img)
        return self.apply(img, box, flipped), self.positions(box, flipped)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, patch_size={self.patch_size}, scale={self.scale}, "
            f"ratio={self.ratio}, interpolation={self.interpolation.value}, flip_p={self.flip_p})"
        )


def _renderings(img: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    """One image or a non-empty sequence of same-size renderings, as a list of RGB images."""
    if not isinstance(img, (list, tuple)):
        return [_as_rgb(img)]
    renderings = [_as_rgb(item) for item in img]
    if not renderings or any(item.size != renderings[0].size for item in renderings):
        sizes = [item.size for item in renderings]
        raise ValueError(f"expected one image or renderings of one size; got sizes {sizes}")
    return renderings


class TwoViewTransform:
    """CrIBo's augmentation: two global views (plus optional local crops) with patch-centre coordinates.

    Global views (docs/method.md, Sec. 2): RandomResizedCrop to ``image_size`` (area fraction
    ~ U(global_crops_scale), log-uniform aspect in [3/4, 4/3], bicubic), flip p = 0.5,
    ColorJitter(0.4, 0.4, 0.2, 0.1) p = 0.8, grayscale p = 0.2, Gaussian blur (radius U(0.1, 2)) p = 1.0
    on view 1 and 0.1 on view 2, solarisation (threshold 128) p = 0.2 on view 2 only, ToTensor +
    ImageNet normalisation.
    Local crops (DINO): the same with ``local_crops_size``, ``local_crops_scale`` and blur p = 0.5.

    ``augment_on="workers"`` (the reference): everything here, on PIL images; the photometric stages are
    public attributes (``global_photometric``: one per global view, ``local_photometric``) applied before
    ``to_tensor``. ``augment_on="device"``: crop and flip here, the views stay uint8, and the photometric
    parameters of each view are drawn here (``global_samplers`` / ``local_sampler``, the same random numbers
    in the same order as the PIL stages) for :func:`data.batched_photometric.apply_photometric` to apply
    on the training device.

    Args:
        image_size: S, side of the global views (a multiple of ``patch_size``).
        patch_size: p, ViT patch size, for the coordinates.
        global_crops_scale: area-fraction range of the global crops.
        local_crops_number: number of local crops (0 in every released CrIBo run).
        local_crops_scale: area-fraction range of the local crops.
        local_crops_size: side of the local crops (a multiple of ``patch_size``).
        hue, grayscale_p, blur_radius_max: see :func:`view_photometric_configs`.
        augment_on: "workers" or "device", where the photometric stages run.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        global_crops_scale: tuple[float, float] = (0.25, 1.0),
        local_crops_number: int = 0,
        local_crops_scale: tuple[float, float] = (0.05, 0.25),
        local_crops_size: int = 96,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_radius_max: float | None = None,
        augment_on: str = "workers",
    ) -> None:
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"`--augment_on`: expected one of {AUGMENT_ON}; got {augment_on!r}.")
        global_crops_scale = _check_range("--global_crops_scale", global_crops_scale, upper=1.0)
        if (
            isinstance(local_crops_number, bool)
            or not isinstance(local_crops_number, int)
            or local_crops_number < 0
        ):
            raise ValueError(f"`--local_crops_number`: expected an integer >= 0; got {local_crops_number!r}.")
        self.augment_on = augment_on
        self.global_crop = RandomResizedCropWithPositions(image_size, patch_size, global_crops_scale)
        view1, view2, local = view_photometric_configs(image_size, hue, grayscale_p, blur_radius_max)
        self.photometric_configs = (view1, view2, local)
        self.global_photometric = (pil_photometric(view1), pil_photometric(view2))
        self.global_samplers = (PhotometricSampler(view1), PhotometricSampler(view2))
        self.local_crops_number = local_crops_number
        self.local_crop: RandomResizedCropWithPositions | None = None
        self.local_photometric = pil_photometric(local)
        self.local_sampler = PhotometricSampler(local)
        if local_crops_number > 0:
            local_crops_scale = _check_range("--local_crops_scale", local_crops_scale, upper=1.0)
            self.local_crop = RandomResizedCropWithPositions(local_crops_size, patch_size, local_crops_scale)
        self.to_tensor = normalize()

    @property
    def blur_radius_max(self) -> float:
        """The largest blur radius of any view (sizes the device blur kernel)."""
        return max(config.blur_radius_max for config in self.photometric_configs)

    @property
    def num_patches(self) -> int:
        """N, tokens per global view."""
        rows, cols = patch_grid_shape(self.global_crop.size, self.global_crop.patch_size)
        return rows * cols

    def __call__(
        self, img: Image.Image | Sequence[Image.Image], label_map: np.ndarray | None = None
    ) -> tuple[list[torch.Tensor], ...]:
        """Augment one image.

        Args:
            img: PIL image of any size (converted to RGB if needed), or a sequence of m renderings of the
                same image (same size; e.g. differently coloured, see
                :class:`data.synthetic.SyntheticScenes`): crop v (global views first, then local crops) is
                cut from rendering v mod m, with coordinates in the common pixel frame.
            label_map: optional (H, W) uint8 per-pixel labels of the image (e.g. instance ids), cut with
                every crop's box and flip and resized with nearest-neighbour sampling. It draws no random
                number, so the views are those of a call without it.
        Returns:
            ``augment_on="workers"``: (crops, positions): ``crops[0]``, ``crops[1]`` global views (3, S, S)
            float32 normalised, then the local crops (3, s, s); ``positions[i]`` (2, N_i) float32 patch
            centres of crop i in original-image pixels (row 0 = x, row 1 = y, tokens row-major).
            ``augment_on="device"``: (crops, positions, params) with uint8 crops (3, S, S) before any
            photometric change and ``params[i]`` the (P,) photometric parameters of crop i.
            With ``label_map``, one more item: ``labels[i]`` (S_i, S_i) long labels of crop i.
        """
        renderings = _renderings(img)
        labels_image = None if label_map is None else Image.fromarray(np.asarray(label_map, dtype=np.uint8))
        on_device = self.augment_on == "device"
        crops: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        params: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        views = [(self.global_crop, self.global_photometric[v], self.global_samplers[v]) for v in range(2)]
        if self.local_crop is not None:
            views += [(self.local_crop, self.local_photometric, self.local_sampler)] * self.local_crops_number
        for v, (crop, photometric, sampler) in enumerate(views):
            rendering = renderings[v % len(renderings)]
            box, flipped = crop.sample(rendering)
            view = crop.apply(rendering, box, flipped)
            if on_device:
                crops.append(F.pil_to_tensor(view))
                params.append(sampler.sample())
            else:
                crops.append(self.to_tensor(photometric(view)))
            positions.append(crop.positions(box, flipped))
            if labels_image is not None:
                cut = crop.apply_nearest(labels_image, box, flipped)
                labels.append(torch.from_numpy(np.asarray(cut, dtype=np.int64)))
        outputs = (crops, positions, params) if on_device else (crops, positions)
        return (*outputs, labels) if labels_image is not None else outputs

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crop={self.global_crop!r}, local_crops_number="
            f"{self.local_crops_number}, local_crop={self.local_crop!r}, augment_on={self.augment_on!r})"
        )
