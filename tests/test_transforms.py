"""Tests for data/transforms.py: crop-box sampler, eval transforms and paired image/mask transforms."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropBox,
    PairedRandomResizedCrop,
    PairedResize,
    eval_transform,
    linear_train_transform,
    normalize,
    paired_resize,
    sample_crop_box,
)

# Well-separated colours, one per class id (255 = ignore); used to check image/mask alignment.
PALETTE = {0: (0, 0, 0), 3: (255, 0, 0), 7: (0, 255, 0), 12: (0, 0, 255), 255: (255, 255, 255)}


def _unnormalise(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised -> (3, H, W) in [0, 255]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean) * 255


def _blocky_scene(height: int, width: int, block: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """A mask of random class blocks and an image whose colour encodes the class of each pixel."""
    rng = np.random.default_rng(seed)
    labels = np.array(sorted(PALETTE))
    coarse = rng.choice(labels, size=(height // block + 1, width // block + 1))
    mask = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width]
    colours = np.zeros((height, width, 3), dtype=np.uint8)
    for label, colour in PALETTE.items():
        colours[mask == label] = colour
    return Image.fromarray(colours), mask


def _decode_classes(image: torch.Tensor) -> torch.Tensor:
    """Nearest palette colour of every pixel of a normalised image: (3, H, W) -> (H, W) class ids."""
    labels = torch.tensor(sorted(PALETTE))
    colours = torch.tensor([PALETTE[int(label)] for label in labels], dtype=torch.float32)  # (C, 3)
    pixels = _unnormalise(image).permute(1, 2, 0)  # (H, W, 3)
    distances = ((pixels[:, :, None, :] - colours) ** 2).sum(-1)  # (H, W, C)
    return labels[distances.argmin(-1)]


def _uniform_neighbourhood(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W) bool: True where every mask value within ``radius`` (Chebyshev) equals the centre value."""
    height, width = mask.shape
    padded = torch.nn.functional.pad(mask[None, None].float(), (radius,) * 4, mode="replicate")[0, 0]
    uniform = torch.ones_like(mask, dtype=torch.bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            uniform &= padded[dy : dy + height, dx : dx + width] == mask.float()
    return uniform


# ----------------------------------------------------------------------------- crop-box sampler


@pytest.mark.parametrize(
    "height, width, scale",
    [
        (48, 64, (0.25, 1.0)),
        (300, 200, (0.05, 0.25)),
        (64, 64, (0.5, 2.0)),
        (30, 200, (0.08, 1.0)),
        (7, 5, (0.5, 2.0)),
    ],
)
def test_sample_crop_box_equals_torchvision_get_params(height, width, scale):
    image = torch.zeros(3, height, width)
    for seed in range(40):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        box = sample_crop_box(height, width, scale)
        assert (box.top, box.left, box.height, box.width) == expected
        # The generator state after the draw must also agree (same number of draws).
        torch.manual_seed(seed)
        T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
        after_torchvision = torch.rand(1)
        torch.manual_seed(seed)
        sample_crop_box(height, width, scale)
        assert torch.equal(torch.rand(1), after_torchvision)


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (100, 200, CropBox(0, 33, 100, 133)),  # too wide: full height, width 100 * 4/3
        (200, 100, CropBox(33, 0, 133, 100)),  # too tall: full width, height 100 / (3/4)
        (90, 100, CropBox(0, 0, 90, 100)),  # aspect inside the range: whole image
    ],
)
def test_sample_crop_box_falls_back_to_centre_crop(height, width, expected):
    # Area fractions in (1.5, 2) are always rejected, so all 10 attempts fail.
    assert sample_crop_box(height, width, (1.5, 2.0)) == expected


def test_sample_crop_box_dense_nn_scale_rejects_fractions_above_one():
    height, width = 60, 80
    fractions, aspects = [], []
    for _ in range(2000):
        box = sample_crop_box(height, width, (0.5, 2.0))
        assert 0 <= box.top and box.top + box.height <= height
        assert 0 <= box.left and box.left + box.width <= width
        fractions.append(box.height * box.width / (height * width))
        aspects.append(box.width / box.height)
    fractions = np.array(fractions)
    # Rounding of w and h moves the fraction by a few percent at most at this size.
    assert fractions.min() > 0.5 * 0.93 and fractions.max() <= 1.0
    # Accepted draws are roughly uniform on [0.5, 1]: about half of them are above 0.75.
    # Draws above 1 never survive, so some images exhaust the 10 attempts and get the whole image
    # (its aspect 4/3 is inside the ratio range); most draws are accepted.
    fallback = np.mean(fractions == 1.0)
    assert 0.01 < fallback < 0.5
    assert min(aspects) > 0.75 * 0.93 and max(aspects) < (4 / 3) * 1.07


