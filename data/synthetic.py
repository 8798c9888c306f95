"""Synthetic multi-object scenes: the built-in dataset, so training and every test run without a download.

Each image is a small scene of textured objects on a smooth background, rendered on the fly from
``(seed, split, index)`` with vectorised numpy (no files). The scenes are built to answer one question: did
self-supervision learn object-level features? So a pixel's class is a property that survives the
pretraining augmentations and that a patch and its neighbourhood can see, and every factor that dominates
raw pixels and random features is a nuisance the augmentations and the cross-view / cross-image
objectives teach the network to ignore. The level (``--synthetic_level``, :data:`SCENE_LEVELS`) sets them:

``easy`` (the default):

* **class = texture family** (:data:`TEXTURE_FAMILIES`: checkered, dotted, grid, striped), a two-colour
  pattern whose period (12-15 px at 128 px) fits about once in a 16 px patch, so one patch shows its class
  and a cluster of patches shows it clearly; the four families differ in structure (2-D checks, discs on a
  lattice, crossing lines, 1-D stripes), not in the colours they use nor in how much of each: every
  family paints half of each period cell with each colour, so an object's mean colour says nothing of its
  class. (Bent stripes and random speckle were tried as further classes; even with labels the network
  confused them with stripes and checks in the default budget, so they are not classes.)
* **colour is an instance nuisance**: every object gets two random colours, the pattern colour brighter
  than the base by at least 60 luma (so a pattern is the same light-on-dark figure whatever its hues),
  and the per-class mean colour is mid-grey for every class. Random features are dominated by colour; the
  colour jitter and the re-coloured second views of pretraining (:func:`recolour_scene`,
  ``--synthetic_recolour_views``) teach the network to drop it;
* **the outline is a nuisance**: six shapes, drawn independently of the class, so shape says nothing;
* **size, rotation, position and occlusion are nuisances**: objects have diameters of 40-64 % of the side
  (3-5 patches at 96 px input, large enough for clusters to follow them), a random rotation (pattern and
  outline turn together), random positions and partial occlusion (1-3 objects, later ones on top); the
  random resized crops and the cross-view object matching teach invariance to them;
* **background**: a smooth gradient or low-frequency clouds of random colour and low contrast.

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
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.palette import voc_palette

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("cross", "disc", "ring", "square", "star", "triangle")
TEXTURES: tuple[str, ...] = ("checkered", "striped")
# Texture-major, shape-minor; both tuples are sorted, so this list is sorted too and the class index equals
# the index of the name in sorted order (which is how an ImageFolder of the export numbers its classes).
OBJECT_CLASSES: tuple[str, ...] = tuple(f"{texture}_{shape}" for texture in TEXTURES for shape in SHAPES)
NUM_OBJECT_CLASSES: int = len(OBJECT_CLASSES)
NUM_SEG_CLASSES: int = NUM_OBJECT_CLASSES + 1
SEG_CLASS_NAMES: tuple[str, ...] = ("background", *OBJECT_CLASSES)
IGNORE_INDEX: int = 255
BACKGROUNDS: tuple[str, ...] = ("gradient", "clouds", "dots")
SPLITS: tuple[str, ...] = ("train", "val")

# Distinct seed streams per split: the split code is part of the hashed entropy.
_SPLIT_CODES: dict[str, int] = {"train": 1, "val": 2}
_SEED_DOMAIN: int = 0x5C3E  # keeps these streams apart from any other use of SeedSequence([seed, ...])

# How objects are coloured: "random" draws two random colours per object (colour is then an instance cue
# that self-supervised matching can use instead of shape and texture); "fixed" paints every object with the
# same dark/light pair, so only shape, texture, size and pose tell objects apart.
OBJECT_COLOUR_MODES: tuple[str, ...] = ("random", "fixed")
FIXED_OBJECT_COLOURS: tuple[tuple[int, int, int], tuple[int, int, int]] = ((20, 20, 20), (235, 235, 235))
MAX_OBJECTS: int = 4
MIN_IMAGE_SIZE: int = 16
# Object "radius" r as a fraction of the image side: diameters of 25-60% of the side.
RADIUS_RANGE: tuple[float, float] = (0.125, 0.30)
# Texture period (one light + one dark stripe / two checker cells) as a fraction of the image side.
TEXTURE_PERIOD_RANGE: tuple[float, float] = (0.07, 0.11)
# Minimum RGB distance between an object's two colours, and maximum per-channel background offset:
# objects (>= 140) always have a higher contrast than backgrounds (<= 45 * sqrt(3) = 78).
MIN_OBJECT_CONTRAST: float = 140.0
MAX_BACKGROUND_OFFSET: int = 45
# Largest distance from the centre, in units of r, that any shape reaches (the triangle's vertices).
_SHAPE_EXTENT: float = 1.3


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, in pixel units of the rendered image.

    Attributes:
        class_id: 0-based object class, ``texture_index * len(SHAPES) + shape_index``.
        centre: (x, y) of the shape centre; pixel ``(row i, column j)`` has centre ``(j + 0.5, i + 0.5)``.
        radius: size r; every shape has an area of about 2.2 r^2 and fits in a circle of 1.3 r.
        angle: rotation in radians (shape and texture rotate together).
        colours: the two RGB colours the texture alternates between.
        texture_period: length of one texture period in pixels (two stripes / two checker cells).
        texture_phase: offsets in pixels of the texture along the object's two axes.
        shape_name, texture_name: the shape and texture when the class does not fix them (the texture
            levels, where the class is the texture and the shape is a nuisance); empty for ``legacy``
            objects, whose shape and texture follow from ``class_id``.
    """

    class_id: int
    centre: tuple[float, float]
    radius: float
    angle: float
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    texture_period: float
    texture_phase: tuple[float, float]
    shape_name: str = ""
    texture_name: str = ""

    @property
    def shape(self) -> str:
        return self.shape_name or SHAPES[self.class_id % len(SHAPES)]

    @property
    def texture(self) -> str:
        return self.texture_name or TEXTURES[self.class_id // len(SHAPES)]


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image; objects are listed in drawing order (later on top).

    Attributes:
        image_size: side S of the square image.
        background: one of :data:`BACKGROUNDS`.
        background_colours: base colour and a low-contrast second colour.
        background_angle: direction of the gradient (radians).
        background_period: dot spacing in pixels (``dots`` only).
        background_phase: dot lattice offset in pixels (``dots`` only).
        objects: 1-4 objects, drawn in order.
        noise_seed: seed of the stream that draws the clouds field and the pixel noise.
        level: name of the :data:`SCENE_LEVELS` entry that drew the scene.
    """

    image_size: int
    background: str
    background_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    background_angle: float
    background_period: float
    background_phase: tuple[float, float]
    objects: tuple[SceneObject, ...]
    noise_seed: int
    level: str = "legacy"


@dataclass(frozen=True)
class SceneLevel:
    """One difficulty setting of the scene generator: what decides a pixel's class, and the nuisances.

    Attributes:
        name: the key in :data:`SCENE_LEVELS` (``--synthetic_level``).
        classes: object class names in class-id order, sorted (an ImageFolder export numbers its classes
            in sorted order, so the ids agree).
        textures: the textures objects are drawn with; with ``class_is_texture`` the class *is* the
            texture (``classes == textures``) and the shape is a nuisance drawn from ``shapes``.
        shapes: the outlines objects are drawn with.
        class_is_texture: False for ``legacy``: the class is the (texture, shape) pair.
        max_objects: objects per scene are drawn uniformly from 1..max_objects (some may be dropped).
        radius_range: object radius r as a fraction of the image side.
        texture_period_range: texture period as a fraction of the image side.
        min_object_contrast: least RGB distance between an object's two colours.
        min_luma_step: least luma by which an object's pattern colour is brighter than its base colour (0:
            either may be the brighter).
        backgrounds: the background families drawn from.
        max_background_offset: largest per-channel offset between the two background colours.
    """

    name: str
    classes: tuple[str, ...]
    textures: tuple[str, ...]
    shapes: tuple[str, ...]
    class_is_texture: bool
    max_objects: int
    radius_range: tuple[float, float]
    texture_period_range: tuple[float, float]
    min_object_contrast: float
    min_luma_step: float
    backgrounds: tuple[str, ...]
    max_background_offset: int

    @property
    def num_classes(self) -> int:
        """Object classes (the segmentation masks have ``num_classes + 1`` labels, 0 = background)."""
        return len(self.classes)

    @property
    def seg_class_names(self) -> tuple[str, ...]:
        return ("background", *self.classes)


# The classes of the texture levels, sorted (the ImageFolder order). Each is a two-colour pattern whose
# period fits about once in a 16 px patch. "wavy" and "speckled" (see _texture_bits) are patterns the
# renderer knows but no level uses as a class.
TEXTURE_FAMILIES: tuple[str, ...] = ("checkered", "dotted", "grid", "striped")
# Pattern colour share of the dotted and grid families, one half like stripes and checks (pi r^2 = p^2 / 2;
# 1 - (1 - w)^2 = 1 / 2), so no family is brighter on average than another.
DOT_AREA_SHARE: float = 0.5
GRID_LINE_SHARE: float = 1.0 - 1.0 / math.sqrt(2.0)

SCENE_LEVELS: dict[str, SceneLevel] = {
    # The class is the texture family, read from any patch of the object; every nuisance is one that the
    # pretraining teaches the network to ignore (see the module docstring for each factor).
    "easy": SceneLevel(
        name="easy",
        classes=TEXTURE_FAMILIES,
        textures=TEXTURE_FAMILIES,
        shapes=SHAPES,
        class_is_texture=True,
        max_objects=3,
        radius_range=(0.20, 0.32),
        texture_period_range=(0.09, 0.12),
        min_object_contrast=140.0,
        min_luma_step=60.0,
        backgrounds=("gradient", "clouds"),
        max_background_offset=45,
    ),
    # The same classes with stronger nuisances: smaller and more objects (more occlusion, fewer patches per
    # object), a wider range of texture periods (frequency no longer sits in one band), a lower contrast
    # between an object's two colours, and a dotted background clutter that resembles the "dotted" class
    # at low contrast.
    "hard": SceneLevel(
        name="hard",
        classes=TEXTURE_FAMILIES,
        textures=TEXTURE_FAMILIES,
        shapes=SHAPES,
        class_is_texture=True,
        max_objects=4,
        radius_range=(0.125, 0.30),
        texture_period_range=(0.05, 0.11),
        min_object_contrast=100.0,
        min_luma_step=30.0,
        backgrounds=("gradient", "clouds", "dots"),
        max_background_offset=60,
    ),
    # The scenes of earlier releases, drawn exactly as before (same random stream, same pixels): 12 classes
    # = 6 shapes x 2 textures, so neither the outline nor the texture alone gives the class and both must be
    # read across several patches; objects of 25-60% of the side, up to four.
    "legacy": SceneLevel(
        name="legacy",
        classes=OBJECT_CLASSES,
        textures=TEXTURES,
        shapes=SHAPES,
        class_is_texture=False,
        max_objects=MAX_OBJECTS,
        radius_range=RADIUS_RANGE,
        texture_period_range=TEXTURE_PERIOD_RANGE,
        min_object_contrast=MIN_OBJECT_CONTRAST,
        min_luma_step=0.0,
        backgrounds=BACKGROUNDS,
        max_background_offset=MAX_BACKGROUND_OFFSET,
    ),
}
DEFAULT_LEVEL: str = "easy"


def scene_level(name: str) -> SceneLevel:
    """The :data:`SCENE_LEVELS` entry ``name``; ValueError naming the choices otherwise."""
    if name not in SCENE_LEVELS:
        raise ValueError(f"level={name!r}: expected one of {tuple(SCENE_LEVELS)}")
    return SCENE_LEVELS[name]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one scene, seeded from a hash of ``(seed, split, index)``.

    ``np.random.SeedSequence`` hashes its entropy words, so neighbouring indices, seeds and the two splits
    give unrelated streams; train and val never share a stream because the split code is hashed in.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and index={index} must be non-negative")
    entropy = [_SEED_DOMAIN, int(seed), _SPLIT_CODES[split], int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    return int(values[0]), int(values[1]), int(values[2])


# Rec. 601 luma weights: how bright a colour looks.
_LUMA: np.ndarray = np.array([0.299, 0.587, 0.114])


def _sample_object_colours(
    rng: np.random.Generator, min_contrast: float = MIN_OBJECT_CONTRAST, min_luma_step: float = 0.0
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two independent uniform RGB colours, redrawn until they differ by at least ``min_contrast``.

    With ``min_luma_step > 0`` the second colour (the pattern: dots, lines, stripes) must also be brighter
    than the first (the base) by that much luma, so a pattern is the same light-on-dark figure whatever its
    hue (the legacy level, ``min_luma_step = 0``, draws exactly as before).
    """
    while True:
        colours = rng.integers(0, 256, size=(2, 3))
        if np.linalg.norm(colours[0] - colours[1]) < min_contrast:
            continue
        if min_luma_step > 0 and float(_LUMA @ (colours[1] - colours[0])) < min_luma_step:
            continue
        return _rgb(colours[0]), _rgb(colours[1])


