"""Tests for data/synthetic.py: determinism, scene statistics, exact masks, speed and the export CLI."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import ImageFolderDataset, VOCSegmentation, voc_palette
from data.scene_render import _texture_bits
from data.scene_spec import _sample_object_colours
from data.synthetic import (
    IGNORE_INDEX,
    NUM_OBJECT_CLASSES,
    NUM_SEG_CLASSES,
    OBJECT_CLASSES,
    SCENE_LEVELS,
    SHAPES,
    TEXTURE_FAMILIES,
    TEXTURES,
    Scene,
    SceneObject,
    SyntheticScenes,
    SyntheticSegmentation,
    label_from_mask,
    main,
    render_scene,
    scene_rng,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(array.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------
# Determinism and splits
# --------------------------------------------------------------------------------------------------------


def test_same_index_is_identical_across_calls_and_instances() -> None:
    first = SyntheticScenes(image_size=48, num_train=20)
    second = SyntheticScenes(image_size=48, num_train=20)
    for index in (0, 7, 19):
        image_a, mask_a = first.render_arrays(index)
        image_b, mask_b = first.render_arrays(index)
        image_c, mask_c = second.render_arrays(index)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(image_a, image_c)
        np.testing.assert_array_equal(mask_a, mask_c)
        assert first.scene(index) == second.scene(index)
    np.testing.assert_array_equal(first.render_arrays(-1)[0], first.render_arrays(19)[0])
    # The split sizes do not change the images (the stream depends only on seed, split, index).
    other_size = SyntheticScenes(image_size=48, num_train=5000)
    np.testing.assert_array_equal(other_size.render_arrays(7)[0], first.render_arrays(7)[0])


def test_different_seeds_and_indices_differ() -> None:
    base = SyntheticScenes(image_size=48, seed=0)
    other = SyntheticScenes(image_size=48, seed=1)
    digests = {_digest(base.render_arrays(i)[0]) for i in range(30)}
    assert len(digests) == 30
    assert not digests & {_digest(other.render_arrays(i)[0]) for i in range(30)}
    # Raw generator streams differ too.
    assert scene_rng(0, "train", 3).random() != scene_rng(1, "train", 3).random()
    assert scene_rng(0, "train", 3).random() != scene_rng(0, "train", 4).random()


def test_train_and_val_are_disjoint() -> None:
    train = SyntheticScenes("train", image_size=32, num_train=300)
    val = SyntheticScenes("val", image_size=32, num_val=100)
    train_digests = {_digest(train.render_arrays(i)[0]) for i in range(len(train))}
    val_digests = {_digest(val.render_arrays(i)[0]) for i in range(len(val))}
    assert len(train_digests) == 300 and len(val_digests) == 100
    assert not train_digests & val_digests
    assert scene_rng(0, "train", 5).random() != scene_rng(0, "val", 5).random()
    assert len(train) == 300 and len(val) == 100
    assert len(SyntheticScenes()) == 5000 and len(SyntheticScenes("val")) == 500


# --------------------------------------------------------------------------------------------------------
# Scene content
# --------------------------------------------------------------------------------------------------------


def test_classes_shape_times_texture() -> None:
    assert NUM_OBJECT_CLASSES == len(OBJECT_CLASSES) == 12 >= 10
    assert NUM_SEG_CLASSES == 13 and IGNORE_INDEX == 255
    assert list(OBJECT_CLASSES) == sorted(OBJECT_CLASSES)  # ImageFolder numbering == ours
    assert len(set(OBJECT_CLASSES)) == 12
    # Neither shape nor texture alone names a class: every shape comes in every texture and vice versa.
    for class_id, name in enumerate(OBJECT_CLASSES):
        shape, texture = SHAPES[class_id % len(SHAPES)], TEXTURES[class_id // len(SHAPES)]
        assert name == f"{texture}_{shape}"
    assert len(SHAPES) >= 2 and len(TEXTURES) >= 2
    dataset = SyntheticScenes(image_size=32, level="legacy")
    assert dataset.classes == list(OBJECT_CLASSES) and dataset.class_to_idx["striped_disc"] == 7


def test_object_counts_sizes_classes_and_visibility() -> None:
    size = 128
    dataset = SyntheticScenes(image_size=size, num_train=200, level="legacy")
    counts: Counter[int] = Counter()
    classes: Counter[int] = Counter()
    occluded = 0
    areas: list[int] = []
    for index in range(200):
        scene = dataset.scene(index)
        counts[len(scene.objects)] += 1
        _, mask, instances = render_scene(scene, with_image=False)
        present = set(np.unique(mask).tolist()) - {0}
        assert present <= {item.class_id + 1 for item in scene.objects}
        for k, item in enumerate(scene.objects):
            classes[item.class_id] += 1
            assert 0.125 * size <= item.radius <= 0.30 * size
            visible = int((instances == k + 1).sum())
            alone = Scene(**{**scene.__dict__, "objects": (item,)})
            full = int((render_scene(alone, with_image=False)[1] > 0).sum())
            assert visible >= 0.25 * full > 0  # occluded at most partly
            areas.append(full)
            occluded += visible < full
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) >= 25
    assert len(classes) == 12
    assert occluded >= 20  # occlusion really happens
    # Objects cover several 16 px patches (256 px each), even the smallest ones cut by the border.
    assert min(areas) >= 256 and np.median(areas) >= 4 * 256


def test_label_is_argmax_of_class_pixel_counts() -> None:
    dataset = SyntheticScenes(image_size=48, num_train=40, level="legacy")
    labels = []
    for index in range(40):
        image, label = dataset[index]
        _, mask = dataset.render(index)
        counts = [0] * NUM_OBJECT_CLASSES  # slow reference: count every pixel by hand
        for value in np.asarray(mask).ravel().tolist():
            if value:
                counts[value - 1] += 1
        best = max(range(NUM_OBJECT_CLASSES), key=lambda c: (counts[c], -c))
        assert label == best == dataset.label(index) == label_from_mask(np.asarray(mask))
        assert 0 <= label < NUM_OBJECT_CLASSES and isinstance(label, int)
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (48, 48)
        labels.append(label)
    assert dataset.targets == labels
    assert label_from_mask(np.array([[0, 3, 3], [5, 5, 0]], dtype=np.uint8)) == 2  # tie -> smaller id
    with pytest.raises(ValueError, match="no object pixel"):
        label_from_mask(np.zeros((4, 4), dtype=np.uint8))


@pytest.mark.parametrize("level", ["easy", "hard", "legacy"])
def test_labels_are_balanced_over_classes(level: str) -> None:
    labels = SyntheticScenes(image_size=32, num_train=600, level=level).targets
    count = SCENE_LEVELS[level].num_classes
    frequencies = np.bincount(labels, minlength=count)
    assert len(frequencies) == count
    assert frequencies.min() >= 0.5 * 600 / count and frequencies.max() <= 1.6 * 600 / count


@pytest.mark.parametrize("level", ["easy", "hard", "legacy"])
def test_class_not_predictable_from_mean_colour(level: str) -> None:
    dataset = SyntheticScenes(image_size=48, num_train=300, level=level)
    count = SCENE_LEVELS[level].num_classes
    features, targets = [], []
    for index in range(300):
        scene = dataset.scene(index)
        image, _, instances = render_scene(scene)
        assert image is not None
        for k, item in enumerate(scene.objects):
            features.append(image[instances == k + 1].mean(axis=0))
            targets.append(item.class_id)
    colours, labels = np.asarray(features), np.asarray(targets)
    class_means = np.stack([colours[labels == c].mean(axis=0) for c in range(count)])
    spread = np.linalg.norm(class_means[:, None] - class_means[None], axis=-1).max()
    within = colours.std(axis=0).mean()
    half = len(labels) // 2
    fitted = np.stack([colours[:half][labels[:half] == c].mean(axis=0) for c in range(count)])
    predicted = np.argmin(np.linalg.norm(colours[half:, None] - fitted[None], axis=-1), axis=1)
    accuracy = (predicted == labels[half:]).mean()
    assert within > 35
    if level == "legacy":
        assert spread < 0.6 * within  # every class mean is close to mid-grey
        assert accuracy < 0.16  # a nearest-class-mean classifier on mean colour stays near chance (1/12)
    else:
        # Every family paints half of each period cell with the pattern colour
        # (test_every_texture_family_paints_half_with_each_colour), so mean colour stays near chance:
        # 29 % on easy and 25 % on hard here against 25 % chance (easy was 34 % when dots covered 28 %).
        assert accuracy < 1.3 / count


@pytest.mark.parametrize("texture", TEXTURE_FAMILIES)
def test_every_texture_family_paints_half_with_each_colour(texture: str) -> None:
    """Share of the pattern colour over many whole periods: one half for every class family."""
    period = 13.7
    a, b = np.meshgrid(
        np.arange(0, 40 * period, 0.25, dtype=np.float32), np.arange(0, 40 * period, 0.25, dtype=np.float32)
    )
    bits = _texture_bits(texture, a - 20 * period, b - 20 * period, period, (0.3, 1.1), reach=20 * period + 1)
    assert abs(bits.mean() - 0.5) < 0.01


def test_backgrounds_have_lower_contrast_than_objects() -> None:
    dataset = SyntheticScenes(image_size=64, num_train=60, level="legacy")
    kinds = Counter()
    for index in range(60):
        scene = dataset.scene(index)
        kinds[scene.background] += 1
        image, mask, instances = render_scene(scene)
        assert image is not None
        background = image[mask == 0].astype(np.float64)
        first, second = (np.asarray(c, dtype=np.float64) for c in scene.background_colours)
        assert np.linalg.norm(first - second) <= 45 * math.sqrt(3)
        for k, item in enumerate(scene.objects):
            low, high = (np.asarray(c, dtype=np.float64) for c in item.colours)
            assert np.linalg.norm(low - high) >= 140
            pixels = image[instances == k + 1].astype(np.float64)
            if len(pixels) > 200 and len(background) > 200:
                assert background.std(axis=0).mean() < pixels.std(axis=0).mean()
    assert set(kinds) == {"gradient", "clouds", "dots"}


# --------------------------------------------------------------------------------------------------------
# Exact masks: the renderer against a slow per-pixel reference
# --------------------------------------------------------------------------------------------------------


def _polygon_margin(x: float, y: float, vertices: list[tuple[float, float]]) -> float:
    """Smallest signed edge cross product (> 0 inside a counter-clockwise convex polygon)."""
    margins = []
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1], strict=True):
        edge = math.hypot(x1 - x0, y1 - y0)
        margins.append(((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)) / edge)
    return min(margins)


def _reference_inside(shape: str, x: float, y: float, item: SceneObject) -> tuple[bool, bool]:
    """(inside, near the boundary) of pixel centre (x, y); polygons use rotated image-space vertices."""
    cx, cy = item.centre
    r, phi = item.radius, item.angle

    def to_image(a: float, b: float) -> tuple[float, float]:  # object frame -> image frame
        return cx + a * math.cos(phi) - b * math.sin(phi), cy + a * math.sin(phi) + b * math.cos(phi)

    def polygon(points: list[tuple[float, float]]) -> float:
        return _polygon_margin(x, y, [to_image(a * r, b * r) for a, b in points])

    distance = math.hypot(x - cx, y - cy) / r
    if shape == "disc":
        margin = 0.84 - distance
    elif shape == "ring":
        margin = min(1.0 - distance, distance - 0.55)
    elif shape == "square":
        margin = polygon([(-0.74, -0.74), (0.74, -0.74), (0.74, 0.74), (-0.74, 0.74)]) / r
    elif shape == "triangle":
        vertices = [
            (1.3 * math.cos(t), 1.3 * math.sin(t))
            for t in (math.radians(210), math.radians(330), math.radians(90))
        ]
        margin = polygon(vertices) / r
    elif shape == "cross":
        horizontal = polygon([(-1.0, -0.33), (1.0, -0.33), (1.0, 0.33), (-1.0, 0.33)])
        vertical = polygon([(-0.33, -1.0), (0.33, -1.0), (0.33, 1.0), (-0.33, 1.0)])
        margin = max(horizontal, vertical) / r
    else:  # star: polar radius with a triangle wave of period 2 pi / 5 in the object frame
        theta = math.atan2(y - cy, x - cx) - phi
        fraction = (theta / (2 * math.pi / 5)) % 1.0
        margin = 1.128 * (0.45 + 0.55 * abs(2 * fraction - 1)) - distance
    return margin > 0, abs(margin) < 1e-4


def _reference_colour_index(item: SceneObject, x: float, y: float) -> tuple[int, bool]:
    """Texture colour index at (x, y) and whether the pixel is within 1e-3 px of a texture edge."""
    dx, dy = x - item.centre[0], y - item.centre[1]
    a = dx * math.cos(item.angle) + dy * math.sin(item.angle)
    b = -dx * math.sin(item.angle) + dy * math.cos(item.angle)
    half = item.texture_period / 2
    u, v = (a + item.texture_phase[0]) / half, (b + item.texture_phase[1]) / half
    near = min(u - math.floor(u), math.ceil(u) - u) < 1e-3
    if item.texture == "striped":
        return math.floor(u) % 2, near
    near = near or min(v - math.floor(v), math.ceil(v) - v) < 1e-3
    return (math.floor(u) + math.floor(v)) % 2, near


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("texture", TEXTURES)
def test_render_matches_per_pixel_reference(shape: str, texture: str) -> None:
    size = 40
    class_id = TEXTURES.index(texture) * len(SHAPES) + SHAPES.index(shape)
    item = SceneObject(
        class_id=class_id,
        centre=(19.3, 21.7),
        radius=13.1,
        angle=0.7 + class_id * 0.37,
        colours=((250, 20, 30), (10, 200, 240)),
        texture_period=4.7,
        texture_phase=(1.1, 2.3),
    )
    scene = Scene(
        image_size=size,
        background="gradient",
        background_colours=((90, 90, 90), (100, 110, 95)),
        background_angle=0.3,
        background_period=2.0,
        background_phase=(0.0, 0.0),
        objects=(item,),
        noise_seed=5,
    )
    image, mask, instances = render_scene(scene)
    assert image is not None and image.dtype == np.uint8 and mask.dtype == np.uint8
    uncertain = 0
    for i in range(size):
        for j in range(size):
            x, y = j + 0.5, i + 0.5
            inside, near = _reference_inside(shape, x, y, item)
            if near:
                uncertain += 1
                continue
            assert mask[i, j] == (class_id + 1 if inside else 0), (i, j)
            assert instances[i, j] == (1 if inside else 0)
            if inside:
                index, near_edge = _reference_colour_index(item, x, y)
                if not near_edge:
                    expected = np.asarray(item.colours[index])
                    assert np.abs(image[i, j].astype(int) - expected).max() <= 7, (i, j)
    assert uncertain <= 3
    assert set(np.unique(mask).tolist()) == {0, class_id + 1}


def test_later_objects_occlude_earlier_ones() -> None:
    below = SceneObject(
        class_id=1,
        centre=(16.0, 16.0),
        radius=10.0,
        angle=0.0,
        colours=((255, 0, 0), (255, 0, 0)),
        texture_period=4.0,
        texture_phase=(0.0, 0.0),
    )
    above = SceneObject(
        class_id=9,
        centre=(22.0, 16.0),
        radius=8.0,
        angle=0.0,
        colours=((0, 0, 255), (0, 0, 255)),
        texture_period=4.0,
        texture_phase=(0.0, 0.0),
    )
    scene = Scene(32, "dots", ((0, 0, 0), (10, 10, 10)), 0.0, 3.0, (0.0, 0.0), (below, above), 1)
    image, mask, instances = render_scene(scene)
    assert image is not None
    only_above = render_scene(Scene(**{**scene.__dict__, "objects": (above,)}))[1] > 0
    np.testing.assert_array_equal(mask[only_above], 10)  # every pixel of the top object wins
    np.testing.assert_array_equal(instances[only_above], 2)
    assert (image[only_above][:, 2] >= 248).all() and (image[only_above][:, 0] <= 7).all()
    assert (mask == 2).any()  # the disc below is still partly visible


def test_image_colours_follow_the_mask_everywhere() -> None:
    """Every object pixel has one of its object's two colours (up to the noise, |n| <= 7): no blending."""
    dataset = SyntheticScenes(image_size=64, num_train=20)
    for index in range(20):
        scene = dataset.scene(index)
        image, _, instances = render_scene(scene)
        assert image is not None
        for k, item in enumerate(scene.objects):
            pixels = image[instances == k + 1].astype(int)
            palette = np.asarray(item.colours)
            distance = np.abs(pixels[:, None, :] - palette[None]).max(axis=2).min(axis=1)
            assert distance.max() <= 7


