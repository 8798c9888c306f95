"""Tests for data/augmentations.py: closed-form patch-centre coordinates and the two-view transform."""

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode

from data.augmentations import (
    RandomGaussianBlur,
    RandomResizedCropWithPositions,
    RandomSolarization,
    TwoViewTransform,
    patch_centre_coordinates,
    patch_centre_coordinates_batched,
)
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, sample_crop_box

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _unnormalise(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised -> (3, H, W) in [0, 255]."""
    return (image * STD + MEAN) * 255


def _literal_patch_centres(top, left, height, width, out_h, out_w, patch, flipped) -> torch.Tensor:
    """Slow reference: source coordinate of every output pixel, mirrored if flipped, averaged per patch."""
    source_x = np.zeros((out_h, out_w))
    source_y = np.zeros((out_h, out_w))
    for v in range(out_h):
        for u in range(out_w):
            # A resize maps output pixel centre u + 1/2 to input position left + (u + 1/2) * width / out_w.
            source_x[v, u] = left + (u + 0.5) * width / out_w - 0.5
            source_y[v, u] = top + (v + 0.5) * height / out_h - 0.5
    if flipped:
        source_x, source_y = source_x[:, ::-1], source_y[:, ::-1]
    centres = []
    for a in range(out_h // patch):
        for b in range(out_w // patch):
            block = (slice(a * patch, (a + 1) * patch), slice(b * patch, (b + 1) * patch))
            centres.append((source_x[block].mean(), source_y[block].mean()))
    return torch.tensor(centres, dtype=torch.float64).T


def _coordinate_map(height: int, width: int) -> torch.Tensor:
    """(2, H, W) float64: channel 0 = column index x, channel 1 = row index y of each original pixel."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([xs, ys])


def _block_means(view_map: torch.Tensor, patch: int) -> torch.Tensor:
    """(2, H, W) -> (2, N) mean of every patch x patch block, row-major."""
    return torch.nn.functional.avg_pool2d(view_map[None], patch)[0].flatten(1)


def _identity(img: Image.Image) -> Image.Image:
    return img


# ----------------------------------------------------------------------------- closed form


def test_patch_centres_hand_values():
    # Identity crop: the centre of pixels 0..15 is 7.5, of 16..31 is 23.5.
    expected = torch.tensor([[7.5, 23.5, 7.5, 23.5], [7.5, 7.5, 23.5, 23.5]])
    assert torch.equal(patch_centre_coordinates(0, 0, 32, 32, 32, 16, False), expected)
    # Crop (top 10, left 20, 64 x 32) to 32 x 32, p 16: x = 20 + (16b + 8) - 0.5, y = 10 + 2 (16a + 8) - 0.5.
    expected = torch.tensor([[27.5, 43.5, 27.5, 43.5], [25.5, 25.5, 57.5, 57.5]])
    assert torch.equal(patch_centre_coordinates(10, 20, 64, 32, 32, 16, False), expected)
    flipped = torch.tensor([[43.5, 27.5, 43.5, 27.5], [25.5, 25.5, 57.5, 57.5]])
    assert torch.equal(patch_centre_coordinates(10, 20, 64, 32, 32, 16, True), flipped)
    # Non-square output (H_out 32, W_out 48): 2 rows x 3 columns, row-major.
    coords = patch_centre_coordinates(0, 0, 32, 48, (32, 48), 16, False)
    assert coords.shape == (2, 6) and coords.dtype == torch.float32
    assert torch.equal(coords[0], torch.tensor([7.5, 23.5, 39.5] * 2))
    assert torch.equal(coords[1], torch.tensor([7.5] * 3 + [23.5] * 3))


def test_patch_centres_equal_literal_per_pixel_formula():
    generator = np.random.default_rng(0)
    for out_size, patch in (((32, 32), 8), ((48, 32), 16), ((16, 40), 8)):
        for _ in range(6):
            height, width = generator.integers(5, 400, size=2)
            top, left = generator.integers(0, 300, size=2)
            flipped = bool(generator.integers(2))
            fast = patch_centre_coordinates(top, left, height, width, out_size, patch, flipped)
            slow = _literal_patch_centres(top, left, height, width, *out_size, patch, flipped)
            assert fast.shape == slow.shape
            assert torch.allclose(fast.double(), slow, rtol=0, atol=1e-4)


def test_single_view_patch_centres_are_bit_identical_to_the_batched_formula():
    """The per-view numpy path of the workers equals patch_centre_coordinates_batched exactly."""
    generator = np.random.default_rng(1)
    for out_size, patch in ((224, 16), ((48, 32), 16), ((16, 40), 8)):
        for _ in range(20):
            height, width = generator.uniform(5.0, 400.0, size=2)
            top, left = generator.uniform(0.0, 300.0, size=2)
            flipped = bool(generator.integers(2))
            one = patch_centre_coordinates(top, left, height, width, out_size, patch, flipped)
            boxes = torch.tensor([[top, left, height, width]], dtype=torch.float64)
            batched = patch_centre_coordinates_batched(boxes, torch.tensor([flipped]), out_size, patch)[0]
            assert one.dtype == torch.float32 and one.is_contiguous()
            assert torch.equal(one, batched)


@pytest.mark.parametrize(
    "image_hw, out_size, patch",
    [((48, 64), 32, 8), ((40, 30), 64, 16), ((150, 200), 32, 8), ((37, 53), 64, 16)],
)
def test_patch_centres_equal_dense_map_bilinear(image_hw, out_size, patch):
    """Warp a map of original coordinates with the same crop/resize/flip and average per patch."""
    coordinate_map = _coordinate_map(*image_hw)
    for _ in range(25):
        box = sample_crop_box(*image_hw, (0.25, 1.0))
        flipped = bool(torch.rand(1) < 0.5)
        view = F.resized_crop(
            coordinate_map,
            box.top,
            box.left,
            box.height,
            box.width,
            [out_size, out_size],
            InterpolationMode.BILINEAR,
            antialias=False,
        )
        view = view.flip(-1) if flipped else view
        expected = _block_means(view, patch)
        coords = patch_centre_coordinates(box.top, box.left, box.height, box.width, out_size, patch, flipped)
        # Only the border clamp of upsampling bilinear interpolation deviates (< 0.05 px after averaging).
        assert (coords.double() - expected).abs().max() < 0.05


@pytest.mark.parametrize(
    "image_hw, out_size, patch", [((48, 64), 32, 8), ((61, 45), 64, 16), ((300, 200), 32, 16)]
)
def test_patch_centres_equal_dense_map_pil_bicubic(image_hw, out_size, patch):
    """The same check through the exact resampling used on images (PIL bicubic, antialiased)."""
    coordinate_map = _coordinate_map(*image_hw).float().numpy()
    maps = [Image.fromarray(channel, mode="F") for channel in coordinate_map]
    crop = RandomResizedCropWithPositions(out_size, patch, scale=(0.25, 1.0))
    for _ in range(25):
        box = sample_crop_box(*image_hw, (0.25, 1.0))
        flipped = bool(torch.rand(1) < 0.5)
        view = torch.stack([torch.from_numpy(np.array(crop.apply(m, box, flipped))) for m in maps]).double()
        expected = _block_means(view, patch)
        assert (crop.positions(box, flipped).double() - expected).abs().max() < 0.05


def test_flip_reverses_x_and_keeps_y():
    for _ in range(20):
        top, left, height, width = torch.randint(1, 200, (4,)).tolist()
        plain = patch_centre_coordinates(top, left, height, width, (32, 48), 16, False)
        flipped = patch_centre_coordinates(top, left, height, width, (32, 48), 16, True)
        assert torch.equal(flipped[1], plain[1])
        assert torch.equal(flipped[0].view(2, 3), plain[0].view(2, 3).flip(-1))
        # Equivalently a mirror about the crop centre: x_flip = 2 left + width - 1 - x.
        assert torch.allclose(flipped[0], 2 * left + width - 1 - plain[0], atol=1e-4)
        # Two views with the same box and flip have identical coordinates.
        assert torch.equal(patch_centre_coordinates(top, left, height, width, (32, 48), 16, True), flipped)


def test_patch_centres_lie_inside_crop_box():
    for _ in range(50):
        box = sample_crop_box(90, 120, (0.05, 1.0))
        flipped = bool(torch.rand(1) < 0.5)
        x, y = patch_centre_coordinates(box.top, box.left, box.height, box.width, 32, 8, flipped)
        # Pixel i covers [i - 1/2, i + 1/2], so the box spans [left - 1/2, left + width - 1/2].
        assert (x > box.left - 0.5).all() and (x < box.left + box.width - 0.5).all()
        assert (y > box.top - 0.5).all() and (y < box.top + box.height - 0.5).all()


def test_batched_equals_single():
    boxes = torch.randint(1, 300, (7, 4))
    flipped = torch.rand(7) < 0.5
    batched = patch_centre_coordinates_batched(boxes, flipped, (32, 16), 8)
    assert batched.shape == (7, 2, 8) and batched.dtype == torch.float32
    for index in range(7):
        single = patch_centre_coordinates(*boxes[index].tolist(), (32, 16), 8, bool(flipped[index]))
        assert torch.equal(batched[index], single)


def test_size_validation_errors():
    with pytest.raises(ValueError, match="multiple of `--patch_size`"):
        TwoViewTransform(image_size=30, patch_size=16)
    with pytest.raises(ValueError, match="multiple of `--patch_size`"):
        TwoViewTransform(image_size=32, patch_size=16, local_crops_number=2, local_crops_size=40)
    with pytest.raises(ValueError, match="multiple of `--patch_size`"):
        patch_centre_coordinates(0, 0, 10, 10, (32, 20), 16, False)
    with pytest.raises(ValueError, match="global_crops_scale"):
        TwoViewTransform(image_size=32, patch_size=16, global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="global_crops_scale"):
        TwoViewTransform(image_size=32, patch_size=16, global_crops_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="local_crops_number"):
        TwoViewTransform(image_size=32, patch_size=16, local_crops_number=-1)
    with pytest.raises(ValueError, match="boxes"):
        patch_centre_coordinates_batched(torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool), 32, 16)