def _place_centre(
    rng: np.random.Generator, radius: float, placed: Sequence[SceneObject], image_size: int
) -> tuple[float, float] | None:
    """Draw a centre in the central 80% of the image that is not too close to an earlier object's centre.

    Objects may overlap (occlusion), but the centre of each must lie at least 0.9 * max(r_i, r_j) from the
    others, so no object is hidden entirely. Returns None when 30 draws fail (the object is dropped).
    """
    for _ in range(30):
        centre = rng.uniform(0.1 * image_size, 0.9 * image_size, size=2)
        if all(math.dist(centre, other.centre) >= 0.9 * max(radius, other.radius) for other in placed):
            return float(centre[0]), float(centre[1])
    return None


def check_object_colours(object_colours: str) -> None:
    """Raise ValueError unless ``object_colours`` is one of :data:`OBJECT_COLOUR_MODES`."""
    if object_colours not in OBJECT_COLOUR_MODES:
        raise ValueError(f"object_colours={object_colours!r}: expected one of {OBJECT_COLOUR_MODES}")


def sample_scene(
    rng: np.random.Generator, image_size: int, object_colours: str = "random", level: str = "legacy"
) -> Scene:
    """Draw a scene description (all random choices of one image, in a fixed order).

    ``object_colours`` is one of :data:`OBJECT_COLOUR_MODES`. The random colours are drawn in both modes,
    so a scene has the same layout, classes and background whichever mode renders it. ``level`` names the
    :data:`SCENE_LEVELS` entry; ``legacy`` draws exactly the scenes of earlier releases.
    """
    check_object_colours(object_colours)
    setting = scene_level(level)
    background = setting.backgrounds[int(rng.integers(len(setting.backgrounds)))]
    base = rng.integers(30, 226, size=3)
    offset = setting.max_background_offset
    second = np.clip(base + rng.integers(-offset, offset + 1, size=3), 0, 255)
    background_angle = float(rng.uniform(0.0, 2.0 * math.pi))
    background_period = float(rng.uniform(0.035, 0.06) * image_size)
    background_phase = (float(rng.uniform(0, background_period)), float(rng.uniform(0, background_period)))

    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(1, setting.max_objects + 1))):
        class_id = int(rng.integers(setting.num_classes))
        names: dict[str, str] = {}
        if setting.class_is_texture:
            names = {"texture_name": setting.textures[class_id]}
            names["shape_name"] = setting.shapes[int(rng.integers(len(setting.shapes)))]
        radius = float(rng.uniform(*setting.radius_range) * image_size)
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        colours = _sample_object_colours(rng, setting.min_object_contrast, setting.min_luma_step)
        if object_colours == "fixed":
            colours = FIXED_OBJECT_COLOURS
        period = float(rng.uniform(*setting.texture_period_range) * image_size)
        phase = (float(rng.uniform(0, period)), float(rng.uniform(0, period)))
        centre = _place_centre(rng, radius, objects, image_size)
        if centre is not None:
            objects.append(SceneObject(class_id, centre, radius, angle, colours, period, phase, **names))
    return Scene(
        image_size=image_size,
        background=background,
        background_colours=(_rgb(base), _rgb(second)),
        background_angle=background_angle,
        background_period=background_period,
        background_phase=background_phase,
        objects=tuple(objects),
        noise_seed=int(rng.integers(2**62)),
        level=level,
    )


