"""What a synthetic scene is: its classes, objects and levels, and how one is drawn from its seed.

A :class:`Scene` is a plain description (objects with class, shape, texture, colours, pose; a background),
sampled deterministically from ``(seed, split, index)`` for a :class:`SceneLevel`; :mod:`data.scene_render`
turns it into pixels and masks and :mod:`data.synthetic` serves it as datasets. Why each factor of the
levels is there: :mod:`data.synthetic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

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
        texture_angle: rotation of the texture against the outline, in radians: 0 in every sampled scene
            (the pattern turns with the shape); :func:`recolour_scene` with ``retexture`` redraws it.
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
    texture_angle: float = 0.0

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
        radius_range=(0.24, 0.36),
        texture_period_range=(0.05, 0.065),
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
    background_colours = _sample_background_colours(rng, setting.max_background_offset)
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
        background_colours=background_colours,
        background_angle=background_angle,
        background_period=background_period,
        background_phase=background_phase,
        objects=tuple(objects),
        noise_seed=int(rng.integers(2**62)),
        level=level,
    )


def _sample_background_colours(
    rng: np.random.Generator, max_offset: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A background's base colour (each channel 30..225) and a second colour within ``max_offset`` of it."""
    base = rng.integers(30, 226, size=3)
    second = np.clip(base + rng.integers(-max_offset, max_offset + 1, size=3), 0, 255)
    return _rgb(base), _rgb(second)


def recolour_scene(
    scene: Scene,
    rng: np.random.Generator,
    object_colours: str = "random",
    background: bool = False,
    retexture: bool = False,
) -> Scene:
    """The same scene with a freshly drawn colour pair for every object (as :func:`sample_scene` draws them).

    With ``background``, the background's two colours are redrawn too (first, as :func:`sample_scene`
    draws them), so the colour of the background cannot tell two views of one scene apart either. With
    ``retexture``, every object also gets a new texture period (from the level's range), phase and
    orientation against its outline (:attr:`SceneObject.texture_angle`, uniform in [0, 2 pi)): the texture
    *family*, which is the class, stays, but nothing else about the pattern, so two views of an object can
    only be matched by its family, outline and place. Per object the draws are: period, colours (random
    colours only), the two phases, the orientation.

    Everything else is unchanged: layout, classes, sizes, poses, outlines, the background family, its
    gradient direction and clouds field, and the pixel noise, so the masks are identical. ``"fixed"``
    objects keep :data:`FIXED_OBJECT_COLOURS` (recolouring a fixed-colour scene without ``background`` or
    ``retexture`` changes nothing). Without ``retexture`` the draws are those of earlier releases.
    """
    check_object_colours(object_colours)
    setting = scene_level(scene.level)
    if background:
        scene = replace(
            scene, background_colours=_sample_background_colours(rng, setting.max_background_offset)
        )
    if object_colours == "fixed" and not retexture:
        return scene
    contrast, step = setting.min_object_contrast, setting.min_luma_step

    def redrawn(item: SceneObject) -> SceneObject:
        if not retexture:
            return replace(item, colours=_sample_object_colours(rng, contrast, step))
        period = float(rng.uniform(*setting.texture_period_range) * scene.image_size)
        colours = item.colours
        if object_colours == "random":
            colours = _sample_object_colours(rng, contrast, step)
        phase = (float(rng.uniform(0, period)), float(rng.uniform(0, period)))
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        return replace(item, colours=colours, texture_period=period, texture_phase=phase, texture_angle=angle)

    return replace(scene, objects=tuple(redrawn(item) for item in scene.objects))
