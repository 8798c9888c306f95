"""Readers for the real datasets: ImageFolder/ImageNet, plain image folders (COCO), Pascal VOC 2012, ADE20K.

One reader class per layout (the layouts are spelled out in each class docstring), plus the factories the
launchers call. Every reader

* converts images to 8-bit RGB whatever their colour mode (:func:`load_image`);
* reads masks as class indices, never as colours (:func:`load_mask`);
* raises :class:`DatasetLayoutError` naming the path and the expected layout when a folder or list is
  missing or empty, and :class:`ImageReadError` naming the file when a file cannot be decoded; with
  ``skip_bad_files=True`` an unreadable sample is logged, counted in ``num_skipped`` and replaced by the
  next readable one (index + 1, + 2, ... cyclically, so the replacement is deterministic).

Segmentation readers return ``(PIL RGB image, PIL "L" mask)`` (or ``transforms(image, mask)``), with mask
values = class ids and ``ignore_index = 255``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from data.palette import voc_palette  # noqa: F401  (re-exported: the VOC reader's public palette)
from data.synthetic import SyntheticScenes, SyntheticSegmentation

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
IGNORE_INDEX: int = 255

# fmt: off
VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

# The 150 SceneParsing classes in label order 1..150 (index k here is raw label k + 1).
ADE20K_CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# fmt: on

IMAGEFOLDER_LAYOUT = (
    "`<root>/{split}/<class>/*.JPEG`, `<root>/ILSVRC2012_img_{split}/<class>/*.JPEG`, "
    "or `<root>/<class>/*.JPEG`"
)
VOC_LAYOUT = (
    "`VOC2012/` holding `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png`, "
    "`SegmentationClassAug/<id>.png` and `ImageSets/Segmentation/{train,trainaug (or aug),val}.txt` "
    "(root may be VOC2012/, its parent, or the parent of VOCdevkit/VOC2012/)"
)
ADE20K_LAYOUT = (
    "`ADEChallengeData2016/{images,annotations}/{training,validation}/` with `ADE_*.jpg` / `ADE_*.png` pairs "
    "(root may be ADEChallengeData2016/ or its parent)"
)


class DatasetLayoutError(ValueError):
    """A dataset folder is missing, empty, or not in the expected layout (the message names both)."""


class ImageReadError(OSError):
    """A single image or mask file cannot be decoded (empty, truncated, or not an image).

    Attributes:
        path: the offending file.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