def recolour_scene(scene: Scene, rng: np.random.Generator, object_colours: str = "random") -> Scene:
    """The same scene with a freshly drawn colour pair for every object (as :func:`sample_scene` draws them).

    Everything else is unchanged: layout, classes, sizes, poses, textures, the background (pattern and
    colours) and the pixel noise, so the masks are identical. ``"fixed"`` objects keep
    :data:`FIXED_OBJECT_COLOURS`, so recolouring a fixed-colour scene changes nothing. (Redrawing the
    background colours as well made the self-supervised features worse on the legacy scenes.)
    """
    check_object_colours(object_colours)
    if object_colours == "fixed":
        return scene
    setting = scene_level(scene.level)
    contrast, step = setting.min_object_contrast, setting.min_luma_step
    return replace(
        scene,
        objects=tuple(
            replace(item, colours=_sample_object_colours(rng, contrast, step)) for item in scene.objects
        ),
    )


# Implicit shape functions: True inside, on coordinates (u, v) in units of the object radius r.
# Parameters are chosen so every shape has an area of about 2.2 r^2 (no shape dominates the
# "largest object" image label because of its size).
def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))


def _disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 0.84**2


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    squared = u * u + v * v
    return (squared <= 1.0) & (squared >= 0.55**2)


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.74


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star: rho <= R (a + (1 - a) tri(5 theta / 2 pi)), tri = 1 at the points, 0 between."""
    rho = np.sqrt(u * u + v * v)
    fraction = np.mod(np.arctan2(v, u) * (5.0 / (2.0 * math.pi)), 1.0)
    tri = np.abs(2.0 * fraction - 1.0)
    return rho <= 1.128 * (0.45 + 0.55 * tri)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral triangle with circumradius 1.3 (inradius 0.65): three half-planes n_k . (u, v) <= 0.65."""
    inside = v >= -0.65
    for normal_angle in (math.pi / 6.0, 5.0 * math.pi / 6.0):
        inside &= u * math.cos(normal_angle) + v * math.sin(normal_angle) <= 0.65
    return inside


