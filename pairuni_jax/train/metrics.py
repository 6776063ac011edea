"""Training metrics: TensorBoard, a metrics.jsonl, captioned image grids, console progress.

Only process 0 writes (multi-host runs call every method everywhere; the others return at once).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pairuni_jax import files


def image_grid(
    images: np.ndarray, captions: Sequence[str] = (), ncols: int = 8, scale: int = 1
) -> Image.Image:
    """Tile uint8 images [N, H, W, 3] into one picture, each with a caption line under it."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    h, w = h * scale, w * scale
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    text_h = 12 if captions else 0
    cell_w = max(w, 8)
    grid = Image.new("RGB", (ncols * (cell_w + 2), nrows * (h + text_h + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % ncols) * (cell_w + 2), (i // ncols) * (h + text_h + 2)
        tile = Image.fromarray(images[i])
        if scale != 1:
            tile = tile.resize((w, h), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y))
        if captions:
            draw.text((x, y + h), str(captions[i])[: max(1, cell_w // 6)], fill=(0, 0, 0))
    return grid


class MetricsWriter:
    """Writes scalars to TensorBoard and metrics.jsonl, image grids to PNG and TensorBoard."""

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
        self.logdir = os.fspath(logdir)
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            files.makedirs(self.logdir)
            self._jsonl = files.open_file(os.path.join(self.logdir, "metrics.jsonl"), "a")

    def _writer(self):
        if self._tb is None:
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")
            self._tb = tf.summary.create_file_writer(os.path.join(self.logdir, "tb"))
        return self._tb

    def scalars(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        """Log scalars (non-finite values: null in the JSONL, skipped in TensorBoard)."""
        if not self.enabled:
            return
        import tensorflow as tf

        values = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        record = {"step": int(step)} | {
            k: (v if math.isfinite(v) else None) for k, v in values.items()
        }
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        with self._writer().as_default(step=int(step)):
            for k, v in values.items():
                if math.isfinite(v):
                    tf.summary.scalar(k, v)

    def images(
        self, step: int, name: str, images: np.ndarray, captions: Sequence[str] = (), ncols: int = 8
    ) -> str | None:
        """Save a captioned grid as `<logdir>/images/<name>_<step>.png`, and to TensorBoard."""
        if not self.enabled:
            return None
        import tensorflow as tf

        grid = image_grid(images, captions, ncols=ncols, scale=max(1, 64 // images.shape[1]))
        path = os.path.join(self.logdir, "images", f"{name}_{step:06d}.png")
        files.makedirs(os.path.dirname(path))
        with files.open_file(path, "wb") as f:
            grid.save(f, format="PNG")
        with self._writer().as_default(step=int(step)):
            tf.summary.image(name, np.asarray(grid)[None], max_outputs=1)
        return path

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self.flush()
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, in order."""
    with files.open_file(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """One console line per report: step, steps/s, ETA and a few chosen metrics."""

    def __init__(self, total_steps: int, name: str = "", first_step: int = 0, stream=None):
        self.total_steps = total_steps
        self.name = name
        self.stream = stream or sys.stdout
        self._t0 = time.perf_counter()
        self._first = first_step

    def report(self, step: int, metrics: Mapping[str, float] = ()) -> str:
        done = step - self._first
        elapsed = time.perf_counter() - self._t0
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k}={float(v):.4g}" for k, v in dict(metrics).items())
        line = (
            f"[{self.name}] step {step}/{self.total_steps} {rate:.2f} steps/s "
            f"eta {eta:.0f}s {shown}".rstrip()
        )
        print(line, file=self.stream, flush=True)
        return line
