"""Synthetic multi-object scenes: the built-in dataset, so training and every test run without a download.

Each image is a small scene of textured objects on a smooth background, rendered on the fly from
``(seed, split, index)`` with vectorised numpy (no files). The scenes are built to answer one question: did
self-supervision learn object-level features? So a pixel's class is a property that survives the
pretraining augmentations and that a patch and its neighbourhood can see, and every factor that dominates
raw pixels and random features is a nuisance the augmentations and the cross-view / cross-image
objectives teach the network to ignore. The level (``--synthetic_level``, :data:`SCENE_LEVELS`) sets them:

``easy`` (the default):

* **class = texture family** (:data:`TEXTURE_FAMILIES`: checkered, dotted, grid, striped), a two-colour
  pattern whose period (6.4-8.3 px at 128 px) fits about twice across a 16 px patch, so one patch shows its
  class whatever the pattern's phase (with one period per patch, random features told the classes apart
  by phase and coarse layout almost as well as trained ones); the four families differ in structure (2-D
  checks, discs on a lattice, crossing lines, 1-D stripes), not in the colours they use nor in how much of
  each: every family paints half of each period cell with each colour, so an object's mean colour says
  nothing of its class. (Bent stripes and random speckle were tried as further classes; even with labels
  the network confused them with stripes and checks in the default budget, so they are not classes.)
* **colour is an instance nuisance**: every object gets two random colours, the pattern colour brighter
  than the base by at least 60 luma (so a pattern is the same light-on-dark figure whatever its hues),
  and the per-class mean colour is mid-grey for every class. Random features are dominated by colour; the
  colour jitter and the re-coloured second views of pretraining (:func:`recolour_scene`,
  ``--synthetic_recolour_views``) teach the network to drop it;
* **the details of a pattern are instance nuisances**: its period (within the band above), phase and
  orientation. A sampled pattern turns with its outline; the second view of pretraining
  (``--synthetic_retexture_views``) redraws all three, so only the family is left for the two views of an
  object to share;
* **the outline is a nuisance**: six shapes, drawn independently of the class, so shape says nothing;
* **size, rotation, position and occlusion are nuisances**: objects have diameters of 48-72 % of the side
  (3-4 patches at 96 px input, large enough for clusters to follow them), a random rotation (pattern and
  outline turn together), random positions and partial occlusion (1-3 objects, later ones on top); the
  random resized crops and the cross-view object matching teach invariance to them;
* **background**: a smooth gradient or low-frequency clouds of random colour and low contrast. Its colour
  explains about 80 % of the variance of the [CLS] token of a random network; when the two views shared
  it, the trained [CLS] and object tokens matched views by it and stayed colour-bound, so the CPU preset
  redraws it in the second view as well (``--synthetic_recolour_background``; benchmarks/README.md).

``hard`` keeps the classes and strengthens the nuisances: smaller and more objects (up to four, 25-60 % of
the side), a wider band of texture periods, a lower contrast between an object's colours, and a dotted
background clutter that resembles the dotted class. ``legacy`` renders the scenes of earlier releases
exactly (same random streams, same pixels): 12 classes = 6 shapes x 2 textures, so the class needs the
outline and the texture together (see benchmarks/README.md for why that benchmark could not fail).

Masks are exact: objects are drawn as hard (non anti-aliased) masks and the image takes, at every pixel,
the colour of the object that the mask names, so ``mask`` is the per-pixel ground truth (0 = background,
``c + 1`` for object class ``c``; no pixel is ambiguous, so :data:`IGNORE_INDEX` never occurs). The
image-level label used for classification (k-NN, linear probe) is the object class covering the most
pixels, 0-based among object classes. ``object_colours="fixed"`` paints every object with one dark/light
pair instead (colour then cannot tell two objects apart either).

Export to disk (Pascal VOC layout and ImageFolder layout)::

    python -m data.synthetic --out data/synthetic_export --level easy --num_train 5000 --num_val 500
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.palette import voc_palette
from data.scene_render import (  # noqa: F401  (re-exported: the synthetic dataset's public names)
    BACKGROUND_LEVELS,
    DOT_AREA_SHARE,
    GRID_LINE_SHARE,
    label_from_mask,
    render_scene,
)
from data.scene_spec import (  # noqa: F401
    BACKGROUNDS,
    DEFAULT_LEVEL,
    FIXED_OBJECT_COLOURS,
    IGNORE_INDEX,
    MAX_BACKGROUND_OFFSET,
    MAX_OBJECTS,
    MIN_IMAGE_SIZE,
    MIN_OBJECT_CONTRAST,
    NUM_OBJECT_CLASSES,
    NUM_SEG_CLASSES,
    OBJECT_CLASSES,
    OBJECT_COLOUR_MODES,
    RADIUS_RANGE,
    SCENE_LEVELS,
    SEG_CLASS_NAMES,
    SHAPES,
    SPLITS,
    TEXTURE_FAMILIES,
    TEXTURE_PERIOD_RANGE,
    TEXTURES,
    Scene,
    SceneLevel,
    SceneObject,
    check_object_colours,
    recolour_scene,
    sample_scene,
    scene_level,
    scene_rng,
)

logger = logging.getLogger(__name__)

#: Named settings of how the two pretraining views of a scene are rendered (``--synthetic_views``), as values
#: of the three rendering flags (``--synthetic_recolour_views``, ``--synthetic_recolour_background``,
#: ``--synthetic_retexture_views``):
#:
#: * ``realistic``: both views are cut from one rendering, as crops of one photograph are; they differ only by
#:   the crop and the photometric jitter. An object looks alike in its two views, while the appearance of a
#:   class still varies across instances and images (colours, texture period, phase and orientation);
#: * ``redrawn``: the second view is rendered anew with new colours for every object and for the background
#:   and new texture periods, phases and orientations; only each object's texture family, outline and place
#:   are shared. No photograph offers such pairs.
SYNTHETIC_VIEWS: dict[str, dict[str, bool]] = {
    "realistic": {"recolour_views": False, "recolour_background": False, "retexture": False},
    "redrawn": {"recolour_views": True, "recolour_background": True, "retexture": True},
}
VIEW_FLAGS: dict[str, str] = {
    "recolour_views": "synthetic_recolour_views",
    "recolour_background": "synthetic_recolour_background",
    "retexture": "synthetic_retexture_views",
}


def synthetic_view_flags(settings: argparse.Namespace) -> dict[str, bool]:
    """The three rendering flags of a run's arguments, keyed as in :data:`SYNTHETIC_VIEWS`."""
    return {key: bool(getattr(settings, flag)) for key, flag in VIEW_FLAGS.items()}