def _scale_to_8bit(values: np.ndarray) -> np.ndarray:
    """Integer or float intensities to uint8: 16-bit data (any value > 255) as round(v * 255 / 65535)."""
    values = values.astype(np.float64)
    if values.size and values.max() > 255.0:
        values = np.clip(values, 0.0, 65535.0) * (255.0 / 65535.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow colour mode to 8-bit RGB.

    * RGB: returned as is; L, P, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversion (CMYK as
      R = (255 - C)(255 - K) / 255, etc.);
    * RGBA, LA, PA, RGBa, La: alpha dropped (as torchvision's loader does, so features match the usual
      pipelines);
    * I;16*: v -> round(v * 255 / 65535); I and F: the same when any value exceeds 255 (16-bit data; this
      is how Pillow < 10 opened 16-bit PNGs), otherwise the values are taken as 8-bit. Pillow itself would
      clip 16-bit values at 255 and make most such images white.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        grey = _scale_to_8bit(np.asarray(image))
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "PA":
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB (see :func:`to_rgb` for the mode conversions).

    Raises:
        ImageReadError: naming the file, when it is missing, empty, truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            converted = to_rgb(image)
            # A detached copy, not the file-backed plugin object (as torchvision's loader returns).
            return image.copy() if converted is image else converted
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(
            path,
            f"cannot read image `{path}`: {error}. The file is missing, empty, truncated or not an "
            "image: replace or delete it, or pass skip_bad_files=True to skip it",
        ) from error


def load_mask(path: str | Path) -> np.ndarray:
    """Read a segmentation mask PNG as class indices, (H, W) uint8.

    "P" masks give their palette indices (not the colours), "L" masks their grey values; 16/32-bit integer
    masks are accepted when every value fits in 0..255.

    Raises:
        ImageReadError: naming the file, when it cannot be decoded.
        DatasetLayoutError: when the mask is colour-coded (RGB) or has values above 255.
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            values = np.array(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(
            path,
            f"cannot read mask `{path}`: {error}. The file is missing, empty, truncated or not an "
            "image: replace or delete it, or pass skip_bad_files=True to skip it",
        ) from error
    if mode in ("P", "L"):
        return values.astype(np.uint8, copy=False)
    if mode == "1":
        return values.astype(np.uint8)
    if mode.startswith("I") and values.size and values.min() >= 0 and values.max() <= 255:
        return values.astype(np.uint8)
    raise DatasetLayoutError(
        f"mask `{path}` has mode {mode!r}; expected a palette ('P') or greyscale ('L') PNG whose pixel "
        "values are class indices 0..255. Convert colour-coded masks to index masks first"
    )


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """The image files (:data:`IMAGE_EXTENSIONS`) in ``folder`` and, when ``recursive``, in every folder
    below it (symlinks followed), sorted by relative path; hidden files and folders are skipped."""
    folder = Path(folder)
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".")) if recursive else []
        found.extend(Path(directory) / name for name in sorted(files) if _is_image_file(name))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _require_dir(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise DatasetLayoutError(f"`{path}` does not exist or is not a folder; expected {layout}")


class _FileDataset(Dataset):
    """Deterministic bad-file skipping shared by the file readers; subclasses implement ``_read``.

    With ``skip_bad_files``, sample i is the first readable one among i, i+1, ... (cyclically). Unreadable
    indices are remembered, so each is logged once per process; ``num_skipped`` counts them (per process:
    each DataLoader worker keeps its own count).
    """

    root: Path

    def __init__(self, skip_bad_files: bool) -> None:
        self.skip_bad_files = skip_bad_files
        self._bad_indices: set[int] = set()

    @property
    def num_skipped(self) -> int:
        return len(self._bad_indices)

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, index: int) -> tuple[Any, ...]:
        raise NotImplementedError

    def _read_or_skip(self, index: int) -> tuple[Any, ...]:
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"index {index} out of range for a dataset of {length} samples")
        for offset in range(length):
            candidate = (index + offset) % length
            if candidate in self._bad_indices:
                continue
            try:
                return self._read(candidate)
            except ImageReadError as error:
                if not self.skip_bad_files:
                    raise
                self._bad_indices.add(candidate)
                logger.warning(
                    "skipping unreadable sample %d (%d skipped so far): %s",
                    candidate,
                    self.num_skipped,
                    error,
                )
        raise ImageReadError(
            self.root, f"every one of the {length} samples under `{self.root}` is unreadable"
        )


class ImageFolderDataset(_FileDataset):
    """Labelled image folders: ImageNet-1k (both the ``train/`` and the ``ILSVRC2012_img_train/`` naming) or
    any ImageFolder tree.

    The split folder is the first that exists of ``root/<split>`` and ``root/ILSVRC2012_img_<split>``; a root
    with neither, that holds class folders directly, is used itself. Classes are the sorted names of the
    split folder's subfolders (an empty class folder is kept, with a warning, so that class indices agree
    between splits); images are found recursively inside each class folder. ``samples``, ``targets``,
    ``classes`` and ``class_to_idx`` follow torchvision's ImageFolder.

    Args:
        root: dataset root (see above).
        split: "train" or "val" (any folder name works).
        transform: applied to the PIL RGB image.
        skip_bad_files: replace unreadable images by the next readable one instead of raising.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        skip_bad_files: bool = False,
    ) -> None:
        super().__init__(skip_bad_files)
        self.split = split
        self.transform = transform
        self.root = self._resolve_split_folder(Path(root), split)
        class_folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_folders:
            has_images = any(_is_image_file(p.name) for p in self.root.iterdir())
            hint = (
                " It holds images directly: sort them into class folders (ImageNet's raw validation "
                "folder needs its ground-truth file, e.g. with the usual valprep.sh script)"
                if has_images
                else ""
            )
            layout = IMAGEFOLDER_LAYOUT.format(split=split)
            raise DatasetLayoutError(f"`{self.root}` has no class subfolders; expected {layout}.{hint}")
        self.classes: list[str] = [p.name for p in class_folders]
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(class_folders):
            images = list_images(folder)
            if not images:
                logger.warning(
                    "class folder `%s` holds no image; keeping it so class indices stay aligned", folder
                )
            self.samples.extend((path, label) for path in images)
        if not self.samples:
            raise DatasetLayoutError(
                f"`{self.root}` has class folders but no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                f"expected {IMAGEFOLDER_LAYOUT.format(split=split)}"
            )
        self.targets: list[int] = [label for _, label in self.samples]
        logger.info("%s: %d images in %d classes", self.root, len(self.samples), len(self.classes))

    @staticmethod
    def _resolve_split_folder(root: Path, split: str) -> Path:
        layout = IMAGEFOLDER_LAYOUT.format(split=split)
        _require_dir(root, layout)
        for name in (split, f"ILSVRC2012_img_{split}"):
            if (root / name).is_dir():
                return root / name
        split_like = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and (p.name in ("train", "val", "test") or p.name.startswith("ILSVRC2012_img_"))
        )
        if split_like:
            raise DatasetLayoutError(
                f"`{root}` has no `{split}/` or `ILSVRC2012_img_{split}/` folder (found {split_like}); "
                f"expected {layout}"
            )
        logger.info("`%s` has no %s/ folder; reading it as a root of class folders", root, split)
        return root

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path), label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self._read_or_skip(index)
        return (self.transform(image) if self.transform is not None else image), label