# --------------------------------------------------------------------------------------------------------
# Dataset API, sizes, errors, speed
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 48, 128])
def test_image_sizes_and_types(size: int) -> None:
    image, mask = SyntheticScenes(image_size=size, num_train=2).render(1)
    assert image.mode == "RGB" and image.size == (size, size)
    assert mask.mode == "L" and mask.size == (size, size)
    assert int(np.asarray(mask).max()) <= len(TEXTURE_FAMILIES)


def test_transform_and_segmentation_view() -> None:
    classification = SyntheticScenes("val", image_size=32, num_val=3, transform=lambda im: np.asarray(im))
    array, label = classification[2]
    assert array.shape == (32, 32, 3) and label == classification.label(2)

    calls = []

    def transforms(image: Image.Image, mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        calls.append((image.mode, mask.mode))
        return np.asarray(image), np.asarray(mask)

    segmentation = SyntheticSegmentation("val", image_size=32, num_val=3, transforms=transforms)
    image, mask = segmentation[2]
    expected_image, expected_mask = classification.render_arrays(2)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(mask, expected_mask)
    assert calls == [("RGB", "L")]
    plain = SyntheticSegmentation("val", image_size=32, num_val=3, level="legacy")
    assert plain.num_classes == 13 and plain.ignore_index == 255 and plain.class_names[0] == "background"
    assert plain.class_names[1:] == list(OBJECT_CLASSES) and len(plain) == 3
    assert isinstance(plain[0][0], Image.Image) and isinstance(plain[0][1], Image.Image)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="split='test'"):
        SyntheticScenes("test")
    with pytest.raises(ValueError, match="image_size=8"):
        SyntheticScenes(image_size=8)
    with pytest.raises(ValueError, match="num_train=0"):
        SyntheticSegmentation(num_train=0)
    with pytest.raises(ValueError, match="seed=-1"):
        SyntheticScenes(seed=-1)
    with pytest.raises(IndexError, match="out of range"):
        SyntheticScenes(num_train=3)[3]