def test_sample_crop_box_rejects_bad_ranges():
    with pytest.raises(ValueError, match="scale"):
        sample_crop_box(10, 10, (0.8, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        sample_crop_box(10, 10, (0.2, 0.8), ratio=(0.0, 1.0))


# ----------------------------------------------------------------------------- eval / linear transforms


def test_normalize_hand_values():
    white = Image.new("RGB", (2, 2), (255, 255, 255))
    black = Image.new("RGB", (2, 2), (0, 0, 0))
    for image, value in ((white, 1.0), (black, 0.0)):
        out = normalize()(image)
        expected = torch.tensor([(value - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
        assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
        assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 2, 2), atol=1e-6)


def test_eval_transform_is_resize_then_centre_crop():
    rng = np.random.default_rng(0)
    # Shorter side already 256: the bicubic resize is the identity and the output is an exact crop.
    image = Image.fromarray(rng.integers(0, 256, size=(256, 512, 3), dtype=np.uint8))
    out = eval_transform(resize=256, crop=224)(image)
    expected = normalize()(image.crop((144, 16, 368, 240)))  # (left, top, right, bottom)
    assert out.shape == (3, 224, 224)
    assert torch.allclose(out, expected, atol=1e-6)
    # Non-square input of another size: shorter side to 256 (aspect kept), then the 224 centre.
    tall = Image.fromarray(rng.integers(0, 256, size=(300, 200, 3), dtype=np.uint8))
    resized = tall.resize((256, 384), Image.BICUBIC)
    expected = normalize()(resized.crop((16, 80, 240, 304)))
    assert torch.allclose(eval_transform()(tall), expected, atol=1e-5)
    assert eval_transform(resize=40, crop=32)(tall).shape == (3, 32, 32)


def test_linear_train_transform_is_bilinear_crop_and_flip():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8))
    transform = linear_train_transform(size=32)
    flips = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(image)
        torch.manual_seed(seed)
        box = sample_crop_box(50, 70, (0.08, 1.0))
        flipped = torch.rand(1).item() < 0.5
        view = F.resized_crop(
            image, box.top, box.left, box.height, box.width, [32, 32], InterpolationMode.BILINEAR
        )
        expected = normalize()(F.hflip(view) if flipped else view)
        assert out.shape == (3, 32, 32)
        assert torch.allclose(out, expected, atol=1e-6)
        flips += flipped
    assert 0 < flips < 20


def test_eval_transforms_reject_bad_sizes():
    with pytest.raises(ValueError, match="crop"):
        eval_transform(resize=256, crop=0)
    with pytest.raises(ValueError, match="scale"):
        linear_train_transform(32, scale=(0.5, 1.5))


# ----------------------------------------------------------------------------- paired transforms


@pytest.mark.parametrize("image_size", [(48, 64), (97, 61)])
def test_paired_random_resized_crop_keeps_image_and_mask_aligned(image_size):
    image, mask = _blocky_scene(*image_size, block=8, seed=image_size[0])
    transform = PairedRandomResizedCrop(32, colour_jitter=False)
    agreement = []
    for _ in range(20):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
        assert out_mask.shape == (32, 32) and out_mask.dtype == torch.int64
        decoded = _decode_classes(out_image)
        # Away from class boundaries the image colour must name exactly the mask class.
        interior = _uniform_neighbourhood(out_mask, radius=1)
        assert interior.sum() > 100
        assert torch.equal(decoded[interior], out_mask[interior])
        agreement.append((decoded == out_mask).float().mean().item())
    # Even at boundaries the bilinear colour is dominated by the nearest pixel, i.e. the mask's class.
    assert np.mean(agreement) > 0.97


def test_paired_mask_values_stay_in_label_set():
    image, mask = _blocky_scene(45, 61, block=3, seed=3)
    labels = set(np.unique(mask).tolist())
    transform = PairedRandomResizedCrop(32)
    for mask_input in (mask, Image.fromarray(mask.astype(np.uint8), mode="L")):
        for _ in range(10):
            _, out_mask = transform(image, mask_input)
            assert set(out_mask.unique().tolist()) <= labels
    # Ids above 255 (numpy int mask) and palette images keep their values as well.
    big = np.where(mask == 7, 1000, mask)
    _, out_mask = transform(image, big)
    assert set(out_mask.unique().tolist()) <= set(np.unique(big).tolist())
    assert 1000 in set(paired_resize(image, big, 64)[1].unique().tolist())
    palette_mask = Image.fromarray(mask.astype(np.uint8), mode="P")
    palette_mask.putpalette([value for index in range(256) for value in (index, 255 - index, 0)])
    _, out_mask = transform(image, palette_mask)
    assert set(out_mask.unique().tolist()) <= labels


def test_paired_jitter_changes_the_image_only():
    image, mask = _blocky_scene(48, 64, block=8, seed=5)
    jittered = PairedRandomResizedCrop(32, colour_jitter=True)
    plain = PairedRandomResizedCrop(32, colour_jitter=False)
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        image_j, mask_j = jittered(image, mask)
        torch.manual_seed(seed)
        image_p, mask_p = plain(image, mask)
        # The box is drawn before the jitter, so the mask is identical with and without jitter.
        assert torch.equal(mask_j, mask_p)
        changed += not torch.allclose(image_j, image_p)
    assert changed >= 4  # P(no jitter at all) = 0.5**4 per draw


def test_paired_flip_mirrors_both():
    image, mask = _blocky_scene(48, 64, block=8, seed=6)
    torch.manual_seed(0)
    image_plain, mask_plain = PairedRandomResizedCrop(32, colour_jitter=False)(image, mask)
    torch.manual_seed(0)
    image_flip, mask_flip = PairedRandomResizedCrop(32, colour_jitter=False, flip_p=1.0)(image, mask)
    assert torch.equal(mask_flip, mask_plain.flip(-1))
    assert torch.allclose(image_flip, image_plain.flip(-1))


def test_paired_resize_hand_values():
    # 40x20 (W x H): left half class 1 / red, right half class 2 / blue -> 16x16, aspect not kept.
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[:, :20], mask[:, 20:] = 1, 2
    colours = np.zeros((20, 40, 3), dtype=np.uint8)
    colours[:, :20] = (255, 0, 0)
    colours[:, 20:] = (0, 0, 255)
    image = Image.fromarray(colours)
    out_image, out_mask = PairedResize(16)(image, mask)
    expected_mask = torch.tensor([1] * 8 + [2] * 8).expand(16, 16)
    assert out_image.shape == (3, 16, 16) and out_mask.dtype == torch.int64
    assert torch.equal(out_mask, expected_mask)
    pixels = _unnormalise(out_image)
    assert torch.allclose(
        pixels[:, :, :6], torch.tensor([255.0, 0, 0]).view(3, 1, 1).expand(3, 16, 6), atol=0.01
    )
    assert torch.allclose(
        pixels[:, :, 10:], torch.tensor([0, 0, 255.0]).view(3, 1, 1).expand(3, 16, 6), atol=0.01
    )
    # PIL and numpy masks give the same result.
    assert torch.equal(paired_resize(image, Image.fromarray(mask), 16)[1], out_mask)


def test_paired_resize_keeps_alignment_on_random_scene():
    image, mask = _blocky_scene(61, 83, block=7, seed=8)
    out_image, out_mask = paired_resize(image, mask, 48)
    assert set(out_mask.unique().tolist()) <= set(np.unique(mask).tolist())
    interior = _uniform_neighbourhood(out_mask, radius=1)
    assert torch.equal(_decode_classes(out_image)[interior], out_mask[interior])


def test_paired_transforms_reject_bad_inputs():
    image, mask = _blocky_scene(20, 30, block=5, seed=0)
    transform = PairedRandomResizedCrop(16)
    with pytest.raises(ValueError, match="sizes differ"):
        transform(image, mask[:10])
    with pytest.raises(ValueError, match="integer"):
        transform(image, mask.astype(np.float32))
    with pytest.raises(ValueError, match="mode"):
        transform(image, Image.new("RGB", (30, 20)))
    with pytest.raises(TypeError, match="PIL"):
        transform(np.zeros((20, 30, 3), dtype=np.uint8), mask)
    with pytest.raises(ValueError, match="size"):
        PairedResize(0)
