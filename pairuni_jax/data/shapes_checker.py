"""The Shapes world checker: reads objects back from pixels and scores an image against a prompt.

Detection: a pixel is an object pixel when it is saturated and bright enough; its colour is the
palette colour of nearest hue (a blurred edge against the grey background keeps its hue, so hue
is robust to VQ reconstructions). Object pixels form 4-connected components with a majority
colour; tiny components are noise; a component's shape is the template (circle, square, triangle
drawn in the component's bounding box) with the highest IoU; its position is its centroid.

Scoring follows GenEval: every prompt becomes a list of constraints (an object is present, has the
asked colour, the asked count is met exactly, the relation holds); the reward is the fraction met,
and `strict` is GenEval's 0/1 correctness (all met). A counting prompt's constraints are "one is
present" and "the count is exact" (with "at most N" an empty canvas met half of them), so an empty
canvas meets no prompt's. An image that is no scene of the world meets none: one with a component
that fits no shape (template IoU below MIN_FIT) or is too small to be an object, or with more
objects than a scene holds. Without that rule, clutter of many blobs, each read as its nearest
shape, met most "at least one X" constraints, and Pair-GRPO learned to draw clutter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pairuni_jax.data.shapes_render import (
    DEFAULT_WORLD,
    SHAPES,
    WorldConfig,
    palette_hue,
    relations,
    shape_mask,
)
from pairuni_jax.data.shapes_text import PromptSpec, parse_prompt

MIN_SATURATION = 0.4  # about the 50% blend of a palette colour with the background
MIN_VALUE = 0.3
# Template IoU below which a component is a blob, not a shape. Objects fit at >= 0.87 on ground
# truth and >= 0.82 on VQ reconstructions (1st percentiles of 1200 images); the clutter a policy
# drew to collect detections fit at a median of 0.62-0.66.
MIN_FIT = 0.7
# Smallest bounding-box side of an object, as a fraction of the world's smallest object side:
# objects measure >= 7 px of the 8 px minimum on ground truth, >= 5 px on VQ reconstructions.
MIN_SIDE = 0.6
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclasses.dataclass(frozen=True)
class Detection:
    """One object read from pixels; centroid and size in unit coordinates (x right, y down)."""

    shape: str
    color: str
    centroid: tuple[float, float]
    size: tuple[float, float]  # bounding box (width, height)
    area: int  # pixels
    fit: float  # IoU with the winning shape template


def color_map(pixels: np.ndarray, colors: Sequence[str]) -> np.ndarray:
    """Index into `colors` of each pixel's nearest palette hue, -1 for background. [H, W] int."""
    rgb = pixels.astype(np.float32) / 255.0  # [H, W, 3]
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    sat = np.where(mx > 0, chroma / np.maximum(mx, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.select(
        [mx == r, mx == g],
        [((g - b) / safe) % 6.0, (b - r) / safe + 2.0],
        (r - g) / safe + 4.0,
    ) * 60.0  # degrees in [0, 360)
    ref = np.array([palette_hue(c) for c in colors], np.float32)  # [K]
    dist = np.abs(hue[..., None] - ref)  # [H, W, K]
    dist = np.minimum(dist, 360.0 - dist)
    idx = dist.argmin(-1)
    return np.where((sat >= MIN_SATURATION) & (mx >= MIN_VALUE), idx, -1)


# Rasterising samples pixel centres, so a shape's pixel box is up to a pixel smaller than the
# shape: a small circle then fills more of its box than the inscribed circle (up to 0.89 at 8 px).
# Templates therefore also come slightly enlarged about the box centre (clipped to the box).
_TEMPLATE_SCALES = (1.0, 1.06, 1.12, 1.18)
_TEMPLATE_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _templates(h: int, w: int) -> np.ndarray:
    """Each shape at each scale, filling an h x w box. [len(SHAPES), len(scales), h, w] bool."""
    if (h, w) not in _TEMPLATE_CACHE:
        u = ((np.arange(w) + 0.5) / w * 2.0 - 1.0)[None, :]
        v = ((np.arange(h) + 0.5) / h * 2.0 - 1.0)[:, None]
        _TEMPLATE_CACHE[(h, w)] = np.stack([
            np.stack([np.broadcast_to(shape_mask(s, u / k, v / k), (h, w))
                      for k in _TEMPLATE_SCALES])
            for s in SHAPES])
    return _TEMPLATE_CACHE[(h, w)]


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape of a component cropped to its bounding box ([h, w] bool) and its template IoU."""
    t = _templates(*mask.shape)  # [3, scales, h, w]
    inter = (t & mask).sum((2, 3))
    union = (t | mask).sum((2, 3))
    iou = (inter / np.maximum(union, 1)).max(1)  # [3]
    k = int(iou.argmax())
    return SHAPES[k], float(iou[k])


def min_object_pixels(cfg: WorldConfig) -> float:
    """Smallest component counted as an object: a third of the smallest triangle's area."""
    side = cfg.min_size * cfg.image_size
    return 0.5 * side * side / 3.0


def _components(mask: np.ndarray, min_px: float):
    """(slice, cropped mask) of each 4-connected component of `mask` with at least min_px pixels."""
    labels, _ = ndimage.label(mask, _FOUR_CONNECTED)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            comp = labels[sl] == i  # [bh, bw]
            if comp.sum() >= min_px:
                yield sl, comp


def detect(pixels: np.ndarray, cfg: WorldConfig = DEFAULT_WORLD) -> list[Detection]:
    """Objects in an image (uint8 [H, W, 3]).

    Components are taken over all object pixels first and get their majority colour, so a hue
    drift inside one object (a reconstruction artefact) does not split it; a component in which
    two colours each cover an object's worth of pixels (touching objects) is split by colour.
    """
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected pixels [H, W, 3], got shape {pixels.shape}")
    h, w = pixels.shape[:2]
    colors = color_map(pixels, cfg.colors)  # [H, W], -1 = background
    min_px = min_object_pixels(cfg) * (h * w) / cfg.image_size**2
    parts = []  # (slice, cropped mask, colour index)
    for sl, comp in _components(colors >= 0, min_px):
        counts = np.bincount(colors[sl][comp], minlength=len(cfg.colors))
        big = np.flatnonzero(counts >= min_px)
        if len(big) <= 1:
            parts.append((sl, comp, int(counts.argmax())))
            continue
        for k in big:
            for sub_sl, sub in _components(comp & (colors[sl] == k), min_px):
                offset = tuple(slice(a.start + b.start, a.start + b.stop)
                               for a, b in zip(sl, sub_sl, strict=True))
                parts.append((offset, sub, int(k)))
    found = []
    for sl, comp, k in parts:
        shape, fit = classify_shape(comp)
        ys, xs = np.nonzero(comp)
        cy = (sl[0].start + ys.mean() + 0.5) / h
        cx = (sl[1].start + xs.mean() + 0.5) / w
        size = (comp.shape[1] / w, comp.shape[0] / h)
        found.append(Detection(shape, cfg.colors[k], (float(cx), float(cy)), size,
                               int(comp.sum()), fit))
    return found


def _matches(d: Detection, shape: str, color: str | None) -> bool:
    return d.shape == shape and (color is None or d.color == color)


def check_constraints(spec: PromptSpec, dets: Sequence[Detection]) -> list[tuple[str, bool]]:
    """Each constraint of the prompt with whether the detections meet it."""
    out = []
    for o in spec.objects:
        n_match = sum(_matches(d, o.shape, o.color) for d in dets)
        name = " ".join(w for w in (o.color, o.shape) if w)
        if spec.category == "counting":  # not "at most N": an empty canvas would meet it
            out.append((f"a {name}", n_match >= 1))
            out.append((f"exactly {o.count} {name}", n_match == o.count))
        else:
            out.append((f"{o.count} {o.shape}", sum(d.shape == o.shape for d in dets) >= o.count))
            if o.color:
                out.append((f"{o.count} {name}", n_match >= o.count))
    if spec.relation is not None:
        a, b = spec.objects
        cand_a = [d for d in dets if _matches(d, a.shape, a.color)]
        cand_b = [d for d in dets if _matches(d, b.shape, b.color)]
        held = any(
            da is not db and spec.relation in relations(da.centroid, da.size, db.centroid, db.size)
            for da in cand_a for db in cand_b)
        out.append((spec.relation, held))
    return out


def is_scene(dets: Sequence[Detection], cfg: WorldConfig = DEFAULT_WORLD) -> bool:
    """Whether detections can be a scene of the world: at most `cfg.max_objects` components,
    each fitting a shape and at least MIN_SIDE of the smallest object's side across (a 4 px
    block fits the circle template perfectly)."""
    min_side = MIN_SIDE * cfg.min_size
    return len(dets) <= cfg.max_objects and all(
        d.fit >= MIN_FIT and max(d.size) >= min_side for d in dets)


def score_detections(dets: Sequence[Detection], prompt: str,
                     cfg: WorldConfig = DEFAULT_WORLD) -> tuple[float, bool]:
    """(fraction of the prompt's constraints met, GenEval strict correctness) of an image's
    detections; (0, False) when they are no scene of the world (`is_scene`)."""
    spec = parse_prompt(prompt)
    if not is_scene(dets, cfg):
        return 0.0, False
    results = check_constraints(spec, dets)
    met = sum(ok for _, ok in results)
    return met / len(results), met == len(results)


def score_image(pixels: np.ndarray, prompt: str,
                cfg: WorldConfig = DEFAULT_WORLD) -> tuple[float, bool]:
    """`score_detections` of one image (uint8 [H, W, 3])."""
    return score_detections(detect(pixels, cfg), prompt, cfg)


def score_images(images: np.ndarray | Sequence[Sequence[Detection]], prompts: Sequence[str],
                 cfg: WorldConfig = DEFAULT_WORLD) -> tuple[np.ndarray, np.ndarray]:
    """Batched scores: uint8 images [B, H, W, 3], or their detections (one list per image, to
    score the same images against several prompt lists without detecting them again) ->
    (fractions [B] float32, strict [B] bool)."""
    if isinstance(images, np.ndarray) or (len(images) and isinstance(images[0], np.ndarray)):
        images = np.asarray(images)  # a stack or a list of images, not of detections
        if images.ndim != 4:
            raise ValueError(f"expected images [B, H, W, 3], got {images.shape}")
        images = [detect(img, cfg) for img in images]
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    scores = [score_detections(d, p, cfg) for d, p in zip(images, prompts, strict=True)]
    frac = np.array([s[0] for s in scores], np.float32)
    ok = np.array([s[1] for s in scores], bool)
    return frac, ok