def test_render_speed_128px() -> None:
    dataset = SyntheticScenes(image_size=128, num_train=60)
    dataset.render(0)
    best = math.inf
    for repeat in range(3):
        started = time.process_time()
        for index in range(20):
            dataset.render(20 * repeat + index)
        best = min(best, (time.process_time() - started) / 20)
    assert best < 3e-3, f"{best * 1e3:.2f} ms per 128 px image (CPU time)"


# --------------------------------------------------------------------------------------------------------
# Export CLI, read back with the real readers
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["easy", "legacy"])
def test_export_cli_round_trip(tmp_path: Path, level: str) -> None:
    out = tmp_path / "export"
    flags = ["--image_size", "48", "--num_train", "8", "--num_val", "4", "--level", level]
    assert main(["--out", str(out), *flags]) == out
    voc = out / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    assert (lists / "train.txt").read_text().split() == [f"train_{i:06d}" for i in range(8)]
    assert (lists / "trainaug.txt").read_text().split() == [f"train_{i:06d}" for i in range(8)]
    assert (lists / "val.txt").read_text().split() == [f"val_{i:06d}" for i in range(4)]

    for split, count in (("train", 8), ("trainaug", 8), ("val", 4)):
        source = SyntheticSegmentation(
            "val" if split == "val" else "train", image_size=48, num_train=8, num_val=4, level=level
        )
        dataset = VOCSegmentation(out, split)
        assert len(dataset) == count
        for index in range(count):
            image, mask = dataset[index]
            expected_image, expected_mask = source.render(index)
            np.testing.assert_array_equal(np.asarray(mask), np.asarray(expected_mask))  # masks exact
            difference = np.abs(np.asarray(image).astype(int) - np.asarray(expected_image).astype(int))
            assert difference.mean() < 4  # JPEG quality 95
    with Image.open(voc / "SegmentationClass" / "train_000000.png") as stored:
        assert stored.mode == "P"
        np.testing.assert_array_equal(np.asarray(stored.getpalette()[:768]).reshape(256, 3), voc_palette())
    with Image.open(voc / "SegmentationClassAug" / "val_000003.png") as stored:
        assert stored.mode == "P"

    for split, count in (("train", 8), ("val", 4)):
        source = SyntheticScenes(split, image_size=48, num_train=8, num_val=4, level=level)
        folder = ImageFolderDataset(out / "imagefolder", split)
        assert folder.classes == list(SCENE_LEVELS[level].classes)  # empty class folders exist, labels align
        assert len(folder) == count
        for position, (path, label) in enumerate(folder.samples):
            index = int(path.stem.split("_")[1])
            assert label == source.label(index) and path.suffix == ".png"
            np.testing.assert_array_equal(np.asarray(folder[position][0]), source.render_arrays(index)[0])


