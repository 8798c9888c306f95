"""Tests for data/datasets.py: every reader on tiny fabricated copies of the real layouts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import (
    ADE20K_CLASS_NAMES,
    VOC_CLASS_NAMES,
    ADE20KSegmentation,
    DatasetLayoutError,
    ImageFolderDataset,
    ImageReadError,
    UnlabelledImageFolder,
    VOCSegmentation,
    build_classification_dataset,
    build_pretrain_dataset,
    build_segmentation_dataset,
    load_image,
    load_mask,
    to_rgb,
    voc_palette,
)
from tests.fixtures_datasets import (
    make_ade20k,
    make_coco_folder,
    make_imagefolder,
    make_voc,
    random_image,
    write_bad_file,
    write_image,
)

# --------------------------------------------------------------------------------------------------------
# Image loading and colour modes
# --------------------------------------------------------------------------------------------------------


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def test_load_image_rgb_png_exact(tmp_path: Path) -> None:
    pixels = random_image(32, 40, seed=1)
    image = load_image(write_image(tmp_path / "a.png", pixels))
    assert image.size == (40, 32)
    np.testing.assert_array_equal(_pixels(image), pixels)


def test_load_image_greyscale_and_palette(tmp_path: Path) -> None:
    grey = np.arange(32 * 32, dtype=np.int64).reshape(32, 32) % 256
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(
        _pixels(load_image(tmp_path / "grey.png")), np.repeat(grey[..., None], 3, 2)
    )

    indices = (np.arange(32 * 32).reshape(32, 32) % 7).astype(np.uint8)
    palette_image = Image.frombytes("P", (32, 32), indices.tobytes())
    colours = np.array(
        [[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200], [5, 5, 5], [90, 80, 70], [255, 255, 255]],
        dtype=np.uint8,
    )
    palette_image.putpalette(colours.ravel().tolist())
    palette_image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(_pixels(load_image(tmp_path / "palette.png")), colours[indices])


def test_load_image_drops_alpha(tmp_path: Path) -> None:
    rgb = random_image(32, 32, seed=2)
    alpha = np.full((32, 32, 1), 77, dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(_pixels(load_image(tmp_path / "rgba.png")), rgb)

    grey = rgb[..., 0]
    Image.fromarray(np.stack([grey, alpha[..., 0]], axis=2), mode=None).save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as raw:
        assert raw.mode == "LA"
    np.testing.assert_array_equal(_pixels(load_image(tmp_path / "la.png")), np.repeat(grey[..., None], 3, 2))


def test_load_image_cmyk_matches_formula(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cmyk = rng.integers(0, 256, size=(32, 32, 4)).astype(np.uint8)
    Image.frombytes("CMYK", (32, 32), cmyk.tobytes()).save(tmp_path / "cmyk.tif")
    with Image.open(tmp_path / "cmyk.tif") as raw:
        assert raw.mode == "CMYK"
    # Slow reference, pixel by pixel: R = (255 - C)(255 - K) / 255, likewise G from M and B from Y.
    expected = np.zeros((32, 32, 3))
    for i in range(32):
        for j in range(32):
            c, m, y, k = (float(v) for v in cmyk[i, j])
            expected[i, j] = [
                (255 - c) * (255 - k) / 255,
                (255 - m) * (255 - k) / 255,
                (255 - y) * (255 - k) / 255,
            ]
    assert np.abs(_pixels(load_image(tmp_path / "cmyk.tif")) - expected).max() <= 1.0
    # A CMYK JPEG (lossy) decodes to the same colours approximately.
    flat = np.zeros((32, 32, 4), dtype=np.uint8)
    flat[..., 0], flat[..., 3] = 255, 0  # pure cyan
    Image.frombytes("CMYK", (32, 32), flat.tobytes()).save(tmp_path / "cmyk.jpg", quality=95)
    loaded = _pixels(load_image(tmp_path / "cmyk.jpg"))
    assert np.abs(loaded - np.array([0, 255, 255])).max() <= 8


def test_load_image_16bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535], [1000, 40000, 128, 65280]], dtype=np.uint16)
    values = np.tile(values, (8, 8))
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    loaded = _pixels(load_image(tmp_path / "deep.png"))
    expected = np.rint(values.astype(np.float64) * 255.0 / 65535.0)
    np.testing.assert_array_equal(loaded, np.repeat(expected[..., None], 3, 2))
    assert loaded[0, 1, 0] == 1 and loaded[0, 3, 0] == 255 and loaded[0, 2, 0] == 128  # hand values


def test_to_rgb_32bit_and_float_modes() -> None:
    deep = Image.fromarray(np.array([[0, 65535], [257, 514]], dtype=np.int32))
    assert deep.mode == "I"
    np.testing.assert_array_equal(_pixels(to_rgb(deep))[..., 0], [[0, 255], [1, 2]])
    shallow = Image.fromarray(np.array([[0, 200], [17, 255]], dtype=np.int32))
    np.testing.assert_array_equal(_pixels(to_rgb(shallow))[..., 0], [[0, 200], [17, 255]])
    floating = Image.fromarray(np.array([[0.4, 99.6], [254.6, -5.0]], dtype=np.float32))
    assert floating.mode == "F"
    np.testing.assert_array_equal(_pixels(to_rgb(floating))[..., 0], [[0, 100], [255, 0]])
    deep_floating = Image.fromarray(np.array([[0.4, 99.6], [300.0, 70000.0]], dtype=np.float32))
    np.testing.assert_array_equal(_pixels(to_rgb(deep_floating))[..., 0], [[0, 0], [1, 255]])


def test_to_rgb_one_bit_and_palette_alpha() -> None:
    bits = Image.fromarray(np.array([[True, False], [False, True]]))
    assert bits.mode == "1"
    np.testing.assert_array_equal(_pixels(to_rgb(bits))[..., 1], [[255, 0], [0, 255]])
    palette_alpha = Image.new("PA", (2, 2))
    assert to_rgb(palette_alpha).mode == "RGB"


@pytest.mark.parametrize(
    "kind,suffix", [("empty", ".jpg"), ("text", ".png"), ("truncated", ".jpg"), ("truncated", ".png")]
)
def test_load_image_bad_file_names_the_file(tmp_path: Path, kind: str, suffix: str) -> None:
    path = write_bad_file(tmp_path / f"broken_{kind}{suffix}", kind)
    with pytest.raises(ImageReadError, match=f"broken_{kind}") as info:
        load_image(path)
    assert info.value.path == path
    assert "skip_bad_files" in str(info.value)


def test_load_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="nowhere.jpg"):
        load_image(tmp_path / "nowhere.jpg")


def test_load_mask_reads_indices_not_colours(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 15], [255, 20, 3]], dtype=np.uint8)
    indexed = Image.frombytes("P", (3, 2), mask.tobytes())
    indexed.putpalette(voc_palette().ravel().tolist())
    indexed.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "p.png"), mask)
    Image.fromarray(mask).save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "l.png"), mask)
    assert load_mask(tmp_path / "l.png").dtype == np.uint8
    Image.fromarray(mask.astype(np.uint16)).save(tmp_path / "i16.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "i16.png"), mask)


def test_load_mask_rejects_colour_masks(tmp_path: Path) -> None:
    write_image(tmp_path / "colour.png", random_image(8, 8, seed=0))
    with pytest.raises(DatasetLayoutError, match="colour.png.*'RGB'"):
        load_mask(tmp_path / "colour.png")
    Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(tmp_path / "big.png")
    with pytest.raises(DatasetLayoutError, match="big.png"):
        load_mask(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="empty.png"):
        load_mask(write_bad_file(tmp_path / "empty.png", "empty"))


def test_voc_palette_against_bitwise_reference() -> None:
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    for index in range(256):  # slow reference: the classic bit-interleaving loop
        red = green = blue = 0
        code = index
        for j in range(8):
            red |= ((code >> 0) & 1) << (7 - j)
            green |= ((code >> 1) & 1) << (7 - j)
            blue |= ((code >> 2) & 1) << (7 - j)
            code >>= 3
        assert tuple(palette[index]) == (red, green, blue)
    assert tuple(palette[0]) == (0, 0, 0)
    assert tuple(palette[1]) == (128, 0, 0)
    assert tuple(palette[15]) == (192, 128, 128)
    assert tuple(palette[255]) == (224, 224, 192)


# --------------------------------------------------------------------------------------------------------
# ImageFolder / ImageNet
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["split", "ilsvrc"])
def test_imagefolder_both_imagenet_namings(tmp_path: Path, layout: str) -> None:
    info = make_imagefolder(tmp_path, layout=layout, classes=("zebra", "ant", "mole"), images_per_class=2)
    for split in ("train", "val"):
        dataset = ImageFolderDataset(tmp_path, split)
        assert dataset.root == info.split_dirs[split]
        assert dataset.classes == ["ant", "mole", "zebra"]
        assert dataset.class_to_idx == {"ant": 0, "mole": 1, "zebra": 2}
        assert [(p, label) for p, label in dataset.samples] == info.samples[split]
        assert dataset.targets == [label for _, label in info.samples[split]]
        assert len(dataset) == 6
        for index, (path, label) in enumerate(info.samples[split]):
            image, got_label = dataset[index]
            assert got_label == label
            assert image.mode == "RGB" and image.size == (40, 32)
            np.testing.assert_array_equal(np.asarray(image), info.pixels[path])


def test_imagefolder_root_of_class_folders_and_jpeg(tmp_path: Path) -> None:
    info = make_imagefolder(tmp_path, layout="classes", ext=".JPEG", size=(36, 44))
    dataset = ImageFolderDataset(tmp_path, "train", transform=lambda im: np.asarray(im).shape)
    assert dataset.root == tmp_path
    assert dataset.targets == [0, 0, 1, 1, 2, 2]
    shape, label = dataset[3]
    assert shape == (44, 36, 3) and label == 1
    assert len(dataset) == len(info.samples["train"])


def test_imagefolder_recursive_inside_class_and_hidden_files_ignored(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "a" / "x.png", random_image(8, 8, 0))
    write_image(tmp_path / "train" / "a" / "deeper" / "y.png", random_image(8, 8, 1))
    write_image(tmp_path / "train" / "b" / "z.png", random_image(8, 8, 2))
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".cache").mkdir()
    dataset = ImageFolderDataset(tmp_path, "train")
    assert dataset.classes == ["a", "b"]
    assert [p.name for p, _ in dataset.samples] == ["y.png", "x.png", "z.png"]
    assert dataset.targets == [0, 0, 1]


def test_imagefolder_empty_class_folder_kept_for_aligned_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image(tmp_path / "val" / "a" / "x.png", random_image(8, 8, 0))
    write_image(tmp_path / "val" / "c" / "y.png", random_image(8, 8, 1))
    (tmp_path / "val" / "b").mkdir()
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(tmp_path, "val")
    assert dataset.classes == ["a", "b", "c"]
    assert dataset.targets == [0, 2]
    assert "holds no image" in caplog.text and str(tmp_path / "val" / "b") in caplog.text


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"missing.*does not exist.*expected.*ILSVRC2012_img_train"):
        ImageFolderDataset(tmp_path / "missing", "train")

    make_imagefolder(tmp_path / "only_train", splits=("train",))
    with pytest.raises(DatasetLayoutError, match=r"no `val/` or `ILSVRC2012_img_val/`.*\['train'\]"):
        ImageFolderDataset(tmp_path / "only_train", "val")

    # Raw ImageNet validation folder: flat images, no class folders.
    for k in range(3):
        write_image(tmp_path / "flat" / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", random_image(8, 8, k))
    with pytest.raises(DatasetLayoutError, match=r"flat.*val.*no class subfolders.*holds images directly"):
        ImageFolderDataset(tmp_path / "flat", "val")

    for name in ("a", "b"):
        (tmp_path / "empty" / "train" / name).mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"empty.*no image files"):
        ImageFolderDataset(tmp_path / "empty", "train")

    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetLayoutError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "nothing", "train")
    assert issubclass(DatasetLayoutError, ValueError)


# --------------------------------------------------------------------------------------------------------
# Bad files: raise by default, skip deterministically when asked
# --------------------------------------------------------------------------------------------------------


def _folder_with_bad_files(root: Path) -> list[Path]:
    """Class folder "a" with files 0..5 where 1 (empty), 2 (truncated) and 5 (text) are bad."""
    paths = []
    for k in range(6):
        path = root / "train" / "a" / f"{k}.png"
        if k == 1:
            write_bad_file(path, "empty")
        elif k == 2:
            write_bad_file(path, "truncated")
        elif k == 5:
            write_bad_file(path, "text")
        else:
            write_image(path, random_image(12, 12, seed=k))
        paths.append(path)
    return paths


def test_bad_file_raises_naming_file_without_skipping(tmp_path: Path) -> None:
    paths = _folder_with_bad_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, "train")
    assert np.array_equal(np.asarray(dataset[0][0]), random_image(12, 12, seed=0))
    with pytest.raises(ImageReadError, match=str(paths[1])):
        dataset[1]
    with pytest.raises(ImageReadError, match=str(paths[2])):
        dataset[2]


def test_skip_bad_files_returns_next_good_sample(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = _folder_with_bad_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, "train", skip_bad_files=True)
    good = {k: random_image(12, 12, seed=k) for k in (0, 3, 4)}
    with caplog.at_level(logging.WARNING):
        first = np.asarray(dataset[1][0])
    np.testing.assert_array_equal(first, good[3])  # 1 and 2 are bad -> 3
    assert dataset.num_skipped == 2
    assert str(paths[1]) in caplog.text and str(paths[2]) in caplog.text
    np.testing.assert_array_equal(np.asarray(dataset[2][0]), good[3])  # deterministic, no new skips
    assert dataset.num_skipped == 2
    np.testing.assert_array_equal(np.asarray(dataset[5][0]), good[0])  # wraps around to the start
    assert dataset.num_skipped == 3
    np.testing.assert_array_equal(np.asarray(dataset[-1][0]), good[0])
    assert dataset.num_skipped == 3
    # A fresh dataset gives the same replacement whatever was read before.
    fresh = ImageFolderDataset(tmp_path, "train", skip_bad_files=True)
    np.testing.assert_array_equal(np.asarray(fresh[2][0]), good[3])


def test_skip_bad_files_all_bad(tmp_path: Path) -> None:
    write_bad_file(tmp_path / "x" / "a.jpg", "empty")
    write_bad_file(tmp_path / "x" / "b.jpg", "text")
    dataset = UnlabelledImageFolder(tmp_path / "x", skip_bad_files=True)
    with pytest.raises(ImageReadError, match="every one of the 2 samples"):
        dataset[0]
    assert dataset.num_skipped == 2
    with pytest.raises(IndexError):
        dataset[2]


# --------------------------------------------------------------------------------------------------------
# Unlabelled folders (COCO)
# --------------------------------------------------------------------------------------------------------


def test_unlabelled_folder_recursive_label_zero(tmp_path: Path) -> None:
    info = make_coco_folder(tmp_path, num_images=3, nested=2)
    dataset = UnlabelledImageFolder(info.folder)
    assert dataset.samples == info.files
    assert len(dataset) == 5
    for index, path in enumerate(info.files):
        image, label = dataset[index]
        assert label == 0 and image.size == (48, 40)
        np.testing.assert_array_equal(np.asarray(image), info.pixels[path])


def test_unlabelled_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"absent.*does not exist.*train2017"):
        UnlabelledImageFolder(tmp_path / "absent")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetLayoutError, match=r"empty.*holds no image"):
        UnlabelledImageFolder(tmp_path / "empty")


def test_build_pretrain_coco_uses_train2017(tmp_path: Path) -> None:
    info = make_coco_folder(tmp_path, num_images=2, nested=0)
    make_coco_folder(tmp_path, num_images=3, subdir="val2017", nested=0)
    dataset = build_pretrain_dataset("coco", tmp_path, transform=None)
    assert isinstance(dataset, UnlabelledImageFolder)
    assert dataset.root == info.folder and len(dataset) == 2
    nested = make_coco_folder(tmp_path / "mmseg", num_images=1, subdir="images/train2017", nested=0)
    assert build_pretrain_dataset("coco", tmp_path / "mmseg", transform=None).root == nested.folder
    plain = make_coco_folder(tmp_path / "plain", num_images=2, subdir="", nested=0)
    assert build_pretrain_dataset("coco", plain.root, transform=None).root == plain.root


# --------------------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nesting", ["VOC2012", "VOCdevkit", "none"])
def test_voc_train_val_masks_exact_with_borders(tmp_path: Path, nesting: str) -> None:
    info = make_voc(tmp_path, nesting=nesting)
    for split in ("train", "val"):
        dataset = VOCSegmentation(info.root, split)
        assert dataset.root == info.voc_root
        assert dataset.ids == info.ids[split]
        assert dataset.num_classes == 21 and dataset.ignore_index == 255
        assert dataset.class_names == list(VOC_CLASS_NAMES) and dataset.class_names[15] == "person"
        for index, sample_id in enumerate(info.ids[split]):
            image, mask = dataset[index]
            assert image.mode == "RGB" and image.size == (48, 40)
            assert mask.mode == "L" and mask.size == (48, 40)
            array = np.asarray(mask)
            np.testing.assert_array_equal(array, info.expected[split][sample_id])
            assert (array == 255).any()  # the object borders are kept as ignore pixels
            with Image.open(info.voc_root / "JPEGImages" / f"{sample_id}.jpg") as reference:
                np.testing.assert_array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))


def test_voc_trainaug_list_with_per_image_fallback(tmp_path: Path) -> None:
    info = make_voc(tmp_path, num_train=3, num_aug=2, num_train_without_aug=1)
    dataset = VOCSegmentation(tmp_path, "trainaug")
    assert dataset.ids == info.ids["trainaug"]
    folders = [path.parent.name for path in dataset.masks]
    assert folders == ["SegmentationClass"] + ["SegmentationClassAug"] * 4
    for index, sample_id in enumerate(dataset.ids):
        np.testing.assert_array_equal(np.asarray(dataset[index][1]), info.expected["trainaug"][sample_id])
    # The fallback image really is the SegmentationClass mask (with 255 borders).
    assert (np.asarray(dataset[0][1]) == 255).any()


def test_voc_aug_txt_means_train_plus_aug(tmp_path: Path) -> None:
    info = make_voc(tmp_path, trainaug_list="aug", num_train=2, num_aug=3, num_train_without_aug=2)
    dataset = VOCSegmentation(tmp_path, "trainaug")
    assert dataset.ids == info.ids["train"] + [i for i in info.ids["trainaug"] if i.startswith("2011")]
    assert len(dataset) == 5
    for index, sample_id in enumerate(dataset.ids):
        np.testing.assert_array_equal(np.asarray(dataset[index][1]), info.expected["trainaug"][sample_id])


def test_voc_aug_list_duplicates_removed(tmp_path: Path) -> None:
    info = make_voc(tmp_path, trainaug_list="aug", num_train=2, num_aug=1)
    lists = info.voc_root / "ImageSets" / "Segmentation"
    (lists / "aug.txt").write_text(f"{info.ids['train'][0]}\n2011_000000\n\n")
    dataset = VOCSegmentation(tmp_path, "trainaug")
    assert dataset.ids == info.ids["train"] + ["2011_000000"]


def test_voc_joint_transforms(tmp_path: Path) -> None:
    make_voc(tmp_path)
    calls = []

    def transforms(image: Image.Image, mask: Image.Image) -> tuple[tuple[int, int], np.ndarray]:
        calls.append((image.mode, mask.mode))
        return image.size, np.asarray(mask.resize((4, 4), Image.NEAREST))

    dataset = VOCSegmentation(tmp_path, "val", transforms=transforms)
    size, small = dataset[0]
    assert size == (48, 40) and small.shape == (4, 4) and calls == [("RGB", "L")]


def test_voc_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"nowhere.*not a Pascal VOC root.*JPEGImages"):
        VOCSegmentation(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="trainaug"):
        VOCSegmentation(tmp_path, "test")

    info = make_voc(tmp_path / "no_lists", trainaug_list=None)
    with pytest.raises(DatasetLayoutError, match=r"neither trainaug.txt nor train.txt \+ aug.txt"):
        VOCSegmentation(info.root, "trainaug")
    (info.voc_root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"val.txt` does not exist"):
        VOCSegmentation(info.root, "val")

    info = make_voc(tmp_path / "missing_mask")
    (info.voc_root / "SegmentationClass" / f"{info.ids['val'][1]}.png").unlink()
    with pytest.raises(
        DatasetLayoutError, match=rf"SegmentationClass` lacks the masks of 1 of 2.*{info.ids['val'][1]}"
    ):
        VOCSegmentation(info.root, "val")

    info = make_voc(tmp_path / "missing_image")
    (info.voc_root / "JPEGImages" / f"{info.ids['train'][0]}.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=rf"JPEGImages` lacks the images.*{info.ids['train'][0]}"):
        VOCSegmentation(info.root, "train")

    info = make_voc(tmp_path / "empty_list")
    (info.voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(DatasetLayoutError, match="list of .* is empty"):
        VOCSegmentation(info.root, "val")


def test_voc_bad_mask_is_skippable(tmp_path: Path) -> None:
    info = make_voc(tmp_path, num_val=3)
    bad = info.voc_root / "SegmentationClass" / f"{info.ids['val'][0]}.png"
    write_bad_file(bad, "truncated")
    with pytest.raises(ImageReadError, match=str(bad)):
        VOCSegmentation(tmp_path, "val")[0]
    dataset = VOCSegmentation(tmp_path, "val", skip_bad_files=True)
    np.testing.assert_array_equal(np.asarray(dataset[0][1]), info.expected["val"][info.ids["val"][1]])
    assert dataset.num_skipped == 1


def test_segmentation_size_mismatch_is_reported(tmp_path: Path) -> None:
    info = make_voc(tmp_path)
    sample_id = info.ids["val"][0]
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(
        info.voc_root / "SegmentationClass" / f"{sample_id}.png"
    )
    with pytest.raises(ImageReadError, match=rf"{sample_id}.png` is 10x10 but image .* is 48x40"):
        VOCSegmentation(tmp_path, "val")[0]


# --------------------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parent", [True, False])
def test_ade20k_shift_and_layout(tmp_path: Path, parent: bool) -> None:
    info = make_ade20k(tmp_path, parent=parent)
    for split, alias in (("training", "train"), ("validation", "val")):
        for name in (split, alias):
            dataset = ADE20KSegmentation(info.root, name)
            assert dataset.root == info.ade_root and dataset.split == split
            assert dataset.images == info.images[split]
            assert dataset.num_classes == 150 and dataset.ignore_index == 255
            assert len(dataset.class_names) == 150
        for index in range(len(dataset)):
            image, mask = dataset[index]
            assert image.mode == "RGB" and image.size == (48, 32) and mask.mode == "L"
            array = np.asarray(mask)
            raw = info.raw_masks[split][index]
            np.testing.assert_array_equal(array, info.expected_masks[split][index])
            assert array[0, 0] == 149 and array[0, 1] == 0 and array[-1, -1] == 255  # hand-checked ends
            # Pixel-by-pixel reference of the shift.
            for (i, j), value in np.ndenumerate(raw):
                assert array[i, j] == (255 if value == 0 else value - 1)


def test_ade20k_class_names() -> None:
    assert len(ADE20K_CLASS_NAMES) == 150
    assert ADE20K_CLASS_NAMES[0] == "wall" and ADE20K_CLASS_NAMES[12] == "person"
    assert ADE20K_CLASS_NAMES[-1] == "flag"


def test_ade20k_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"not an ADE20K root.*ADEChallengeData2016"):
        ADE20KSegmentation(tmp_path, "training")
    with pytest.raises(ValueError, match="training"):
        ADE20KSegmentation(tmp_path, "test")
    info = make_ade20k(tmp_path / "a", num_training=3)
    (info.ade_root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"lacks the annotations of 1 of 3.*ADE_train_00000002"):
        ADE20KSegmentation(info.root, "training")
    info = make_ade20k(tmp_path / "b")
    for path in info.images["validation"]:
        path.unlink()
    with pytest.raises(DatasetLayoutError, match=r"validation` holds no image"):
        ADE20KSegmentation(info.root, "validation")
    (info.ade_root / "annotations" / "training").rename(info.ade_root / "annotations" / "train")
    with pytest.raises(DatasetLayoutError, match=r"annotations/training` does not exist"):
        ADE20KSegmentation(info.root, "training")


# --------------------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------------------


def test_factories_build_every_reader(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "in", images_per_class=1)
    voc = make_voc(tmp_path / "voc")
    ade = make_ade20k(tmp_path / "ade")

    pretrain = build_pretrain_dataset("imagefolder", tmp_path / "in", transform=lambda im: im.size)
    assert isinstance(pretrain, ImageFolderDataset) and pretrain[0] == ((40, 32), 0)
    assert isinstance(build_pretrain_dataset("imagenet1k", tmp_path / "in", None), ImageFolderDataset)
    synthetic = build_pretrain_dataset("synthetic", None, None, {"image_size": 32, "num_train": 3})
    assert len(synthetic) == 3 and synthetic[0][0].size == (32, 32)

    val = build_classification_dataset("imagefolder", tmp_path / "in", "val", None)
    assert len(val) == 3 and val.targets == [0, 1, 2]
    assert isinstance(
        build_classification_dataset("imagenet1k", tmp_path / "in", "val", None), ImageFolderDataset
    )
    synthetic_val = build_classification_dataset(
        "synthetic", None, "val", None, {"num_val": 2, "image_size": 32}
    )
    assert len(synthetic_val) == 2 and synthetic_val.split == "val"

    voc_set = build_segmentation_dataset("voc", voc.root, "trainaug", None)
    assert isinstance(voc_set, VOCSegmentation) and len(voc_set) == len(voc.ids["trainaug"])
    ade_set = build_segmentation_dataset("ade20k", ade.root, "val", None)
    assert isinstance(ade_set, ADE20KSegmentation) and ade_set.split == "validation"
    seg = build_segmentation_dataset("synthetic", None, "trainaug", None, {"image_size": 32, "num_train": 4})
    assert seg.split == "train" and len(seg) == 4 and seg.num_classes == 5 and seg.ignore_index == 255
    assert seg.class_names[0] == "background"


def test_factories_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--dataset_type 'cifar'.*imagenet1k"):
        build_pretrain_dataset("cifar", tmp_path, None)
    with pytest.raises(ValueError, match=r"'voc'.*imagefolder"):
        build_classification_dataset("voc", tmp_path, "train", None)
    with pytest.raises(ValueError, match=r"'cityscapes'.*ade20k"):
        build_segmentation_dataset("cityscapes", tmp_path, "val", None)
    with pytest.raises(DatasetLayoutError, match="needs --data_path"):
        build_pretrain_dataset("imagenet1k", None, None)
    with pytest.raises(DatasetLayoutError, match="needs --data_path"):
        build_segmentation_dataset("voc", "", "val", None)
    with pytest.raises(DatasetLayoutError, match=r"`.*nothing_here` does not exist"):
        build_pretrain_dataset("coco", tmp_path / "nothing_here", None)
