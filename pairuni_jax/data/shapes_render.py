"""Shapes world geometry: palette, objects, seeded layouts and the numpy rasteriser.

A scene is a tuple of `ShapeObject`s in unit coordinates (x right, y down, both in [0, 1]), so the
same scene renders at any image size. Rendering samples each pixel centre (no anti-aliasing), so a
ground-truth image holds only palette colours and the background; the checker reads colours by hue,
which also survives the blur of a VQ reconstruction (a blurred edge keeps its hue, loses
saturation).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Six saturated colours with hues >= 48 degrees apart (red 354, yellow 52, green 129, cyan 180,
# blue 234, purple 282), so the nearest-hue rule has a margin of 24 degrees or more on every side.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 50),
    "yellow": (240, 210, 0),
    "green": (30, 170, 50),
    "cyan": (0, 190, 190),
    "blue": (40, 60, 230),
    "purple": (160, 40, 210),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (245, 245, 245)


def palette_hue(color: str) -> float:
    """Hue of a palette colour in degrees [0, 360)."""
    r, g, b = (c / 255.0 for c in PALETTE[color])
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that fixes how scenes look.

    The default 32 px image with a 4x-downsampling VQ gives an 8 x 8 = 64-token grid: small enough
    for the RL loop on CPU, while the smallest object (0.25 * 32 = 8 px) still spans two
    tokens, so a tiny VQ can keep circles, squares and triangles apart.
    """

    image_size: int = 32
    colors: tuple[str, ...] = COLORS
    min_size: float = 0.25  # object side as a fraction of the image side
    max_size: float = 0.375
    gap_px: float = 1.5  # minimum empty pixels between two objects' boxes, and to the border
    max_objects: int = 3
    # Multiple-choice options: False lists every option of a question type in one fixed order
    # (a letter always names the same answer); True draws <= 4 in random order (shapes_text).
    shuffle_options: bool = False

    def __post_init__(self):
        unknown = [c for c in self.colors if c not in PALETTE]
        if unknown:
            raise ValueError(f"WorldConfig.colors: unknown colours {unknown}; known: {COLORS}")
        if not 0 < self.min_size <= self.max_size < 1:
            raise ValueError(f"WorldConfig: need 0 < min_size <= max_size < 1, got "
                             f"{self.min_size}, {self.max_size}")
        if self.image_size * self.min_size < 6:
            raise ValueError(f"WorldConfig: objects of {self.image_size * self.min_size:.1f} px "
                             "are too small to tell shapes apart; raise image_size or min_size")

    @property
    def gap(self) -> float:
        return self.gap_px / self.image_size


DEFAULT_WORLD = WorldConfig()


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object: shape, colour, box centre (cx, cy) and side `size`, in unit coordinates."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def centroid(self) -> tuple[float, float]:
        """Centre of mass: a triangle (apex up) has its centroid a sixth of its side below the box
        centre."""
        if self.shape == "triangle":
            return self.cx, self.cy + self.size / 6.0
        return self.cx, self.cy

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


Scene = tuple[ShapeObject, ...]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape filling the box [-1, 1]^2 at box coordinates (u, v); v points down."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def object_map(scene: Scene, image_size: int = 32) -> np.ndarray:
    """Which object each pixel shows: int [S, S], the index in `scene` of the last object covering
    it (later objects on top), -1 for the background."""
    index = np.full((image_size, image_size), -1, np.int32)
    centres = (np.arange(image_size) + 0.5) / image_size  # pixel centres in unit coordinates
    for i, obj in enumerate(scene):
        half = obj.size / 2.0
        u = (centres[None, :] - obj.cx) / half  # [1, S]
        v = (centres[:, None] - obj.cy) / half  # [S, 1]
        index[shape_mask(obj.shape, u, v)] = i
    return index


def render(scene: Scene, image_size: int = 32) -> np.ndarray:
    """Rasterise a scene: uint8 [S, S, 3] on the plain background, later objects on top."""
    palette = np.array([BACKGROUND] + [PALETTE[o.color] for o in scene], np.uint8)  # [1 + n, 3]
    return palette[object_map(scene, image_size) + 1]