def test_export_cli_subprocess_with_workers_matches_in_process(tmp_path: Path) -> None:
    arguments = ["--image_size", "32", "--num_train", "6", "--num_val", "3", "--seed", "4"]
    main(["--out", str(tmp_path / "inline"), *arguments])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.synthetic",
            "--out",
            str(tmp_path / "workers"),
            *arguments,
            "--num_workers",
            "2",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "exported 9/9 images" in result.stderr
    inline = sorted(
        p.relative_to(tmp_path / "inline") for p in (tmp_path / "inline").rglob("*") if p.is_file()
    )
    workers = sorted(
        p.relative_to(tmp_path / "workers") for p in (tmp_path / "workers").rglob("*") if p.is_file()
    )
    assert inline == workers and len(inline) == 9 * 4 + 3
    for relative in inline:
        assert (tmp_path / "inline" / relative).read_bytes() == (tmp_path / "workers" / relative).read_bytes()


def test_fixed_object_colours_keep_the_layout_and_paint_every_object_with_one_pair() -> None:
    from data.synthetic import FIXED_OBJECT_COLOURS

    random_split = SyntheticSegmentation("val", image_size=64, num_val=6)
    fixed_split = SyntheticSegmentation("val", image_size=64, num_val=6, object_colours="fixed")
    pair = np.asarray(FIXED_OBJECT_COLOURS, dtype=np.int64)  # (2, 3)
    for index in range(6):
        image_random, mask_random = random_split.render_arrays(index)
        image_fixed, mask_fixed = fixed_split.render_arrays(index)
        np.testing.assert_array_equal(mask_random, mask_fixed)  # same scene, only the colours change
        objects = image_fixed[mask_fixed > 0].astype(np.int64)  # (n, 3)
        # Every object pixel is one of the two colours up to the pixel noise (|n| <= 7 per channel).
        distance = np.abs(objects[:, None, :] - pair[None]).max(axis=-1).min(axis=1)
        assert distance.max() <= 7
        background = mask_fixed == 0
        np.testing.assert_array_equal(image_random[background], image_fixed[background])
    with pytest.raises(ValueError, match="object_colours"):
        SyntheticScenes("train", object_colours="pastel")