# ----------------------------------------------------------------------------- views of a real image


def test_dot_maps_to_the_same_place_in_both_views():
    """A bright dot found in a view's pixels lies in the patch whose coordinates point back to the dot."""
    height, width, dot_x, dot_y = 72, 96, 57, 30
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[dot_y - 1 : dot_y + 2, dot_x - 1 : dot_x + 2] = 255
    image = Image.fromarray(pixels)
    transform = TwoViewTransform(image_size=64, patch_size=16, local_crops_number=2, local_crops_size=32)
    transform.global_photometric = (_identity, _identity)
    transform.local_photometric = _identity
    pairs, flip_states = 0, set()
    for _ in range(60):
        crops, positions = transform(image)
        found = []
        for crop, coords in zip(crops, positions, strict=True):
            intensity = _unnormalise(crop).mean(0).clamp(min=0)
            size, patch = crop.shape[-1], 16
            bright = intensity > 0.3 * intensity.max()
            rows, cols = torch.nonzero(bright, as_tuple=True)
            # Keep views where the dot is clearly visible and not cut by the view border.
            if (
                intensity.max() < 100
                or rows.min() < 2
                or cols.min() < 2
                or rows.max() > size - 3
                or cols.max() > size - 3
            ):
                found.append(None)
                continue
            weights = intensity[rows, cols]
            centre_row = (rows.double() * weights).sum() / weights.sum()
            centre_col = (cols.double() * weights).sum() / weights.sum()
            grid = size // patch
            token = int(centre_row // patch) * grid + int(centre_col // patch)
            x, y = coords[:, token].double()
            coords_grid = coords.view(2, grid, grid)
            footprint_x = (coords_grid[0, 0, 1] - coords_grid[0, 0, 0]).abs().item()
            footprint_y = (coords_grid[1, 1, 0] - coords_grid[1, 0, 0]).abs().item()
            flip_states.add(bool(coords_grid[0, 0, 1] < coords_grid[0, 0, 0]))
            assert abs(x - dot_x) <= footprint_x / 2 + 0.5
            assert abs(y - dot_y) <= footprint_y / 2 + 0.5
            found.append((x, y, footprint_x, footprint_y))
        if found[0] is not None and found[1] is not None:
            (x1, y1, fx1, fy1), (x2, y2, fx2, fy2) = found[0], found[1]
            assert abs(x1 - x2) <= (fx1 + fx2) / 2 + 1 and abs(y1 - y2) <= (fy1 + fy2) / 2 + 1
            pairs += 1
    assert pairs >= 10 and flip_states == {False, True}


@pytest.mark.parametrize("mode, size", [("RGB", (80, 50)), ("L", (37, 90)), ("RGBA", (64, 64))])
def test_two_view_transform_on_real_images(mode, size):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    image = rgb.convert(mode)
    transform = TwoViewTransform(image_size=32, patch_size=16, local_crops_number=2, local_crops_size=16)
    crops, positions = transform(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert [tuple(p.shape) for p in positions] == [(2, 4)] * 2 + [(2, 1)] * 2
    assert all(c.dtype == torch.float32 for c in crops) and all(p.dtype == torch.float32 for p in positions)
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    for crop in crops:
        assert (crop >= low - 1e-5).all() and (crop <= high + 1e-5).all()
        assert crop.std() > 0.05
    for coords in positions:
        assert (coords[0] > -0.5).all() and (coords[0] < size[0] - 0.5).all()
        assert (coords[1] > -0.5).all() and (coords[1] < size[1] - 0.5).all()
    assert transform.num_patches == 4


def test_default_collate_batches_crops_and_positions():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(40, 56, 3), dtype=np.uint8))
    transform = TwoViewTransform(image_size=32, patch_size=16, local_crops_number=1, local_crops_size=16)
    (crops, positions), labels = default_collate([(transform(image), 0) for _ in range(3)])
    assert [tuple(c.shape) for c in crops] == [(3, 3, 32, 32), (3, 3, 32, 32), (3, 3, 16, 16)]
    assert [tuple(p.shape) for p in positions] == [(3, 2, 4), (3, 2, 4), (3, 2, 1)]
    assert labels.tolist() == [0, 0, 0]


