"""Helpers that fabricate tiny datasets on disk in the real layouts, for any test that needs files.

Every ``make_*`` function writes a few small images (default 32-48 px) under a folder (usually pytest's
``tmp_path``) and returns a dataclass describing what it wrote (paths, ids, labels, the exact pixel and
mask arrays) so tests can compare what a reader returns with what is on disk::

    from tests.fixtures_datasets import make_imagefolder, make_voc

    info = make_voc(tmp_path)
    dataset = VOCSegmentation(info.root, "val")
    assert np.array_equal(np.asarray(dataset[0][1]), info.masks[info.ids["val"][0]])

Images are random but seeded, written as PNG by default (lossless, so pixels can be compared exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data.datasets import voc_palette


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """A seeded (H, W, 3) uint8 image of smooth colour blocks plus noise (not constant, not pure noise)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3))
    rows = np.arange(height) * 4 // height
    cols = np.arange(width) * 4 // width
    noise = rng.integers(-20, 21, size=(height, width, 3))
    return np.clip(blocks[rows][:, cols] + noise, 0, 255).astype(np.uint8)


def write_image(path: str | Path, array: np.ndarray, quality: int = 95) -> Path:
    """Write an RGB (H, W, 3) or greyscale (H, W) uint8 array; the format follows the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=quality)
    else:
        image.save(path)
    return path


def write_palette_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write a (H, W) uint8 class-index mask as a palette ("P") PNG with the Pascal VOC palette."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    indexed = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    indexed.putpalette(voc_palette().ravel().tolist())
    indexed.save(path)
    return path


def write_bad_file(path: str | Path, kind: str = "empty", source: np.ndarray | None = None) -> Path:
    """Write an unreadable "image" file.

    Args:
        path: destination; its extension decides the format of a truncated file.
        kind: "empty" (zero bytes), "text" (plain text) or "truncated" (the first 60% of a valid file).
        source: pixels for the truncated file (a random 48x48 image by default).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        write_image(path, random_image(48, 48, seed=7) if source is None else source)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.6)])
    else:
        raise ValueError(f"kind={kind!r}: expected 'empty', 'text' or 'truncated'")
    return path