def test_recolour_scene_keeps_everything_but_the_colours() -> None:
    from data.synthetic import FIXED_OBJECT_COLOURS, MIN_OBJECT_CONTRAST, recolour_scene

    split = SyntheticSegmentation("val", image_size=64, num_val=8)
    rng = np.random.default_rng(0)
    for index in range(8):
        scene = split.scene(index)
        other = recolour_scene(scene, rng)
        image, mask, instances = render_scene(scene)
        other_image, other_mask, other_instances = render_scene(other)
        np.testing.assert_array_equal(mask, other_mask)
        np.testing.assert_array_equal(instances, other_instances)
        assert other.background_colours == scene.background_colours
        for before, after in zip(scene.objects, other.objects, strict=True):
            assert after.colours != before.colours
            assert np.linalg.norm(np.subtract(after.colours[0], after.colours[1])) >= MIN_OBJECT_CONTRAST
            # Nothing but the colours changes.
            assert (after.class_id, after.centre, after.radius, after.angle) == (
                before.class_id,
                before.centre,
                before.radius,
                before.angle,
            )
            assert (after.texture_period, after.texture_phase) == (
                before.texture_period,
                before.texture_phase,
            )
        assert replace(other, objects=scene.objects) == scene
        background = mask == 0
        np.testing.assert_array_equal(image[background], other_image[background])
        assert not np.array_equal(image, other_image)
    fixed = SyntheticSegmentation("val", image_size=64, num_val=2, object_colours="fixed").scene(0)
    assert recolour_scene(fixed, rng, "fixed") == fixed
    assert all(item.colours == FIXED_OBJECT_COLOURS for item in fixed.objects)