def test_randomness_comes_from_torch_global_rng_only():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(40, 56, 3), dtype=np.uint8))
    transform = TwoViewTransform(image_size=32, patch_size=16, local_crops_number=1, local_crops_size=16)
    torch.manual_seed(3)
    crops_a, positions_a = transform(image)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(3)
    crops_b, positions_b = transform(image)
    assert all(torch.equal(a, b) for a, b in zip(crops_a + positions_a, crops_b + positions_b, strict=True))
    torch.manual_seed(4)
    crops_c, positions_c = transform(image)
    assert not all(torch.equal(a, b) for a, b in zip(positions_a, positions_c, strict=True))


# ----------------------------------------------------------------------------- photometric probabilities

BLUR_MARK, BOTH_MARK, SOLAR_MARK = (10, 20, 30), (40, 50, 60), (200, 210, 220)


def _mark_blur(img: Image.Image, radius: float) -> Image.Image:
    return Image.new("RGB", img.size, BLUR_MARK)


def _mark_solarize(img: Image.Image, threshold: int) -> Image.Image:
    return Image.new("RGB", img.size, BOTH_MARK if img.getpixel((0, 0)) == BLUR_MARK else SOLAR_MARK)


def test_blur_and_solarisation_probabilities_per_view(monkeypatch):
    """Blur and solarisation replaced by ops painting a marker colour; the output colour tells which ran."""
    monkeypatch.setattr(RandomGaussianBlur, "blur", staticmethod(_mark_blur))
    monkeypatch.setattr(RandomSolarization, "solarize", staticmethod(_mark_solarize))
    transform = TwoViewTransform(image_size=16, patch_size=8, local_crops_number=1, local_crops_size=8)
    image = Image.new("RGB", (20, 24), (120, 60, 90))
    draws = 600
    blurred, solarised = np.zeros((draws, 3), dtype=bool), np.zeros((draws, 3), dtype=bool)
    for draw in range(draws):
        crops, _ = transform(image)
        for view, crop in enumerate(crops):
            colour = tuple(_unnormalise(crop)[:, 0, 0].round().int().tolist())
            blurred[draw, view] = colour in (BLUR_MARK, BOTH_MARK)
            solarised[draw, view] = colour in (SOLAR_MARK, BOTH_MARK)
    # View 1: always blurred, never solarised. View 2: blur 0.1, solarisation 0.2. Local: blur 0.5, no solar.
    assert blurred[:, 0].all() and not solarised[:, 0].any()
    assert abs(blurred[:, 1].mean() - 0.1) < 0.05 and abs(solarised[:, 1].mean() - 0.2) < 0.07
    assert abs(blurred[:, 2].mean() - 0.5) < 0.08 and not solarised[:, 2].any()