def synthetic_views_name(flags: dict[str, bool]) -> str:
    """The :data:`SYNTHETIC_VIEWS` name of a combination of the rendering flags, else ``"custom"``."""
    return next((name for name, values in SYNTHETIC_VIEWS.items() if values == flags), "custom")


def apply_synthetic_views(settings: argparse.Namespace, name: str) -> None:
    """Set the three rendering flags of ``settings`` to the :data:`SYNTHETIC_VIEWS` entry ``name``."""
    if name not in SYNTHETIC_VIEWS:
        raise ValueError(f"--synthetic_views {name}: expected one of {', '.join(SYNTHETIC_VIEWS)}")
    for key, value in SYNTHETIC_VIEWS[name].items():
        setattr(settings, VIEW_FLAGS[key], value)


class _SyntheticSplit(Dataset):
    """Shared indexing, seeding and rendering of the two synthetic dataset views."""

    def __init__(
        self,
        split: str,
        image_size: int,
        num_train: int,
        num_val: int,
        seed: int,
        object_colours: str,
        level: str = DEFAULT_LEVEL,
    ) -> None:
        check_object_colours(object_colours)
        self.level = scene_level(level)
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: the synthetic dataset has splits {SPLITS}")
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size={image_size}: must be at least {MIN_IMAGE_SIZE} pixels")
        if num_train < 1 or num_val < 1:
            raise ValueError(f"num_train={num_train}, num_val={num_val}: both must be positive")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be non-negative")
        self.split = split
        self.image_size = image_size
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.object_colours = object_colours
        self.length = num_train if split == "train" else num_val

    def __len__(self) -> int:
        return self.length

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for the {self.length}-image {self.split} split")
        return int(index)

    def scene(self, index: int) -> Scene:
        """The scene description of image ``index`` (deterministic in (seed, split, index))."""
        index = self._check_index(index)
        rng = scene_rng(self.seed, self.split, index)
        return sample_scene(rng, self.image_size, self.object_colours, self.level.name)

    def render_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(S, S, 3) uint8 image and (S, S) uint8 mask of image ``index``."""
        image, mask, _ = render_scene(self.scene(index))
        assert image is not None
        return image, mask

    def render(self, index: int) -> tuple[Image.Image, Image.Image]:
        """PIL RGB image and PIL "L" mask (0 = background, c + 1 = object class c) of image ``index``."""
        image, mask = self.render_arrays(index)
        return Image.fromarray(image), Image.fromarray(mask)

    def label(self, index: int) -> int:
        """Image-level label of image ``index`` (largest visible object class), without rendering colours."""
        _, mask, _ = render_scene(self.scene(index), with_image=False)
        return label_from_mask(mask)

    @cached_property
    def targets(self) -> list[int]:
        """All image-level labels (mask-only rendering, computed once on first access)."""
        return [self.label(index) for index in range(self.length)]


class SyntheticScenes(_SyntheticSplit):
    """Classification view of the synthetic scenes: ``(image, label)``.

    With ``colourings = m > 1`` the image is a list of m renderings of the same scene: the first is the
    scene as stored, the others come from :func:`recolour_scene` (new object colours, and new background
    colours with ``recolour_background``; new texture periods, phases and orientations with ``retexture``;
    same masks).
    :class:`data.augmentations.TwoViewTransform` cuts view v from rendering v mod m, so the two views of an
    object cannot be matched by their colours. The extra colours are drawn from a seed taken
    from torch's global RNG, which :class:`data.loading.PerSampleSeededDataset` seeds per sample and epoch.

    Args:
        split: "train" or "val" (different seed streams, so the splits share no image).
        image_size: side S of the square images.
        num_train: number of training images.
        num_val: number of validation images.
        seed: dataset seed; (seed, split, index) fixes the image.
        object_colours: one of :data:`OBJECT_COLOUR_MODES` (``"random"`` or ``"fixed"``).
        level: one of :data:`SCENE_LEVELS` (what decides the class, and how strong the nuisances are).
        transform: applied to the PIL RGB image (e.g. the two-view pretraining transform), or to the list
            of renderings when ``colourings > 1``.
        colourings: number of differently coloured renderings per item (1: a single PIL image).
        recolour_background: the extra renderings also redraw the background's colours
            (:func:`recolour_scene` with ``background=True``).
        retexture: the extra renderings also redraw each object's texture period, phase and orientation,
            keeping its family (:func:`recolour_scene` with ``retexture=True``).
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 128,
        num_train: int = 5000,
        num_val: int = 500,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        object_colours: str = "random",
        colourings: int = 1,
        level: str = DEFAULT_LEVEL,
        recolour_background: bool = False,
        retexture: bool = False,
    ) -> None:
        super().__init__(split, image_size, num_train, num_val, seed, object_colours, level)
        if isinstance(colourings, bool) or not isinstance(colourings, int) or colourings < 1:
            raise ValueError(f"colourings={colourings!r}: expected an integer >= 1")
        self.colourings = colourings
        self.recolour_background = recolour_background
        self.retexture = retexture
        self.transform = transform
        self.classes: list[str] = list(self.level.classes)
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.num_classes = self.level.num_classes

    def __getitem__(self, index: int) -> tuple[Any, int]:
        scene = self.scene(index)  # sampled once: the stored rendering and the re-coloured ones share it
        image, mask, _ = render_scene(scene)
        assert image is not None
        label = label_from_mask(mask)
        picture: Image.Image | list[Image.Image] = Image.fromarray(image)
        if self.colourings > 1:
            picture = [picture, *self.recoloured_renderings(scene, self.colourings - 1)]
        return (self.transform(picture) if self.transform is not None else picture), label

    def recoloured_renderings(self, scene: Scene, count: int) -> list[Image.Image]:
        """``count`` renderings of ``scene`` with colours redrawn by :func:`recolour_scene`."""
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        renderings = []
        for _ in range(count):
            recoloured = recolour_scene(
                scene, rng, self.object_colours, background=self.recolour_background, retexture=self.retexture
            )
            image, _, _ = render_scene(recoloured)
            assert image is not None
            renderings.append(Image.fromarray(image))
        return renderings