def test_recolour_scene_with_background_redraws_only_the_background_colours() -> None:
    """background=True: new background colours (as sample_scene draws them), everything else as before."""
    from data.synthetic import recolour_scene

    split = SyntheticSegmentation("val", image_size=64, num_val=8)
    for index in range(8):
        scene = split.scene(index)
        other = recolour_scene(scene, np.random.default_rng(index), background=True)
        # The background is drawn first from the stream: base colour 30..225, second within the offset.
        rng = np.random.default_rng(index)
        base = rng.integers(30, 226, size=3)
        second = np.clip(base + rng.integers(-45, 46, size=3), 0, 255)
        assert other.background_colours == (tuple(int(v) for v in base), tuple(int(v) for v in second))
        assert other.background_colours != scene.background_colours
        same_stream = recolour_scene(scene, np.random.default_rng(index), background=True)
        assert same_stream == other  # deterministic in the generator
        # Only the two colour fields differ.
        assert replace(other, objects=scene.objects, background_colours=scene.background_colours) == scene
        image, mask, instances = render_scene(scene)
        other_image, other_mask, other_instances = render_scene(other)
        np.testing.assert_array_equal(mask, other_mask)
        np.testing.assert_array_equal(instances, other_instances)
        background = mask == 0
        if background.any():
            assert not np.array_equal(image[background], other_image[background])
    fixed = SyntheticSegmentation("val", image_size=64, num_val=1, object_colours="fixed").scene(0)
    recoloured = recolour_scene(fixed, np.random.default_rng(0), "fixed", background=True)
    assert recoloured.objects == fixed.objects and recoloured.background_colours != fixed.background_colours


def test_recolour_background_flag_reaches_the_second_rendering() -> None:
    import torch

    plain = SyntheticScenes("train", image_size=48, num_train=2, colourings=2)
    redrawn = SyntheticScenes("train", image_size=48, num_train=2, colourings=2, recolour_background=True)
    mask = render_scene(plain.scene(0))[1]
    torch.manual_seed(0)
    (first, second), _ = plain[0]
    torch.manual_seed(0)
    (first_b, second_b), _ = redrawn[0]
    assert np.array_equal(np.asarray(first), np.asarray(first_b))  # the stored rendering is unchanged
    background = mask == 0
    np.testing.assert_array_equal(np.asarray(first)[background], np.asarray(second)[background])
    assert not np.array_equal(np.asarray(first_b)[background], np.asarray(second_b)[background])


def test_recolour_scene_with_retexture_keeps_family_outline_and_place() -> None:
    """retexture=True: new period (in the level's range), phases in [0, period), texture orientation in
    [0, 2 pi) and colours; the class, outline, pose, background and masks stay, and the draws per object are
    period, colours, phases, orientation."""
    from data.synthetic import MIN_OBJECT_CONTRAST, recolour_scene

    split = SyntheticSegmentation("val", image_size=64, num_val=8)
    low, high = SCENE_LEVELS["easy"].texture_period_range
    for index in range(8):
        scene = split.scene(index)
        other = recolour_scene(scene, np.random.default_rng(index), retexture=True)
        assert other.background_colours == scene.background_colours
        np.testing.assert_array_equal(render_scene(scene)[1], render_scene(other)[1])
        np.testing.assert_array_equal(render_scene(scene)[2], render_scene(other)[2])
        rng = np.random.default_rng(index)
        for before, after in zip(scene.objects, other.objects, strict=True):
            assert before.texture_angle == 0.0
            period = rng.uniform(low, high) * 64
            colours = _sample_object_colours(rng, MIN_OBJECT_CONTRAST, SCENE_LEVELS["easy"].min_luma_step)
            phase = (rng.uniform(0, period), rng.uniform(0, period))
            angle = rng.uniform(0.0, 2.0 * math.pi)
            assert (after.texture_period, after.colours, after.texture_phase, after.texture_angle) == (
                period,
                colours,
                phase,
                angle,
            )
            assert low * 64 <= after.texture_period <= high * 64 and 0 <= angle < 2 * math.pi
            assert all(0 <= value < after.texture_period for value in after.texture_phase)
            assert np.linalg.norm(np.subtract(*after.colours)) >= MIN_OBJECT_CONTRAST
            kept = ("class_id", "centre", "radius", "angle", "shape", "texture")
            assert [getattr(after, name) for name in kept] == [getattr(before, name) for name in kept]
    fixed = SyntheticSegmentation("val", image_size=64, num_val=1, object_colours="fixed").scene(0)
    retextured = recolour_scene(fixed, np.random.default_rng(0), "fixed", retexture=True)
    assert all(a.colours == b.colours for a, b in zip(retextured.objects, fixed.objects, strict=True))
    assert all(item.texture_angle != 0.0 for item in retextured.objects)