def test_colour_jitter_and_grayscale_probabilities(monkeypatch):
    """On a constant-colour image: untouched = no jitter and no grayscale (0.2 * 0.8), grayscale 0.2."""
    monkeypatch.setattr(RandomGaussianBlur, "blur", staticmethod(lambda img, radius: img))
    monkeypatch.setattr(RandomSolarization, "solarize", staticmethod(lambda img, threshold: img))
    transform = TwoViewTransform(image_size=16, patch_size=8)
    original = torch.tensor([120.0, 60.0, 90.0])
    image = Image.new("RGB", (20, 24), tuple(int(v) for v in original))
    untouched, grey, views = 0, 0, 0
    for _ in range(500):
        crops, _ = transform(image)
        for crop in crops:
            pixels = _unnormalise(crop).flatten(1)
            untouched += bool(((pixels - original[:, None]).abs() < 0.51).all())
            grey += bool(
                ((pixels[0] - pixels[1]).abs() < 0.01).all() and ((pixels[1] - pixels[2]).abs() < 0.01).all()
            )
            views += 1
    assert abs(untouched / views - 0.16) < 0.04
    assert abs(grey / views - 0.2) < 0.045


def test_flip_probability():
    crop = RandomResizedCropWithPositions(16, 8, scale=(0.25, 1.0))
    image = Image.new("RGB", (30, 20))
    flips = np.mean([crop.sample(image)[1] for _ in range(2000)])
    assert abs(flips - 0.5) < 0.05