class SyntheticSegmentation(_SyntheticSplit):
    """Segmentation view of the synthetic scenes: ``(image, mask)``, 0 = background, ``c + 1`` = class c.

    Args:
        split, image_size, num_train, num_val, seed, object_colours, level: as for :class:`SyntheticScenes`
            (same images).
        transforms: joint callable ``transforms(image, mask)`` on the PIL image and PIL "L" mask.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 128,
        num_train: int = 5000,
        num_val: int = 500,
        seed: int = 0,
        transforms: Callable[[Image.Image, Image.Image], Any] | None = None,
        object_colours: str = "random",
        level: str = DEFAULT_LEVEL,
    ) -> None:
        super().__init__(split, image_size, num_train, num_val, seed, object_colours, level)
        self.transforms = transforms
        self.num_classes = self.level.num_classes + 1
        self.ignore_index = IGNORE_INDEX
        self.class_names: list[str] = list(self.level.seg_class_names)

    def __getitem__(self, index: int) -> Any:
        image, mask = self.render(index)
        if self.transforms is not None:
            return self.transforms(image, mask)
        return image, mask


def sample_id(split: str, index: int) -> str:
    """File stem of an exported image, e.g. ``train_000042``."""
    return f"{split}_{index:06d}"


def _export_one(
    out_dir: Path,
    split: str,
    index: int,
    image_size: int,
    num_train: int,
    num_val: int,
    seed: int,
    object_colours: str,
    level: str,
) -> None:
    """Render one image and write it in both layouts (a top-level function so worker processes can run it)."""
    dataset = _SyntheticSplit(split, image_size, num_train, num_val, seed, object_colours, level)
    image, mask = dataset.render_arrays(index)
    stem = sample_id(split, index)
    voc = out_dir / "VOC2012"
    picture = Image.fromarray(image)
    # 4:4:4 chroma: the default 4:2:0 subsampling smears the sharp colour edges of the textures.
    picture.save(voc / "JPEGImages" / f"{stem}.jpg", quality=95, subsampling=0)
    indexed = Image.frombytes("P", (image_size, image_size), mask.tobytes())
    indexed.putpalette(voc_palette().ravel().tolist())
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        indexed.save(voc / folder / f"{stem}.png")
    class_name = dataset.level.classes[label_from_mask(mask)]
    picture.save(out_dir / "imagefolder" / split / class_name / f"{stem}.png")


def _export_chunk(job: tuple[Path, str, list[int], int, int, int, int, str, str]) -> int:
    out_dir, split, indices, image_size, num_train, num_val, seed, object_colours, level = job
    for index in indices:
        _export_one(out_dir, split, index, image_size, num_train, num_val, seed, object_colours, level)
    return len(indices)


def export_dataset(
    out_dir: str | Path,
    image_size: int = 128,
    num_train: int = 5000,
    num_val: int = 500,
    seed: int = 0,
    num_workers: int = 0,
    chunk_size: int = 64,
    object_colours: str = "random",
    level: str = DEFAULT_LEVEL,
) -> Path:
    """Write the synthetic scenes to disk in the Pascal VOC and ImageFolder layouts.

    Layout (ids are ``train_000000`` ... and ``val_000000`` ...)::

        out_dir/VOC2012/JPEGImages/<id>.jpg                      JPEG quality 95, 4:4:4 chroma
        out_dir/VOC2012/SegmentationClass/<id>.png               palette ("P") PNG, VOC palette
        out_dir/VOC2012/SegmentationClassAug/<id>.png            same masks
        out_dir/VOC2012/ImageSets/Segmentation/{train,trainaug,val}.txt   (trainaug = train)
        out_dir/imagefolder/{train,val}/<class_name>/<id>.png     lossless; every class folder exists

    Args:
        out_dir: output folder (created).
        image_size, num_train, num_val, seed, object_colours, level: as for :class:`SyntheticScenes`.
        num_workers: worker processes (0 renders in this process); the files do not depend on it.
        chunk_size: images per work item.
    Returns:
        The output folder.
    """
    out_dir = Path(out_dir)
    classes = _SyntheticSplit(
        "train", image_size, num_train, num_val, seed, object_colours, level
    ).level.classes
    voc = out_dir / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for name in classes:
            (out_dir / "imagefolder" / split / name).mkdir(parents=True, exist_ok=True)

    sizes = {"train": num_train, "val": num_val}
    lists = {split: [sample_id(split, i) for i in range(size)] for split, size in sizes.items()}
    lists["trainaug"] = lists["train"]
    for name, ids in lists.items():
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))

    jobs = [
        (
            out_dir,
            split,
            list(range(start, min(start + chunk_size, size))),
            image_size,
            num_train,
            num_val,
            seed,
            object_colours,
            level,
        )
        for split, size in sizes.items()
        for start in range(0, size, chunk_size)
    ]
    total, done, next_report, started = num_train + num_val, 0, 0.1, time.perf_counter()
    logger.info(
        "exporting %d train + %d val synthetic %s-level images (%d px) to %s with %d workers",
        num_train,
        num_val,
        level,
        image_size,
        out_dir,
        num_workers,
    )
    with ExitStack() as stack:
        if num_workers > 0:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=num_workers))
            counts: Iterator[int] = pool.map(_export_chunk, jobs)
        else:
            counts = map(_export_chunk, jobs)
        for count in counts:
            done += count
            if done / total >= next_report or done == total:
                logger.info("exported %d/%d images (%.0f s)", done, total, time.perf_counter() - started)
                next_report = math.floor(done / total * 10 + 1) / 10
    return out_dir


def add_scene_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "--synthetic_"
) -> None:
    """The flags choosing the scene level and colour mode (``--synthetic_level`` and
    ``--synthetic_object_colours`` for training and every evaluation; ``--level``, ``--object_colours``
    for the export)."""
    parser.add_argument(
        f"{prefix}level",
        default=DEFAULT_LEVEL,
        choices=tuple(SCENE_LEVELS),
        help="Synthetic scenes: easy (class = one of four texture families, large objects, the default), "
        "hard (same classes, smaller objects, wider texture periods, lower contrast, dotted clutter) or "
        "legacy (the earlier 12 shape x texture classes, to re-run earlier numbers).",
    )
    parser.add_argument(
        f"{prefix}object_colours",
        default="random",
        choices=OBJECT_COLOUR_MODES,
        help="Synthetic scenes: two random colours per object (random), or one dark/light pair for every "
        "object (fixed: colour then cannot tell two objects apart either).",
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Export the synthetic scenes in the Pascal VOC and ImageFolder layouts", add_help=True
    )
    parser.add_argument(
        "--out",
        type=str,
        required=True,
        help="Output folder; VOC2012/ and imagefolder/ are written inside it.",
    )
    parser.add_argument("--image_size", type=int, default=128, help="Side of the square images in pixels.")
    parser.add_argument("--num_train", type=int, default=5000, help="Number of training images.")
    parser.add_argument("--num_val", type=int, default=500, help="Number of validation images.")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Dataset seed; keep the default to reproduce the built-in dataset.",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=0,
        help="Worker processes for rendering and writing (0 = this process only).",
    )
    add_scene_args(parser, "--")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point: ``python -m data.synthetic --out DIR``."""
    args = get_args_parser().parse_args(argv)
    if args.num_workers < 0:
        raise ValueError(f"--num_workers {args.num_workers}: must be 0 or more")
    return export_dataset(
        args.out,
        image_size=args.image_size,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        num_workers=args.num_workers,
        object_colours=args.object_colours,
        level=args.level,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