def test_retexture_flag_reaches_the_second_rendering() -> None:
    """The stored rendering is unchanged; the second one shows other patterns on the same masks."""
    import torch

    plain = SyntheticScenes("train", image_size=48, num_train=2, colourings=2, object_colours="fixed")
    redrawn = SyntheticScenes(
        "train", image_size=48, num_train=2, colourings=2, object_colours="fixed", retexture=True
    )
    objects = render_scene(plain.scene(0))[1] > 0
    torch.manual_seed(0)
    (first, second), _ = plain[0]
    torch.manual_seed(0)
    (first_b, second_b), _ = redrawn[0]
    assert np.array_equal(np.asarray(first), np.asarray(first_b))
    assert np.array_equal(np.asarray(first)[objects], np.asarray(second)[objects])  # fixed colours: no change
    assert not np.array_equal(np.asarray(first_b)[objects], np.asarray(second_b)[objects])
    assert np.array_equal(np.asarray(first_b)[~objects], np.asarray(second_b)[~objects])


def test_recoloured_pixels_follow_the_new_colour_table() -> None:
    """Where no channel clips, recolouring moves each object pixel by (new - old) colour of its bit."""
    from data.synthetic import recolour_scene

    scene = SyntheticSegmentation("val", image_size=64, num_val=1).scene(0)
    other = recolour_scene(scene, np.random.default_rng(5))
    image, _, instances = render_scene(scene)
    other_image, _, _ = render_scene(other)
    for k, (before, after) in enumerate(zip(scene.objects, other.objects, strict=True), start=1):
        pixels = instances == k
        if not pixels.any():
            continue
        old = image[pixels].astype(np.int64)
        new = other_image[pixels].astype(np.int64)
        # Each pixel is one of the object's two colours plus noise |n| <= 7; its texture bit is the nearest.
        bit = np.abs(old[:, None, :] - np.asarray(before.colours)[None]).max(-1).argmin(1)
        expected = new - np.asarray(after.colours)[bit] + np.asarray(before.colours)[bit]
        inside = ((old > 0) & (old < 255) & (new > 0) & (new < 255)).all(axis=1)
        np.testing.assert_array_equal(expected[inside], old[inside])


def test_colourings_give_same_scene_renderings_seeded_by_torch() -> None:
    import torch

    dataset = SyntheticScenes("train", image_size=48, num_train=4, colourings=3)
    single = SyntheticScenes("train", image_size=48, num_train=4)
    torch.manual_seed(0)
    renderings, label = dataset[1]
    assert isinstance(renderings, list) and len(renderings) == 3 and label == single[1][1]
    np.testing.assert_array_equal(np.asarray(renderings[0]), np.asarray(single[1][0]))  # the stored scene
    arrays = [np.asarray(image) for image in renderings]
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])
    torch.manual_seed(0)
    again, _ = dataset[1]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(arrays, again, strict=True))
    torch.manual_seed(1)
    other, _ = dataset[1]
    assert not np.array_equal(arrays[1], np.asarray(other[1]))
    seen = []
    picked = SyntheticScenes("train", image_size=48, num_train=4, colourings=2, transform=seen.append)
    picked[0]
    assert len(seen) == 1 and len(seen[0]) == 2  # the transform receives the list of renderings
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="colourings"):
            SyntheticScenes("train", colourings=bad)


# --------------------------------------------------------------------------------------------------------
# Levels: the texture-class scenes and the legacy scenes
# --------------------------------------------------------------------------------------------------------


def test_legacy_level_reproduces_the_earlier_scenes() -> None:
    """Digests of images rendered by the generator before levels existed (same seed streams, same pixels)."""
    train = SyntheticScenes("train", num_train=10, level="legacy")
    assert [_digest(train.render_arrays(i)[0])[:16] for i in (0, 1, 7)] == [
        "6e51fdee64f57b31",
        "afb3f806972702f4",
        "c7c4c2b2f3f9807b",
    ]
    fixed = SyntheticScenes("val", num_val=10, level="legacy", object_colours="fixed")
    assert [_digest(fixed.render_arrays(i)[0])[:16] for i in (0, 3)] == [
        "9914c0c6030d947f",
        "b07601d343fe8771",
    ]