class UnlabelledImageFolder(_FileDataset):
    """Every image below a folder, recursively, with label 0 (e.g. COCO ``train2017/*.jpg``).

    Args:
        root: the folder.
        transform: applied to the PIL RGB image.
        skip_bad_files: replace unreadable images by the next readable one instead of raising.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_bad_files: bool = False,
    ) -> None:
        super().__init__(skip_bad_files)
        self.root = Path(root)
        self.transform = transform
        layout = "a folder of images, searched recursively (e.g. COCO `train2017/*.jpg`)"
        _require_dir(self.root, layout)
        self.samples: list[Path] = list_images(self.root)
        if not self.samples:
            raise DatasetLayoutError(
                f"`{self.root}` holds no image file ({', '.join(IMAGE_EXTENSIONS)}); expected {layout}"
            )
        logger.info("%s: %d unlabelled images", self.root, len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> tuple[Image.Image]:
        return (load_image(self.samples[index]),)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        (image,) = self._read_or_skip(index)
        return (self.transform(image) if self.transform is not None else image), 0


class _SegmentationFiles(_FileDataset):
    """Image/mask pairs read as (PIL RGB, PIL "L" of class ids); subclasses set pairs and class metadata."""

    num_classes: int
    class_names: list[str]
    ignore_index: int = IGNORE_INDEX

    def __init__(
        self, root: Path, transforms: Callable[[Image.Image, Image.Image], Any] | None, skip_bad_files: bool
    ) -> None:
        super().__init__(skip_bad_files)
        self.root = root
        self.transforms = transforms
        self.images: list[Path] = []
        self.masks: list[Path] = []

    def __len__(self) -> int:
        return len(self.images)

    def _convert_mask(self, mask: np.ndarray) -> np.ndarray:
        return mask

    def _read(self, index: int) -> tuple[Image.Image, Image.Image]:
        image = load_image(self.images[index])
        mask = self._convert_mask(load_mask(self.masks[index]))
        if mask.shape != (image.height, image.width):
            raise ImageReadError(
                self.masks[index],
                f"mask `{self.masks[index]}` is {mask.shape[1]}x{mask.shape[0]} but image "
                f"`{self.images[index]}` is {image.width}x{image.height}; they must have the same size",
            )
        return image, Image.fromarray(mask)

    def __getitem__(self, index: int) -> Any:
        image, mask = self._read_or_skip(index)
        if self.transforms is not None:
            return self.transforms(image, mask)
        return image, mask


def _read_id_list(path: Path) -> list[str]:
    """Ids of a VOC ImageSets list: first token of each non-empty line, in file order."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _format_missing(missing: Sequence[str], total: int) -> str:
    shown = ", ".join(missing[:5])
    return f"{len(missing)} of {total} (first: {shown})"


