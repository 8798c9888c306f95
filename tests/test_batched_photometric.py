"""Tests for data/batched_photometric.py: the device photometric pipeline against torchvision and PIL.

Tolerances against the PIL pipeline (0..255 levels) come from PIL's uint8 rounding after every op, its 8-bit
HSV hue and its box-filter approximation of the Gaussian: brightness, contrast, saturation and grayscale
within 1.5 levels per pixel (mean 0.6); hue within 4 levels (mean 0.5); blur within 8 levels (mean 0.75);
solarisation exact (float rounding aside). The whole two-view pipeline with the same seed: mean 2.5
levels, max 16 per view.
"""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image

from benchmarks.bench_data import natural_image
from data import batched_photometric as bp
from data.augmentations import (
    RandomGaussianBlur,
    RandomSolarization,
    TwoViewTransform,
    blur_kernel_radius,
    view_photometric_configs,
)
from data.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(natural_image(np.random.default_rng(0), 96, 128))


def _params(**values: float) -> torch.Tensor:
    """(1, P) neutral parameters with the named columns (``order=(...)`` for the jitter order) set."""
    params = torch.tensor(bp.NEUTRAL)[None].clone()
    order = values.pop("order", None)
    if order is not None:
        params[0, bp.ORDER] = torch.tensor(order, dtype=torch.float32)
    for name, value in values.items():
        params[0, getattr(bp, name.upper())] = value
    return params


def _device(image: Image.Image, params: torch.Tensor, radius: int = 6) -> torch.Tensor:
    """The device pipeline on one PIL image, as 0..255 floats (3, H, W)."""
    return bp.apply_photometric(F.pil_to_tensor(image)[None], params, radius, normalize=False)[0] * 255


def _assert_close_to_pil(pil: Image.Image, device: torch.Tensor, mean_levels: float, max_levels: float):
    difference = (F.pil_to_tensor(pil).float() - device).abs()
    assert difference.mean() <= mean_levels and difference.max() <= max_levels, (
        float(difference.mean()),
        float(difference.max()),
    )


# ----------------------------------------------------------------------------- the batched ops


@pytest.mark.parametrize(
    "ours, theirs, low, high",
    [
        (bp.adjust_brightness, F.adjust_brightness, 0.0, 2.0),
        (bp.adjust_contrast, F.adjust_contrast, 0.0, 2.0),
        (bp.adjust_saturation, F.adjust_saturation, 0.0, 2.0),
        (bp.adjust_hue, F.adjust_hue, -0.5, 0.5),
    ],
)
def test_ops_equal_torchvision_tensor_ops_per_sample(ours, theirs, low, high):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 9, 11, generator=generator)
    images[0] = 0.4  # grey: zero chroma
    images[1, 1] = images[1, 0]  # ties between the max channels
    images[2, 2] = images[2, 1]
    images[3] = (images[3] * 4).round() / 4  # many exact ties
    factors = torch.empty(12).uniform_(low, high, generator=generator)
    expected = torch.stack([theirs(images[i], float(factors[i])) for i in range(12)])
    torch.testing.assert_close(ours(images.clone(), factors), expected, atol=2e-6, rtol=0)


def test_gaussian_blur_equals_a_literal_convolution():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 10, 12, generator=generator)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    radius = 4
    blurred = bp.gaussian_blur(images.clone(), sigma, radius)
    padded = torch.nn.functional.pad(images, (radius,) * 4, mode="replicate")
    for n in range(3):
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        weights = torch.exp(-(taps**2) / (2 * float(sigma[n]) ** 2))
        weights = weights / weights.sum()
        kernel = weights[:, None] * weights[None, :]  # (2R + 1, 2R + 1)
        for y, x in ((0, 0), (5, 6), (9, 11), (3, 0)):
            window = padded[n, :, y : y + 2 * radius + 1, x : x + 2 * radius + 1].double()
            expected = (window * kernel).sum(dim=(1, 2))
            torch.testing.assert_close(blurred[n, :, y, x].double(), expected, atol=1e-5, rtol=0)