def segmentation_mask(
    height: int, width: int, seed: int, class_ids: tuple[int, ...], border: int | None = None
) -> np.ndarray:
    """A (H, W) uint8 mask of 0 plus 2-3 rectangles with labels from ``class_ids``.

    With ``border`` set (e.g. 255 for VOC), each rectangle gets a one-pixel outline of that value, like
    Pascal VOC's object boundaries.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 4))):
        label = int(rng.choice(class_ids))
        top, left = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        bottom = int(rng.integers(top + 6, height + 1))
        right = int(rng.integers(left + 6, width + 1))
        if border is not None:
            mask[top:bottom, left:right] = border
            mask[top + 1 : bottom - 1, left + 1 : right - 1] = label
        else:
            mask[top:bottom, left:right] = label
    return mask


@dataclass
class ImageFolderInfo:
    """What :func:`make_imagefolder` wrote.

    Attributes:
        root: the folder to pass to the reader.
        split_dirs: split name -> folder holding the class folders.
        classes: class names in sorted order (label = index).
        samples: split name -> [(path, label)] in the order the reader lists them.
        pixels: path -> the RGB array written (exact for PNG, pre-compression for JPEG).
    """

    root: Path
    split_dirs: dict[str, Path]
    classes: list[str]
    samples: dict[str, list[tuple[Path, int]]]
    pixels: dict[Path, np.ndarray] = field(default_factory=dict)


def make_imagefolder(
    root: str | Path,
    classes: tuple[str, ...] = ("n01440764", "n01443537", "n01484850"),
    images_per_class: int = 2,
    splits: tuple[str, ...] = ("train", "val"),
    layout: str = "split",
    size: tuple[int, int] = (40, 32),
    ext: str = ".png",
    seed: int = 0,
) -> ImageFolderInfo:
    """Write a labelled ImageFolder tree.

    Args:
        root: dataset root.
        classes: class folder names (any order; labels follow sorted order).
        images_per_class: images per class and split.
        splits: split folders to write.
        layout: "split" (``root/<split>/<class>/``), "ilsvrc" (``root/ILSVRC2012_img_<split>/<class>/``) or
            "classes" (``root/<class>/``; only the first split is written, recorded under that name).
        size: (width, height) of the images.
        ext: file extension, e.g. ".png" or ".JPEG".
        seed: base seed of the pixels.
    """
    root = Path(root)
    width, height = size
    sorted_classes = sorted(classes)
    if layout == "split":
        split_dirs = {split: root / split for split in splits}
    elif layout == "ilsvrc":
        split_dirs = {split: root / f"ILSVRC2012_img_{split}" for split in splits}
    elif layout == "classes":
        split_dirs = {splits[0]: root}
    else:
        raise ValueError(f"layout={layout!r}: expected 'split', 'ilsvrc' or 'classes'")
    info = ImageFolderInfo(root=root, split_dirs=split_dirs, classes=sorted_classes, samples={})
    counter = seed
    for split, folder in split_dirs.items():
        info.samples[split] = []
        for label, name in enumerate(sorted_classes):
            for k in range(images_per_class):
                counter += 1
                path = folder / name / f"{name}_{split}_{k:04d}{ext}"
                pixels = random_image(height, width, seed=counter)
                write_image(path, pixels)
                info.samples[split].append((path, label))
                info.pixels[path] = pixels
    return info


@dataclass
class CocoInfo:
    """What :func:`make_coco_folder` wrote.

    Attributes:
        root: the dataset root (holding ``subdir``).
        folder: the image folder itself (``root/subdir``).
        files: image paths in the order the reader lists them (sorted by relative path).
        pixels: path -> RGB array written.
    """

    root: Path
    folder: Path
    files: list[Path]
    pixels: dict[Path, np.ndarray] = field(default_factory=dict)


def make_coco_folder(
    root: str | Path,
    num_images: int = 4,
    subdir: str = "train2017",
    nested: int = 1,
    size: tuple[int, int] = (48, 40),
    ext: str = ".png",
    seed: int = 0,
) -> CocoInfo:
    """Write a plain unlabelled image folder ``root/subdir/*`` (COCO style).

    Args:
        root: dataset root.
        num_images: images directly in the folder.
        subdir: the image folder's name ("" writes into ``root``).
        nested: extra images in a ``more/`` subfolder (readers search recursively).
        size: (width, height).
        ext: file extension (".jpg" like COCO, ".png" for exact pixels).
        seed: base seed.
    """
    root = Path(root)
    folder = root / subdir if subdir else root
    width, height = size
    info = CocoInfo(root=root, folder=folder, files=[])
    names = [f"{k:012d}{ext}" for k in range(num_images)] + [f"more/{k:012d}{ext}" for k in range(nested)]
    for k, name in enumerate(names):
        pixels = random_image(height, width, seed=seed + k)
        path = write_image(folder / name, pixels)
        info.files.append(path)
        info.pixels[path] = pixels
    info.files.sort(key=lambda p: p.relative_to(folder).as_posix())
    return info


@dataclass
class VOCInfo:
    """What :func:`make_voc` wrote.

    Attributes:
        root: the folder to pass to the reader (depends on ``nesting``).
        voc_root: the VOC2012 folder.
        ids: split -> ids in list order; "trainaug" is the list the reader should produce.
        masks: id -> mask in SegmentationClass (train and val ids; with 255 borders).
        aug_masks: id -> mask in SegmentationClassAug (no borders, other labels than ``masks``).
        expected: split -> id -> the mask the reader must return for that split.
        pixels: id -> RGB array written before JPEG compression.
    """

    root: Path
    voc_root: Path
    ids: dict[str, list[str]]
    masks: dict[str, np.ndarray]
    aug_masks: dict[str, np.ndarray]
    expected: dict[str, dict[str, np.ndarray]]
    pixels: dict[str, np.ndarray] = field(default_factory=dict)


def make_voc(
    root: str | Path,
    num_train: int = 3,
    num_val: int = 2,
    num_aug: int = 2,
    nesting: str = "VOC2012",
    trainaug_list: str | None = "trainaug",
    num_train_without_aug: int = 1,
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
) -> VOCInfo:
    """Write a tiny Pascal VOC 2012 tree with palette masks.

    Train ids have masks in SegmentationClass and (except the first ``num_train_without_aug``) in
    SegmentationClassAug; aug-only ids only in SegmentationClassAug; val ids only in SegmentationClass.
    The Aug version of a mask differs from the SegmentationClass one, so a test can tell which was read.

    Args:
        root: where to write.
        num_train, num_val, num_aug: ids per list.
        nesting: "VOC2012" (``root/VOC2012/...``, pass ``root``), "VOCdevkit" (``root/VOCdevkit/VOC2012``)
            or "none" (``root`` is the VOC2012 folder itself).
        trainaug_list: "trainaug" writes ``trainaug.txt`` (train + aug ids), "aug" writes ``aug.txt`` (aug
            ids only; the reader must concatenate train + aug), None writes neither.
        num_train_without_aug: train ids whose Aug mask is missing (the reader falls back to
            SegmentationClass for them).
        size: (width, height).
        seed: base seed.
    """
    root = Path(root)
    voc_root = {"VOC2012": root / "VOC2012", "VOCdevkit": root / "VOCdevkit" / "VOC2012", "none": root}[
        nesting
    ]
    width, height = size
    train_ids = [f"2007_{k:06d}" for k in range(num_train)]
    val_ids = [f"2008_{k:06d}" for k in range(num_val)]
    aug_ids = [f"2011_{k:06d}" for k in range(num_aug)]
    info = VOCInfo(
        root=root,
        voc_root=voc_root,
        ids={"train": train_ids, "val": val_ids, "trainaug": train_ids + aug_ids},
        masks={},
        aug_masks={},
        expected={},
    )
    for k, sample_id in enumerate(train_ids + val_ids + aug_ids):
        pixels = random_image(height, width, seed=seed + k)
        write_image(voc_root / "JPEGImages" / f"{sample_id}.jpg", pixels)
        info.pixels[sample_id] = pixels
        if sample_id not in aug_ids:
            mask = segmentation_mask(height, width, seed + 1000 + k, tuple(range(1, 21)), border=255)
            write_palette_mask(voc_root / "SegmentationClass" / f"{sample_id}.png", mask)
            info.masks[sample_id] = mask
        has_aug = sample_id in aug_ids or sample_id in train_ids[num_train_without_aug:]
        if has_aug:
            mask = segmentation_mask(height, width, seed + 2000 + k, tuple(range(1, 21)))
            write_palette_mask(voc_root / "SegmentationClassAug" / f"{sample_id}.png", mask)
            info.aug_masks[sample_id] = mask
    lists = voc_root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))
    if trainaug_list == "trainaug":
        (lists / "trainaug.txt").write_text("".join(f"{i}\n" for i in train_ids + aug_ids))
    elif trainaug_list == "aug":
        (lists / "aug.txt").write_text("".join(f"{i}\n" for i in aug_ids))
    info.expected = {
        "train": {i: info.masks[i] for i in train_ids},
        "val": {i: info.masks[i] for i in val_ids},
        "trainaug": {i: info.aug_masks.get(i, info.masks.get(i)) for i in train_ids + aug_ids},  # type: ignore[misc]
    }
    return info


@dataclass
class ADE20KInfo:
    """What :func:`make_ade20k` wrote.

    Attributes:
        root: the folder to pass to the reader (the parent, or ADEChallengeData2016 itself).
        ade_root: the ADEChallengeData2016 folder.
        images: split ("training" / "validation") -> image paths in sorted order.
        raw_masks: split -> raw annotation arrays (0 = other, 1..150 = classes).
        expected_masks: split -> the arrays the reader must return (0 -> 255, k -> k - 1).
        pixels: split -> RGB arrays written (before JPEG compression).
    """

    root: Path
    ade_root: Path
    images: dict[str, list[Path]]
    raw_masks: dict[str, list[np.ndarray]]
    expected_masks: dict[str, list[np.ndarray]]
    pixels: dict[str, list[np.ndarray]]


def make_ade20k(
    root: str | Path,
    num_training: int = 3,
    num_validation: int = 2,
    parent: bool = True,
    size: tuple[int, int] = (48, 32),
    seed: int = 0,
) -> ADE20KInfo:
    """Write a tiny ADEChallengeData2016 tree with greyscale ("L") annotation PNGs.

    Raw labels include 0 (other), 1 and 150 so the shift 0 -> 255, k -> k - 1 is visible at both ends.

    Args:
        root: where to write.
        num_training, num_validation: images per split.
        parent: True writes ``root/ADEChallengeData2016/...`` and returns ``root`` as the root; False makes
            ``root`` itself the ADEChallengeData2016 folder.
        size: (width, height).
        seed: base seed.
    """
    root = Path(root)
    ade_root = root / "ADEChallengeData2016" if parent else root
    width, height = size
    info = ADE20KInfo(root=root, ade_root=ade_root, images={}, raw_masks={}, expected_masks={}, pixels={})
    counts = {"training": num_training, "validation": num_validation}
    for split, count in counts.items():
        info.images[split], info.raw_masks[split], info.expected_masks[split], info.pixels[split] = (
            [],
            [],
            [],
            [],
        )
        prefix = "train" if split == "training" else "val"
        for k in range(count):
            stem = f"ADE_{prefix}_{k + 1:08d}"
            pixels = random_image(height, width, seed=seed + 10 * k + len(split))
            path = write_image(ade_root / "images" / split / f"{stem}.jpg", pixels)
            raw = segmentation_mask(height, width, seed + 500 + 10 * k + len(split), (1, 2, 75, 149, 150))
            raw[0, 0], raw[0, 1], raw[-1, -1] = 150, 1, 0
            write_image(ade_root / "annotations" / split / f"{stem}.png", raw)
            expected = np.where(raw == 0, 255, raw.astype(np.int16) - 1).astype(np.uint8)
            info.images[split].append(path)
            info.raw_masks[split].append(raw)
            info.expected_masks[split].append(expected)
            info.pixels[split].append(pixels)
    return info
