"""Image features for pairing: pluggable extractors run in batches under jit, cached on disk.

An extractor maps uint8 images [B, S, S, 3] (letterboxed to its `input_size` exactly as the
understanding preprocessing does: long side to S, bicubic, centred on grey) to L2-normalised
float32 features [B, D]. Registry (`EXTRACTORS`):
  pixels  deterministic colour layout (resize to a small grid, centre, flatten); needs no weights.
          For tests, the Shapes world and smoke runs.
  janus   mean-pooled SigLIP tower output of a Janus checkpoint (the default for real runs; the
          paper notes the encoder matters little, so the model already loaded is used).

`compute_features` caches vectors on disk keyed by (absolute path, modification time) under a
namespace naming the extractor and its settings, in chunk files written atomically as it goes, so
a crash loses at most one chunk and an edited image is recomputed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import os
import uuid
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pairuni_jax.processing import letterbox


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A jitted image -> vector function and what it needs to be fed and cached."""

    name: str  # cache namespace: extractor and settings, e.g. "pixels-g16-s64"
    input_size: int  # images are letterboxed to [input_size, input_size, 3] uint8
    fn: Callable[[jax.Array], jax.Array]  # uint8 [B, S, S, 3] -> float32 [B, D], unit norm
    batch_size: int = 64


def l2_normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pixel_extractor(
    grid: int = 16, input_size: int = 64, batch_size: int = 256
) -> FeatureExtractor:
    """Colour layout: letterbox, area-resize to [grid, grid, 3], centre on 0.5, flatten, L2-norm."""

    @jax.jit
    def fn(images):  # uint8 [B, S, S, 3]
        x = images.astype(jnp.float32) / 255.0 - 0.5
        b = x.shape[0]
        x = jax.image.resize(x, (b, grid, grid, 3), method="linear", antialias=True)
        return l2_normalise(x.reshape(b, grid * grid * 3))  # [B, grid*grid*3]

    return FeatureExtractor(f"pixels-g{grid}-s{input_size}", input_size, fn, batch_size)


def janus_extractor(
    checkpoint: str, dtype: str = "float32", batch_size: int = 16
) -> FeatureExtractor:
    """Mean-pooled SigLIP tower output (before the aligner) of a Janus checkpoint, L2-normalised.

    Loads the checkpoint with `checkpoints.load_janus` and keeps only the vision tower's params.
    """
    from pairuni_jax.checkpoints import load_janus
    from pairuni_jax.models.siglip import SigLIPVisionModel

    config, params = load_janus(checkpoint, dtype=dtype)
    tower = SigLIPVisionModel(config.vision, dtype=config.compute_dtype,
                              param_dtype=config.params_dtype)
    vision_params = params["vision_model"]
    del params

    @jax.jit
    def fn(images):  # uint8 [B, S, S, 3]
        pixels = (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5  # as preprocess_image
        tokens = tower.apply({"params": vision_params}, pixels)  # [B, N, width]
        return l2_normalise(tokens.astype(jnp.float32).mean(axis=1))  # [B, width]

    digest = hashlib.sha1(os.path.realpath(checkpoint).encode()).hexdigest()[:10]
    return FeatureExtractor(f"janus-{digest}-{dtype}", config.vision.image_size, fn, batch_size)


EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "pixels": pixel_extractor,
    "janus": janus_extractor,
}


def make_extractor(name: str, **kwargs) -> FeatureExtractor:
    """Build a registered extractor by name (`pixels`, `janus`)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; known: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](**kwargs)


def letterbox_uint8(path: str, size: int) -> np.ndarray:
    """Decode an image file and `processing.letterbox` it: uint8 [S, S, 3]."""
    with Image.open(path) as im:
        return letterbox(im, size)


class FeatureCache:
    """Vectors on disk keyed by "abspath|mtime_ns", in chunk files under cache_dir/namespace."""

    def __init__(self, cache_dir: str, namespace: str):
        self.dir = os.path.join(cache_dir, namespace)
        os.makedirs(self.dir, exist_ok=True)

    @staticmethod
    def key(path: str) -> str:
        return f"{os.path.abspath(path)}|{os.stat(path).st_mtime_ns}"

    def load(self) -> dict[str, np.ndarray]:
        table: dict[str, np.ndarray] = {}
        for chunk in sorted(glob.glob(os.path.join(self.dir, "chunk-*.npz"))):
            with np.load(chunk) as data:
                table.update(zip(data["keys"].tolist(), data["features"], strict=True))
        return table

    def save(self, keys: Sequence[str], features: np.ndarray) -> None:
        if not keys:
            return
        name = os.path.join(self.dir, f"chunk-{uuid.uuid4().hex}")
        np.savez(name + ".tmp.npz", keys=np.asarray(keys), features=features)
        os.replace(name + ".tmp.npz", name + ".npz")


def _decode_ahead(batches, paths, size, num_threads):
    """Yield (batch, uint8 [b, S, S, 3]) in order, decoding <= 2 x num_threads batches ahead."""

    def load(path):
        try:
            return letterbox_uint8(path, size)
        except Exception as e:
            raise ValueError(f"{path}: cannot load image: {type(e).__name__}: {e}") from e

    def decode(batch):
        return np.stack([load(paths[i]) for i in batch])

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        window = collections.deque()
        for batch in batches:
            window.append((batch, pool.submit(decode, batch)))
            if len(window) >= 2 * num_threads:
                b, fut = window.popleft()
                yield b, fut.result()
        while window:
            b, fut = window.popleft()
            yield b, fut.result()


def compute_features(
    paths: Sequence[str],
    extractor: FeatureExtractor,
    *,
    cache_dir: str | None = None,
    num_threads: int = 4,
    flush_every: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Features of the images at `paths` (absolute or cwd-relative): float32 [N, D].

    Decoding runs in `num_threads` threads (PIL releases the GIL); the extractor sees full batches
    of `extractor.batch_size` (the last one padded) so it compiles once.
    """
    cache = FeatureCache(cache_dir, extractor.name) if cache_dir else None
    keys = [FeatureCache.key(p) for p in paths]
    known = cache.load() if cache else {}
    todo = sorted({k: i for i, k in reversed(list(enumerate(keys))) if k not in known}.values())
    computed: dict[str, np.ndarray] = {}
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []
    bs, size = extractor.batch_size, extractor.input_size
    batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
    for batch, images in _decode_ahead(batches, paths, size, num_threads):
        if len(batch) < bs:  # keep one compiled shape
            pad = np.zeros((bs - len(batch),) + images.shape[1:], images.dtype)
            images = np.concatenate([images, pad])
        feats = np.asarray(extractor.fn(images))[: len(batch)]  # [b, D]
        for i, f in zip(batch, feats, strict=True):
            computed[keys[i]] = f
            pending_keys.append(keys[i])
            pending.append(f)
        if cache and len(pending_keys) >= flush_every:
            cache.save(pending_keys, np.stack(pending))
            pending_keys, pending = [], []
        if progress:
            progress(len(computed), len(todo))
    if cache:
        cache.save(pending_keys, np.stack(pending) if pending else np.zeros((0, 0), np.float32))
    table = {**known, **computed}
    if not paths:
        return np.zeros((0, 0), np.float32)
    return np.stack([table[k] for k in keys]).astype(np.float32)