class VOCSegmentation(_SegmentationFiles):
    """Pascal VOC 2012 semantic segmentation: 21 classes (0 = background), 255 = object borders (ignored).

    Layout (``root`` may be the VOC2012 folder, a folder holding ``VOC2012/``, or one holding
    ``VOCdevkit/VOC2012/``)::

        VOC2012/JPEGImages/<id>.jpg
        VOC2012/SegmentationClass/<id>.png        masks of train and val
        VOC2012/SegmentationClassAug/<id>.png     SBD-augmented masks (trainaug)
        VOC2012/ImageSets/Segmentation/{train,val,trainaug}.txt   (or aug.txt: trainaug = train + aug)

    Masks: train/val from SegmentationClass; trainaug from SegmentationClassAug, falling back per image to
    SegmentationClass when an id is missing there. Masks are palette PNGs, read as indices.

    Args:
        root: see above.
        split: "train", "trainaug" or "val".
        transforms: joint callable ``transforms(image, mask)``.
        skip_bad_files: replace unreadable pairs by the next readable one instead of raising.
    """

    SPLITS = ("train", "trainaug", "val")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Callable[[Image.Image, Image.Image], Any] | None = None,
        skip_bad_files: bool = False,
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"split={split!r}: Pascal VOC splits are {self.SPLITS}")
        super().__init__(self._resolve_root(Path(root)), transforms, skip_bad_files)
        self.num_classes = len(VOC_CLASS_NAMES)
        self.class_names = list(VOC_CLASS_NAMES)
        self.split = split
        self.ids = self._split_ids(split)
        if not self.ids:
            raise DatasetLayoutError(f"the `{split}` list of `{self.root}` is empty; expected {VOC_LAYOUT}")
        self.images, self.masks = self._pair_files(self.ids)
        logger.info("%s: %d %s images", self.root, len(self.ids), split)

    @staticmethod
    def _resolve_root(root: Path) -> Path:
        candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
        for candidate in candidates:
            if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
                return candidate
        tried = ", ".join(f"`{c}`" for c in candidates)
        raise DatasetLayoutError(
            f"`{root}` is not a Pascal VOC root: none of {tried} holds JPEGImages/ and "
            f"ImageSets/Segmentation/; expected {VOC_LAYOUT}"
        )

    def _split_ids(self, split: str) -> list[str]:
        lists = self.root / "ImageSets" / "Segmentation"
        if split == "trainaug" and not (lists / "trainaug.txt").is_file():
            if (lists / "aug.txt").is_file() and (lists / "train.txt").is_file():
                combined = _read_id_list(lists / "train.txt") + _read_id_list(lists / "aug.txt")
                return list(dict.fromkeys(combined))
            raise DatasetLayoutError(
                f"`{lists}` has neither trainaug.txt nor train.txt + aug.txt; expected {VOC_LAYOUT}"
            )
        path = lists / f"{split}.txt"
        if not path.is_file():
            raise DatasetLayoutError(f"split list `{path}` does not exist; expected {VOC_LAYOUT}")
        return _read_id_list(path)

    def _pair_files(self, ids: list[str]) -> tuple[list[Path], list[Path]]:
        def listing(folder: str) -> set[str]:
            path = self.root / folder
            return set(os.listdir(path)) if path.is_dir() else set()

        image_names = listing("JPEGImages")
        mask_folders = (
            ["SegmentationClassAug", "SegmentationClass"]
            if self.split == "trainaug"
            else ["SegmentationClass"]
        )
        mask_names = {folder: listing(folder) for folder in mask_folders}
        images, masks, missing_images, missing_masks = [], [], [], []
        for sample_id in ids:
            if f"{sample_id}.jpg" not in image_names:
                missing_images.append(sample_id)
            images.append(self.root / "JPEGImages" / f"{sample_id}.jpg")
            folder = next((f for f in mask_folders if f"{sample_id}.png" in mask_names[f]), None)
            if folder is None:
                missing_masks.append(sample_id)
            else:
                masks.append(self.root / folder / f"{sample_id}.png")
        if missing_images:
            raise DatasetLayoutError(
                f"`{self.root / 'JPEGImages'}` lacks the images of "
                f"{_format_missing(missing_images, len(ids))} `{self.split}` ids; expected {VOC_LAYOUT}"
            )
        if missing_masks:
            where = " or ".join(f"`{self.root / f}`" for f in mask_folders)
            raise DatasetLayoutError(
                f"{where} lacks the masks of {_format_missing(missing_masks, len(ids))} `{self.split}` ids; "
                f"expected {VOC_LAYOUT}"
            )
        return images, masks