def test_batched_pipeline_equals_a_per_image_loop_in_each_images_order():
    """Per-sample order and flags: the grouped, vectorised pipeline equals a slow loop over images."""
    torch.manual_seed(2)
    images = (torch.rand(40, 3, 12, 12) * 255).to(torch.uint8)
    samplers = [bp.PhotometricSampler(config) for config in view_photometric_configs(224)[:2]]
    params = torch.stack([samplers[i % 2].sample() for i in range(40)])
    assert len({tuple(row.tolist()) for row in params[:, bp.ORDER]}) > 5  # several orders in one batch
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    expected = []
    for image, row in zip(images, params, strict=True):
        x = image.float() / 255
        if row[bp.JITTER]:
            for op_index in row[bp.ORDER].long().tolist():
                x = ops[op_index](x, float(row[bp.BRIGHTNESS + op_index]))
        if row[bp.GRAYSCALE]:
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        if row[bp.BLUR]:
            x = bp.gaussian_blur(x[None], row[bp.SIGMA : bp.SIGMA + 1], 6)[0]
        if row[bp.SOLARIZE]:
            x = torch.where(x >= 128 / 255, 1 - x, x)
        expected.append((x - MEAN) / STD)
    torch.testing.assert_close(
        bp.apply_photometric(images, params, 6), torch.stack(expected), atol=1e-4, rtol=0
    )


def test_input_checks():
    with pytest.raises(ValueError, match="uint8"):
        bp.apply_photometric(torch.zeros(2, 3, 4, 4), torch.zeros(2, bp.NUM_PARAMS), 1)
    with pytest.raises(ValueError, match="params"):
        bp.apply_photometric(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, 5), 1)
    with pytest.raises(ValueError, match="hue_jitter"):
        bp.PhotometricConfig(1.0, 0.0, hue=0.7)


# ----------------------------------------------------------------------------- against PIL, fixed parameters


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.4])
def test_fixed_jitter_matches_pil(image, factor):
    _assert_close_to_pil(
        F.adjust_brightness(image, factor), _device(image, _params(jitter=1, brightness=factor)), 0.6, 1.5
    )
    contrast = _params(jitter=1, contrast=factor, order=(1, 0, 2, 3))
    _assert_close_to_pil(F.adjust_contrast(image, factor), _device(image, contrast), 0.6, 1.5)
    saturation = 0.5 + factor / 2  # 0.8, 1.0, 1.2: DINO's saturation range
    params = _params(jitter=1, saturation=saturation, order=(2, 0, 1, 3))
    _assert_close_to_pil(F.adjust_saturation(image, saturation), _device(image, params), 0.6, 1.5)


@pytest.mark.parametrize("hue", [-0.1, -0.02, 0.05, 0.1])
def test_fixed_hue_matches_pil(image, hue):
    quantised = int(hue * 255) / 255  # PIL shifts the 8-bit hue by int(hue * 255)
    params = _params(jitter=1, hue=quantised, order=(3, 0, 1, 2))
    _assert_close_to_pil(F.adjust_hue(image, hue), _device(image, params), 0.5, 4.0)


def test_fixed_grayscale_blur_and_solarisation_match_pil(image):
    _assert_close_to_pil(F.rgb_to_grayscale(image, 3), _device(image, _params(grayscale=1)), 0.6, 1.5)
    for sigma in (0.1, 0.5, 1.0, 2.0):
        blurred = _device(image, _params(blur=1, sigma=sigma))
        _assert_close_to_pil(RandomGaussianBlur.blur(image, sigma), blurred, 0.75, 8.0)
    _assert_close_to_pil(
        RandomSolarization.solarize(image, 128), _device(image, _params(solarize=1)), 1e-4, 1e-4
    )
    _assert_close_to_pil(image, _device(image, _params()), 1e-4, 1e-4)  # neutral parameters: unchanged


# ----------------------------------------------------------------------------- distribution of the parameters