_SHAPE_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "cross": _cross,
    "disc": _disc,
    "ring": _ring,
    "square": _square,
    "star": _star,
    "triangle": _triangle,
}


def _speckle_bits(cell_a: np.ndarray, cell_b: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random bit per integer lattice cell (a multiply-xorshift hash of its coordinates)."""
    h = cell_a.astype(np.uint32) * np.uint32(0x9E3779B1) ^ cell_b.astype(np.uint32) * np.uint32(0x85EBCA77)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    return ((h >> np.uint32(7)) & np.uint32(1)).astype(np.int32)


def _texture_bits(
    texture: str, a: np.ndarray, b: np.ndarray, period: float, phase: tuple[float, float], reach: float
) -> np.ndarray:
    """Which of the two colours each pixel takes (uint8 0/1), from object-frame pixel coordinates (a, b).

    With h = period / 2, a' = a + phase_a and b' = b + phase_b:

    * striped: floor(a' / h) mod 2; checkered: (floor(a' / h) + floor(b' / h)) mod 2;
    * wavy: floor((a' + 0.25 period sin(2 pi b' / (2 period))) / h) mod 2 (stripes bent into a sine wave);
    * dotted: 1 inside discs of radius period / sqrt(2 pi) centred on the period lattice;
    * grid: 1 on lines of width (1 - 1 / sqrt(2)) period along both lattice axes;

    Disc radius and line width are chosen so that, like stripes and checks, every family paints exactly
    half of each period cell with each colour: the mean colour of an object is then the same for every
    family and cannot hint at the class (a pattern is told by its structure, not its brightness).
    * speckled: a pseudo-random bit per cell (floor(a' / h), floor(b' / h)) (:func:`_speckle_bits`).

    ``reach`` bounds |a| and |b|; a whole number of periods larger than it is added before the integer cast,
    so the cast (which truncates towards zero) equals floor and every pattern is unchanged by the shift.
    """
    half = period / 2.0
    offset = period * math.ceil(reach / period + 1.0)
    shifted_a = a + np.float32(phase[0] + offset)
    shifted_b = b + np.float32(phase[1] + offset)
    if texture in ("striped", "checkered"):
        along = (shifted_a * np.float32(1.0 / half)).astype(np.int32)
        if texture == "checkered":
            along += (shifted_b * np.float32(1.0 / half)).astype(np.int32)
    elif texture == "wavy":
        bend = np.float32(0.25 * period) * np.sin(shifted_b * np.float32(math.pi / period))
        along = ((shifted_a + bend) * np.float32(1.0 / half)).astype(np.int32)
    elif texture == "dotted":
        du = np.mod(shifted_a, np.float32(period)) - np.float32(half)
        dv = np.mod(shifted_b, np.float32(period)) - np.float32(half)
        along = (du * du + dv * dv <= np.float32(period**2 * DOT_AREA_SHARE / math.pi)).astype(np.int32)
    elif texture == "grid":
        width = np.float32(period * GRID_LINE_SHARE)
        along = (
            (np.mod(shifted_a, np.float32(period)) < width) | (np.mod(shifted_b, np.float32(period)) < width)
        ).astype(np.int32)
    elif texture == "speckled":
        shift = np.int32(2 * round(offset / period))  # the offset in cells, so the pattern ignores it
        cells_a = (shifted_a * np.float32(1.0 / half)).astype(np.int32) - shift
        cells_b = (shifted_b * np.float32(1.0 / half)).astype(np.int32) - shift
        along = _speckle_bits(cells_a, cells_b)
    else:
        raise ValueError(f"texture={texture!r}: unknown texture")
    return (along & 1).astype(np.uint8)


def _bilinear_field(grid: np.ndarray, image_size: int) -> np.ndarray:
    """Bilinear upsampling of a (g, g) grid to (S, S), grid nodes spread over the whole image."""
    g = grid.shape[0]
    positions = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * (g - 1)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, g - 1)
    weight = positions - low
    rows = grid[:, low] * (1.0 - weight) + grid[:, high] * weight  # (g, S)
    return rows[low, :] * (1.0 - weight[:, None]) + rows[high, :] * weight[:, None]  # (S, S)


BACKGROUND_LEVELS: int = 256


def _background_field(scene: Scene, coords: np.ndarray, noise: np.random.Generator) -> np.ndarray:
    """(S, S) texture field t in [0, 1] of the background, whose colour is c0 + t (c1 - c0)."""
    size = scene.image_size
    if scene.background == "gradient":
        cos, sin = math.cos(scene.background_angle), math.sin(scene.background_angle)
        centred = coords - size / 2.0
        field = (centred[None, :] * cos + centred[:, None] * sin) / size + 0.5
    elif scene.background == "clouds":
        cells = int(noise.integers(3, 7))
        field = _bilinear_field(noise.random((cells, cells), dtype=np.float32), size)
    else:
        period = scene.background_period
        dx = np.mod(coords + scene.background_phase[0], period) - period / 2.0
        dy = np.mod(coords + scene.background_phase[1], period) - period / 2.0
        field = (dx[None, :] ** 2 + dy[:, None] ** 2 <= (0.3 * period) ** 2).astype(np.float32)
    return np.clip(field, 0.0, 1.0)


def _colour_table(scene: Scene) -> np.ndarray:
    """(256 + 2 * n_objects, 3) uint8 colours: 256 background levels, then each object's two colours."""
    base = np.asarray(scene.background_colours[0], dtype=np.float64)
    second = np.asarray(scene.background_colours[1], dtype=np.float64)
    levels = np.arange(BACKGROUND_LEVELS, dtype=np.float64)[:, None] / (BACKGROUND_LEVELS - 1)
    rows = [base + levels * (second - base)]
    rows.extend(np.asarray(item.colours, dtype=np.float64) for item in scene.objects)
    return np.rint(np.concatenate(rows)).astype(np.uint8)


def render_scene(scene: Scene, with_image: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Render a scene with hard masks; objects are painted in order, so later ones occlude earlier ones.

    Each object is evaluated only inside its bounding box: pixel centres (x, y) are mapped to the object
    frame a = dx cos(phi) + dy sin(phi), b = -dx sin(phi) + dy cos(phi) (dx, dy relative to the centre),
    tested with the shape's implicit function at (a / r, b / r), and coloured by the texture at (a, b).

    Colours go through one table look-up: every pixel holds a row index into :func:`_colour_table`
    (background level round(255 t), or 256 + 2k + texture bit for object k), so the image is exactly the
    colour its mask names. Pixel noise n = (u & 7) + (u >> 5) - 7 from random bytes u (the sum of two
    independent uniforms on 0..7: integer, zero-mean, |n| <= 7, standard deviation 3.24) is added last.

    Args:
        scene: the description from :func:`sample_scene`.
        with_image: False skips the colours (background, textures, noise) and returns None for the image;
            the masks are identical either way.
    Returns:
        image (S, S, 3) uint8 or None; mask (S, S) uint8 with 0 = background and c + 1 for object class c;
        instances (S, S) uint8 with 0 = background and k + 1 for ``scene.objects[k]`` (the visible one).
    """
    size = scene.image_size
    coords = np.arange(size, dtype=np.float32) + 0.5
    mask = np.zeros((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.uint8)
    noise = np.random.default_rng(scene.noise_seed)
    if with_image:
        field = _background_field(scene, coords, noise)
        colour_index = (field * np.float32(BACKGROUND_LEVELS - 1) + np.float32(0.5)).astype(np.uint16)

    for k, item in enumerate(scene.objects):
        extent = item.radius * _SHAPE_EXTENT + 1.0
        x0, x1 = max(0, math.floor(item.centre[0] - extent)), min(size, math.ceil(item.centre[0] + extent))
        y0, y1 = max(0, math.floor(item.centre[1] - extent)), min(size, math.ceil(item.centre[1] + extent))
        if x0 >= x1 or y0 >= y1:
            continue
        dx = (coords[x0:x1] - item.centre[0])[None, :]
        dy = (coords[y0:y1] - item.centre[1])[:, None]
        cos, sin = math.cos(item.angle), math.sin(item.angle)
        a = dx * cos + dy * sin
        b = dy * cos - dx * sin
        inside = _SHAPE_FUNCTIONS[item.shape](a / item.radius, b / item.radius)
        np.copyto(mask[y0:y1, x0:x1], item.class_id + 1, where=inside)
        np.copyto(instances[y0:y1, x0:x1], k + 1, where=inside)
        if with_image:
            reach = math.sqrt(2.0) * extent + 1.0  # |a|, |b| <= half-diagonal of the bounding box
            bits = _texture_bits(item.texture, a, b, item.texture_period, item.texture_phase, reach)
            rows = bits.astype(np.uint16) + np.uint16(BACKGROUND_LEVELS + 2 * k)
            np.copyto(colour_index[y0:y1, x0:x1], rows, where=inside)

    if not with_image:
        return None, mask, instances
    image = np.take(_colour_table(scene), colour_index, axis=0)  # (S, S, 3) uint8
    random_bytes = np.frombuffer(noise.bytes(image.size), dtype=np.uint8).reshape(image.shape)
    noisy = image.astype(np.int16) + ((random_bytes & 7) + (random_bytes >> 5)).astype(np.int16)
    noisy -= 7
    np.clip(noisy, 0, 255, out=noisy)
    return noisy.astype(np.uint8), mask, instances


def label_from_mask(mask: np.ndarray) -> int:
    """Image-level label: the 0-based object class with the most pixels, argmax_c |{p : mask_p = c + 1}|.

    Ties go to the smaller class id. Raises ValueError for a mask without any object pixel. The same for
    every level: the mask's labels are ``c + 1`` whatever the number of classes.
    """
    counts = np.bincount(mask.ravel())[1:]
    if counts.sum() == 0:
        raise ValueError("the mask has no object pixel, so it has no image-level label")
    return int(np.argmax(counts))


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
    scene as stored, the others come from :func:`recolour_scene` (new object colours, same masks).
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
    ) -> None:
        super().__init__(split, image_size, num_train, num_val, seed, object_colours, level)
        if isinstance(colourings, bool) or not isinstance(colourings, int) or colourings < 1:
            raise ValueError(f"colourings={colourings!r}: expected an integer >= 1")
        self.colourings = colourings
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
            image, _, _ = render_scene(recolour_scene(scene, rng, self.object_colours))
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