class ADE20KSegmentation(_SegmentationFiles):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes, raw label 0 ("other") ignored.

    Layout (``root`` may be ``ADEChallengeData2016/`` or its parent)::

        ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
        ADEChallengeData2016/annotations/{training,validation}/ADE_*.png

    Labels are shifted as in MMSegmentation's ``reduce_zero_label``: y = 255 if raw = 0, else raw - 1, so
    classes are 0..149 and the mIoU is the standard 150-class one.

    Args:
        root: see above.
        split: "training" or "validation" ("train" and "val" are accepted aliases).
        transforms: joint callable ``transforms(image, mask)``.
        skip_bad_files: replace unreadable pairs by the next readable one instead of raising.
    """

    SPLIT_ALIASES = {
        "training": "training",
        "validation": "validation",
        "train": "training",
        "val": "validation",
    }

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        transforms: Callable[[Image.Image, Image.Image], Any] | None = None,
        skip_bad_files: bool = False,
    ) -> None:
        if split not in self.SPLIT_ALIASES:
            raise ValueError(f"split={split!r}: ADE20K splits are 'training' and 'validation'")
        super().__init__(self._resolve_root(Path(root)), transforms, skip_bad_files)
        self.num_classes = len(ADE20K_CLASS_NAMES)
        self.class_names = list(ADE20K_CLASS_NAMES)
        self.split = self.SPLIT_ALIASES[split]
        image_folder = self.root / "images" / self.split
        mask_folder = self.root / "annotations" / self.split
        _require_dir(image_folder, ADE20K_LAYOUT)
        _require_dir(mask_folder, ADE20K_LAYOUT)
        self.images = list_images(image_folder)
        if not self.images:
            raise DatasetLayoutError(f"`{image_folder}` holds no image; expected {ADE20K_LAYOUT}")
        mask_names = set(os.listdir(mask_folder))
        missing = [p.stem for p in self.images if f"{p.stem}.png" not in mask_names]
        if missing:
            raise DatasetLayoutError(
                f"`{mask_folder}` lacks the annotations of {_format_missing(missing, len(self.images))} "
                f"images; expected {ADE20K_LAYOUT}"
            )
        self.masks = [mask_folder / f"{p.stem}.png" for p in self.images]
        logger.info("%s: %d %s images", self.root, len(self.images), self.split)

    @staticmethod
    def _resolve_root(root: Path) -> Path:
        candidates = [root, root / "ADEChallengeData2016"]
        for candidate in candidates:
            if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
                return candidate
        tried = ", ".join(f"`{c}`" for c in candidates)
        raise DatasetLayoutError(
            f"`{root}` is not an ADE20K root: none of {tried} holds images/ and annotations/; "
            f"expected {ADE20K_LAYOUT}"
        )

    def _convert_mask(self, mask: np.ndarray) -> np.ndarray:
        """raw 0 -> 255 (ignore), raw k >= 1 -> k - 1."""
        return np.where(mask == 0, IGNORE_INDEX, mask.astype(np.int16) - 1).astype(np.uint8)


PRETRAIN_DATASET_TYPES: tuple[str, ...] = ("synthetic", "imagenet1k", "imagefolder", "coco")
CLASSIFICATION_DATASETS: tuple[str, ...] = ("synthetic", "imagenet1k", "imagefolder")
SEGMENTATION_DATASETS: tuple[str, ...] = ("voc", "ade20k", "synthetic")


def _require_data_path(data_path: str | Path | None, name: str) -> Path:
    if data_path is None or str(data_path) == "":
        raise DatasetLayoutError(f"dataset `{name}` needs --data_path pointing at its root folder")
    return Path(data_path)


def _imagenet_folder(
    data_path: Path, split: str, transform: Callable[[Image.Image], Any] | None, skip_bad_files: bool
) -> ImageFolderDataset:
    dataset = ImageFolderDataset(data_path, split, transform, skip_bad_files)
    if len(dataset.classes) != 1000:
        logger.warning("`%s` has %d classes, not ImageNet-1k's 1000", dataset.root, len(dataset.classes))
    return dataset


def _coco_folder(data_path: Path) -> Path:
    """COCO root -> its train2017 folder when present (``train2017/`` or ``images/train2017/``)."""
    for candidate in (data_path / "train2017", data_path / "images" / "train2017"):
        if candidate.is_dir():
            logger.info("COCO: reading `%s`", candidate)
            return candidate
    return data_path


def build_pretrain_dataset(
    dataset_type: str,
    data_path: str | Path | None,
    transform: Callable[[Image.Image], Any] | None,
    synthetic_kwargs: dict[str, Any] | None = None,
    skip_bad_files: bool = False,
) -> Dataset:
    """The pretraining dataset for ``--dataset_type``; items are ``(transform(image), label)``.

    Args:
        dataset_type: "synthetic" (built-in scenes, train split; ``data_path`` unused), "imagenet1k" and
            "imagefolder" (``<data_path>/train`` or ``ILSVRC2012_img_train``, or a root of class folders),
            "coco" (every image below ``<data_path>/train2017``, ``<data_path>/images/train2017``, or
            ``<data_path>`` itself).
        data_path: dataset root.
        transform: image transform (e.g. TwoViewTransform).
        synthetic_kwargs: extra arguments of :class:`data.synthetic.SyntheticScenes` (image_size, seed, ...).
        skip_bad_files: skip unreadable files instead of raising (not used by "synthetic").
    """
    if dataset_type == "synthetic":
        return SyntheticScenes(split="train", transform=transform, **(synthetic_kwargs or {}))
    if dataset_type == "imagenet1k":
        return _imagenet_folder(
            _require_data_path(data_path, dataset_type), "train", transform, skip_bad_files
        )
    if dataset_type == "imagefolder":
        return ImageFolderDataset(
            _require_data_path(data_path, dataset_type), "train", transform, skip_bad_files
        )
    if dataset_type == "coco":
        folder = _coco_folder(_require_data_path(data_path, dataset_type))
        return UnlabelledImageFolder(folder, transform, skip_bad_files)
    raise ValueError(f"--dataset_type {dataset_type!r}: expected one of {PRETRAIN_DATASET_TYPES}")


def build_classification_dataset(
    name: str,
    data_path: str | Path | None,
    split: str,
    transform: Callable[[Image.Image], Any] | None,
    synthetic_kwargs: dict[str, Any] | None = None,
    skip_bad_files: bool = False,
) -> Dataset:
    """A labelled ``(transform(image), label)`` dataset for k-NN and linear probing.

    Args:
        name: "synthetic", "imagenet1k" or "imagefolder".
        data_path: dataset root (unused for "synthetic").
        split: "train" or "val".
        transform: image transform.
        synthetic_kwargs: extra arguments of :class:`data.synthetic.SyntheticScenes`.
        skip_bad_files: skip unreadable files instead of raising.
    """
    if name == "synthetic":
        return SyntheticScenes(split=split, transform=transform, **(synthetic_kwargs or {}))
    if name == "imagenet1k":
        return _imagenet_folder(_require_data_path(data_path, name), split, transform, skip_bad_files)
    if name == "imagefolder":
        return ImageFolderDataset(_require_data_path(data_path, name), split, transform, skip_bad_files)
    raise ValueError(f"classification dataset {name!r}: expected one of {CLASSIFICATION_DATASETS}")


def build_segmentation_dataset(
    name: str,
    data_path: str | Path | None,
    split: str,
    transforms: Callable[[Image.Image, Image.Image], Any] | None,
    synthetic_kwargs: dict[str, Any] | None = None,
    skip_bad_files: bool = False,
) -> Dataset:
    """A ``transforms(image, mask)`` dataset with ``num_classes``, ``ignore_index`` and ``class_names``.

    Args:
        name: "voc" (splits train / trainaug / val), "ade20k" (training / validation, or train / val) or
            "synthetic" (train / val; "trainaug" is read as "train" so VOC-style settings work unchanged).
        data_path: dataset root (unused for "synthetic").
        split: split name, see above.
        transforms: joint image/mask transform.
        synthetic_kwargs: extra arguments of :class:`data.synthetic.SyntheticSegmentation`.
        skip_bad_files: skip unreadable files instead of raising.
    """
    if name == "synthetic":
        return SyntheticSegmentation(
            split="train" if split == "trainaug" else split, transforms=transforms, **(synthetic_kwargs or {})
        )
    if name == "voc":
        return VOCSegmentation(_require_data_path(data_path, name), split, transforms, skip_bad_files)
    if name == "ade20k":
        return ADE20KSegmentation(_require_data_path(data_path, name), split, transforms, skip_bad_files)
    raise ValueError(f"segmentation dataset {name!r}: expected one of {SEGMENTATION_DATASETS}")