def test_real_blur_and_solarisation_ops():
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1))).convert("RGB")
    solarised = np.array(RandomSolarization(p=1.0)(ramp))[0, :, 0]
    expected = np.where(np.arange(256) < 128, np.arange(256), 255 - np.arange(256))
    assert np.array_equal(solarised, expected)
    assert RandomSolarization(p=0.0)(ramp) is ramp
    checker = Image.fromarray((np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    assert RandomGaussianBlur(p=0.0)(checker) is checker
    blurred = np.array(RandomGaussianBlur(p=1.0, radius_min=1.0, radius_max=1.0)(checker)).astype(float)
    assert blurred.std() < 0.5 * np.array(checker).astype(float).std()


def test_blur_radius_range(monkeypatch):
    radii = []
    monkeypatch.setattr(
        RandomGaussianBlur, "blur", staticmethod(lambda img, radius: radii.append(radius) or img)
    )
    blur = RandomGaussianBlur(p=1.0)
    for _ in range(1000):
        blur(Image.new("RGB", (2, 2)))
    radii = np.array(radii)
    assert len(radii) == 1000 and radii.min() >= 0.1 and radii.max() <= 2.0
    assert abs(radii.mean() - 1.05) < 0.05


def test_renderings_feed_the_views_in_turn_with_the_single_image_crops():
    """With m renderings, crop v comes from rendering v mod m; boxes and coordinates are as for one image."""
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    renderings = [Image.new("RGB", (40, 56), colour) for colour in colours]
    transform = TwoViewTransform(image_size=32, patch_size=16, local_crops_number=3, local_crops_size=16)
    transform.global_photometric = (_identity, _identity)
    transform.local_photometric = _identity
    for count in (2, 3):
        torch.manual_seed(7)
        crops, positions = transform(renderings[:count])
        for v, crop in enumerate(crops):
            expected = torch.tensor(colours[v % count], dtype=torch.float32).view(3, 1, 1)
            torch.testing.assert_close(_unnormalise(crop), expected.expand_as(crop), atol=1e-3, rtol=0)
        torch.manual_seed(7)
        _, single_positions = transform(renderings[0])
        assert all(torch.equal(a, b) for a, b in zip(positions, single_positions, strict=True))
    with pytest.raises(ValueError, match="renderings of one size"):
        transform([renderings[0], Image.new("RGB", (40, 40))])
    with pytest.raises(ValueError, match="renderings of one size"):
        transform([])
    with pytest.raises(TypeError, match="PIL"):
        transform(torch.zeros(3, 8, 8))