def boxes_clear(a: ShapeObject, b: ShapeObject, gap: float) -> bool:
    """True when the two objects' boxes are at least `gap` apart along x or along y."""
    dx = abs(a.cx - b.cx) - (a.size + b.size) / 2.0
    dy = abs(a.cy - b.cy) - (a.size + b.size) / 2.0
    return max(dx, dy) >= gap


def place(
    rng: np.random.Generator,
    attrs: list[tuple[str, str]],
    cfg: WorldConfig,
    accept=None,
    max_tries: int = 1000,
) -> Scene:
    """Random sizes and non-overlapping positions for objects with the given (shape, colour).

    Each object takes the first of 64 candidate positions that keeps the gap to the objects placed
    so far. `accept(scene) -> bool` adds a layout condition (e.g. a clear spatial relation); layouts
    are resampled until it holds. Raises RuntimeError if no layout is found in `max_tries`.
    """
    if len(attrs) > cfg.max_objects:
        raise ValueError(f"{len(attrs)} objects, at most {cfg.max_objects}")
    for _ in range(max_tries):
        scene: list[ShapeObject] = []
        for shape, color in attrs:
            size = float(rng.uniform(cfg.min_size, cfg.max_size))
            lo, hi = size / 2.0 + cfg.gap, 1.0 - size / 2.0 - cfg.gap
            cand = rng.uniform(lo, hi, size=(64, 2))  # [64, (cx, cy)]
            ok = np.ones(64, bool)
            for other in scene:
                reach = (size + other.size) / 2.0 + cfg.gap
                far = np.abs(cand - np.array([other.cx, other.cy])) >= reach  # [64, 2]
                ok &= far.any(-1)
            if not ok.any():
                break
            cx, cy = cand[int(ok.argmax())]
            scene.append(ShapeObject(shape, color, float(cx), float(cy), size))
        if len(scene) == len(attrs) and (accept is None or accept(tuple(scene))):
            return tuple(scene)
    raise RuntimeError(f"no layout found for {attrs} in {max_tries} tries")


def relations(a_centroid, a_size, b_centroid, b_size) -> set[str]:
    """Spatial relations of A with respect to B (GenEval's rule on centroids and box sizes).

    The offset is shrunk by 0.1 x the summed sizes per axis; a relation holds when the shrunk
    offset's direction is within 60 degrees of its axis, so a diagonal offset can hold two.
    """
    offset = np.asarray(a_centroid, np.float64) - np.asarray(b_centroid, np.float64)  # [2] (x, y)
    dims = np.asarray(a_size, np.float64) + np.asarray(b_size, np.float64)
    revised = np.maximum(np.abs(offset) - 0.1 * dims, 0.0) * np.sign(offset)
    norm = float(np.linalg.norm(offset))
    if norm == 0.0 or np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def clear_relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """The one relation of A to B when it is unambiguous with a margin, else None.

    Used to build ground truth: the dominant axis must be at least twice the other (within about
    27 degrees of the axis), so pixel-level centroid noise cannot change the answer.
    """
    (ax, ay), (bx, by) = a.centroid, b.centroid
    dx, dy = ax - bx, ay - by
    if abs(dx) >= 2.0 * abs(dy) and abs(dx) > 0:
        rel = "right of" if dx > 0 else "left of"
    elif abs(dy) >= 2.0 * abs(dx) and abs(dy) > 0:
        rel = "below" if dy > 0 else "above"
    else:
        return None
    held = relations(a.centroid, (a.size, a.size), b.centroid, (b.size, b.size))
    return rel if held == {rel} else None


def min_palette_hue_gap(colors: tuple[str, ...] = COLORS) -> float:
    """Smallest circular hue distance between two palette colours, in degrees."""
    hues = [palette_hue(c) for c in colors]
    gaps = [abs(h1 - h2) for i, h1 in enumerate(hues) for h2 in hues[i + 1:]]
    return min(min(g, 360.0 - g) for g in gaps) if gaps else math.inf