def test_parameter_frequencies_and_ranges_are_the_configured_ones():
    torch.manual_seed(3)
    view1, view2, local = view_photometric_configs(224)
    draws = 4000
    for config, blur_p, solar_p in ((view1, 1.0, 0.0), (view2, 0.1, 0.2), (local, 0.5, 0.0)):
        sampler = bp.PhotometricSampler(config)
        params = torch.stack([sampler.sample() for _ in range(draws)])
        tolerance = 4 * np.sqrt(0.25 / draws)  # four binomial standard deviations at worst
        for column, p in ((bp.JITTER, 0.8), (bp.GRAYSCALE, 0.2), (bp.BLUR, blur_p), (bp.SOLARIZE, solar_p)):
            assert abs(params[:, column].mean().item() - p) < tolerance, (column, p)
        jittered = params[params[:, bp.JITTER] > 0]
        for column, low, high in (
            (bp.BRIGHTNESS, 0.6, 1.4),
            (bp.CONTRAST, 0.6, 1.4),
            (bp.SATURATION, 0.8, 1.2),
            (bp.HUE, -0.1, 0.1),
        ):
            values = jittered[:, column]
            width = high - low
            assert values.min() >= low and values.max() <= high
            assert values.min() < low + 0.01 * width and values.max() > high - 0.01 * width  # spans the range
            assert abs(values.mean().item() - (low + high) / 2) < 0.02 * width
        # Every op equally often at every position; each row a permutation.
        order = jittered[:, bp.ORDER].long()
        assert (order.sort(dim=1).values == torch.arange(4)).all()
        frequencies = torch.stack([(order == op).float().mean(0) for op in range(4)])
        assert (frequencies - 0.25).abs().max() < 0.04
        untouched = params[params[:, bp.JITTER] == 0]
        assert (untouched[:, bp.BRIGHTNESS : bp.HUE + 1] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
        sigma = params[params[:, bp.BLUR] > 0, bp.SIGMA]
        if blur_p == 1.0:
            assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.03


def test_device_ops_fire_with_the_frequencies_of_their_parameters():
    """On a constant colour, the pixels tell which ops ran: untouched 0.8 * 0.8 * ... as in the PIL test."""
    torch.manual_seed(4)
    transform = TwoViewTransform(image_size=16, patch_size=8, augment_on="device")
    image = Image.new("RGB", (20, 24), (120, 60, 90))
    views, params = [], []
    for _ in range(500):
        crops, _, sample_params = transform(image)
        views += crops
        params += sample_params
    out = bp.apply_photometric(torch.stack(views), torch.stack(params), 1) * STD + MEAN
    pixels = out.flatten(2) * 255
    grey = ((pixels[:, 0] - pixels[:, 1]).abs() < 0.01).all(1) & (
        (pixels[:, 1] - pixels[:, 2]).abs() < 0.01
    ).all(1)
    untouched = ((pixels - torch.tensor([120.0, 60.0, 90.0])[:, None]).abs() < 0.51).all(2).all(1)
    assert abs(grey.float().mean().item() - 0.2) < 0.045
    assert abs(untouched.float().mean().item() - 0.16) < 0.04  # no jitter (0.2) and no grayscale (0.8)
    assert not torch.stack(params)[0::2, bp.SOLARIZE].any()  # view 1 is never solarised


# ----------------------------------------------------------------------------- the two paths, same seed


def test_same_seed_gives_the_same_crops_positions_and_nearly_the_same_pixels(image):
    """Workers and device draw the same numbers: identical coordinates, pixels within the PIL tolerance."""
    workers = TwoViewTransform(64, 16, augment_on="workers")
    device = TwoViewTransform(64, 16, augment_on="device")
    radius = blur_kernel_radius(64)
    for seed in range(30):
        torch.manual_seed(seed)
        pil_crops, pil_positions = workers(image)
        torch.manual_seed(seed)
        crops, positions, params = device(image)
        assert all(torch.equal(a, b) for a, b in zip(pil_positions, positions, strict=True))
        assert all(crop.dtype == torch.uint8 and crop.shape == (3, 64, 64) for crop in crops)
        out = bp.apply_photometric(torch.stack(crops), torch.stack(params), radius)
        for view in range(2):
            difference = ((out[view] - pil_crops[view]) * STD * 255).abs()
            assert difference.mean() < 2.5 and difference.max() < 16, (seed, view, float(difference.mean()))


def test_device_transform_keeps_renderings_and_local_crops():
    colours = [(255, 0, 0), (0, 0, 255)]
    renderings = [Image.new("RGB", (40, 56), colour) for colour in colours]
    transform = TwoViewTransform(32, 16, local_crops_number=2, local_crops_size=16, augment_on="device")
    crops, positions, params = transform(renderings)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert [tuple(p.shape) for p in params] == [(bp.NUM_PARAMS,)] * 4
    for v, crop in enumerate(crops):
        assert torch.equal(crop[:, 0, 0], torch.tensor(colours[v % 2], dtype=torch.uint8))
    with pytest.raises(ValueError, match="augment_on"):
        TwoViewTransform(32, 16, augment_on="gpu")