@pytest.mark.parametrize("level", ["easy", "hard"])
def test_texture_levels_class_is_the_texture_and_shape_a_nuisance(level: str) -> None:
    setting = SCENE_LEVELS[level]
    assert setting.classes == TEXTURE_FAMILIES == tuple(sorted(TEXTURE_FAMILIES))  # ImageFolder order
    dataset = SyntheticSegmentation("train", image_size=128, num_train=300, level=level)
    assert dataset.num_classes == len(TEXTURE_FAMILIES) + 1 and dataset.class_names[1:] == list(
        TEXTURE_FAMILIES
    )
    pairs: Counter[tuple[str, str]] = Counter()
    counts: Counter[int] = Counter()
    areas = []
    for index in range(300):
        scene = dataset.scene(index)
        assert scene.level == level and scene.background in setting.backgrounds
        counts[len(scene.objects)] += 1
        _, mask, instances = render_scene(scene, with_image=False)
        for k, item in enumerate(scene.objects):
            assert item.texture == TEXTURE_FAMILIES[item.class_id] and item.shape in SHAPES
            low, high = setting.radius_range
            assert low * 128 <= item.radius <= high * 128
            assert np.linalg.norm(np.subtract(*item.colours)) >= setting.min_object_contrast
            assert (mask[instances == k + 1] == item.class_id + 1).all()
            pairs[(item.texture, item.shape)] += 1
            areas.append(int((render_scene(replace(scene, objects=(item,)), with_image=False)[1] > 0).sum()))
    assert set(counts) == set(range(1, setting.max_objects + 1))
    # Every texture comes in every outline: the shape says nothing about the class.
    assert len(pairs) == len(TEXTURE_FAMILIES) * len(SHAPES)
    if level == "easy":  # large objects: the median covers 8 patches of 16 px at 128 px
        assert np.median(areas) >= 8 * 256 and min(areas) >= 2 * 256


def _reference_texture_bit(texture: str, a: float, b: float, period: float, phase: tuple[float, float]):
    """(bit, near an edge) of one object-frame point, written from the pattern definitions one by one."""
    half = period / 2
    u, v = a + phase[0], b + phase[1]

    def near_integer(x: float) -> bool:
        return min(x - math.floor(x), math.ceil(x) - x) < 1e-3

    if texture == "wavy":
        w = (u + 0.25 * period * math.sin(math.pi * v / period)) / half
        return math.floor(w) % 2, near_integer(w)
    if texture == "dotted":
        du, dv = (u % period) - half, (v % period) - half
        distance = math.hypot(du, dv)
        radius = period / math.sqrt(2 * math.pi)  # pi r^2 = half the cell
        return int(distance <= radius), abs(distance - radius) < 1e-3
    if texture == "grid":
        fu, fv = u % period, v % period
        width = period * (1 - 1 / math.sqrt(2))  # the two lines cover 1 - (1 - w)^2 = half the cell
        near = min(abs(fu - width), abs(fv - width), fu, fv, period - fu, period - fv) < 1e-3
        return int(fu < width or fv < width), near
    if texture == "speckled":  # the same lattice hash, computed with Python integers modulo 2^32
        ca, cb = math.floor(u / half), math.floor(v / half)
        h = (ca * 0x9E3779B1 ^ cb * 0x85EBCA77) % 2**32
        h ^= h >> 15
        h = (h * 0x2C1B3C6D) % 2**32
        h ^= h >> 12
        return (h >> 7) & 1, near_integer(u / half) or near_integer(v / half)
    raise AssertionError(texture)


@pytest.mark.parametrize("texture_angle", [0.0, 1.1])
@pytest.mark.parametrize("texture", ["wavy", "dotted", "grid", "speckled"])
def test_new_textures_match_per_pixel_reference(texture: str, texture_angle: float) -> None:
    """Every pixel has the colour its texture bit names, the texture frame turned by ``texture_angle``
    against the outline's frame."""
    size = 48
    item = SceneObject(
        class_id=0,  # the renderer reads the texture name; wavy and speckled are no class of any level
        centre=(23.6, 24.2),
        radius=18.0,
        angle=0.9,
        colours=((250, 20, 30), (10, 200, 240)),
        texture_period=7.3,
        texture_phase=(1.7, 0.4),
        shape_name="square",
        texture_name=texture,
        texture_angle=texture_angle,
    )
    scene = Scene(size, "gradient", ((90, 90, 90), (100, 110, 95)), 0.3, 2.0, (0.0, 0.0), (item,), 5, "easy")
    image, mask, _ = render_scene(scene)
    unturned = render_scene(replace(scene, objects=(replace(item, texture_angle=0.0),)))
    np.testing.assert_array_equal(mask, unturned[1])  # the outline does not turn with the texture
    assert (texture_angle == 0.0) == np.array_equal(image, unturned[0])
    assert image is not None
    checked, seen = 0, set()
    for i in range(size):
        for j in range(size):
            if mask[i, j] == 0:
                continue
            dx, dy = j + 0.5 - item.centre[0], i + 0.5 - item.centre[1]
            a = dx * math.cos(item.angle) + dy * math.sin(item.angle)
            b = -dx * math.sin(item.angle) + dy * math.cos(item.angle)
            a, b = (
                a * math.cos(texture_angle) + b * math.sin(texture_angle),
                -a * math.sin(texture_angle) + b * math.cos(texture_angle),
            )
            bit, near = _reference_texture_bit(texture, a, b, item.texture_period, item.texture_phase)
            if near:
                continue
            assert np.abs(image[i, j].astype(int) - np.asarray(item.colours[bit])).max() <= 7, (i, j)
            checked += 1
            seen.add(bit)
    assert checked > 500 and seen == {0, 1}


def test_unknown_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"level='medium'.*easy.*hard.*legacy"):
        SyntheticScenes(level="medium")
