"""Pixels and exact masks of a :class:`data.scene_spec.Scene`: shapes, textures, backgrounds, rendered
with vectorised numpy inside each object's bounding box (later objects occlude earlier ones)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from data.scene_spec import Scene

# Largest distance from the centre, in units of r, that any shape reaches (the triangle's vertices).
_SHAPE_EXTENT: float = 1.3

# Pattern colour share of the dotted and grid families, one half like stripes and checks (pi r^2 = p^2 / 2;
# 1 - (1 - w)^2 = 1 / 2), so no family is brighter on average than another.
DOT_AREA_SHARE: float = 0.5
GRID_LINE_SHARE: float = 1.0 - 1.0 / math.sqrt(2.0)


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
    tested with the shape's implicit function at (a / r, b / r), and coloured by the texture at (a, b), or,
    for a texture turned by theta = ``texture_angle`` against the outline, at
    (a cos(theta) + b sin(theta), b cos(theta) - a sin(theta)).

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
            if item.texture_angle:  # the texture turned against the outline: rotate its frame once more
                cos_t, sin_t = math.cos(item.texture_angle), math.sin(item.texture_angle)
                a, b = a * cos_t + b * sin_t, b * cos_t - a * sin_t
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
