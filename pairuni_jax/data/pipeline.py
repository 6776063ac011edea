"""The tf.data input pipeline: PairUG pairs -> batches of P pairs as dicts of numpy arrays.

    source (JSONL or TFDS) -> per-epoch permutation (seed, epoch) -> this host's shard
      -> tf.data, parallel and order-preserving: decode + resize in PIL, letterbox and scale to
         [-1, 1] in numpy (GIL released; exactly JanusProcessor.preprocess_image; tested)
      -> batch P -> prefetch
      -> tokenise with the chat templates, left-pad to length buckets -> batch dict

Order is a pure function of (seed, epoch, process_index, process_count), so the position
`{"epoch", "batch"}` (`PairIterator.state()`, JSON, fits a checkpoint's meta) resumes exactly:
an iterator made from a saved state yields the batches an uninterrupted one would have.
Multi-host: every epoch the global permutation is cut to a multiple of process_count * P and
dealt round-robin, so hosts read disjoint shards with the same number of batches; the few pairs
left over differ every epoch (`PairPipeline.dropped_per_epoch`).

String-valued keys (object arrays) are host-side only: `split_text(batch)` separates them.

Batch (P = pairs_per_batch, S = processor.image_size, Lu / Lg = bucketed lengths):
  index             int64   [P]        record index in the source
  und_ids           int32   [P, Lu]    understanding prompt (placeholders expanded), left-padded
  und_mask          bool    [P, Lu]    True on real tokens
  und_image_mask    bool    [P, Lu]    True on <image_placeholder> positions (for the features)
  pixel_values      float32 [P, S, S, 3] understanding image in [-1, 1]
  und_answer        object  [P]        answer letter, e.g. "B"
  und_answer_index  int32   [P]        0 for "A", 1 for "B", ...
  und_num_options   int32   [P]        number of options of the question
  und_question      object  [P]        question text
  und_tag           object  [P]
  gen_ids           int32   [P, Lg]    generation prompt ending in <begin_of_image>, left-padded
  gen_mask          bool    [P, Lg]
  gen_uncond_ids    int32   [P, Lg]    CFG unconditional prompt (same mask as gen_ids)
  gen_prompt        object  [P]        generation prompt text (text rewards read it)
  gen_tag           object  [P]
  pair_type         int32   [P]        index into pairug.PAIR_TYPES: 0 aligned, 1 retrieved
  similarity        float32 [P]
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import os
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from pairuni_jax import files
from pairuni_jax.data import pairug
from pairuni_jax.processing import PAD_COLOUR, pad_left, resized_size

TEXT_KEYS = ("und_answer", "und_question", "und_tag", "gen_prompt", "gen_tag")


def split_text(batch: dict) -> tuple[dict, dict]:
    """(numeric arrays, ready for device_put / jit; host-side string arrays) of a batch."""
    return (
        {k: v for k, v in batch.items() if k not in TEXT_KEYS},
        {k: v for k, v in batch.items() if k in TEXT_KEYS},
    )


class PairSource(Protocol):
    """Random access to pairs: the record and the understanding image's encoded bytes."""

    name: str

    def __len__(self) -> int: ...

    def record(self, index: int) -> pairug.PairRecord: ...

    def understanding_image(self, index: int) -> bytes: ...

    def describe(self, index: int) -> str: ...  # where record `index` comes from, for errors


class JsonlPairSource:
    """Pairs from a PairUG JSONL file; images read from the dataset root on demand."""

    def __init__(self, path: str, *, root: str | None = None, on_error: pairug.OnError = "raise"):
        self.read = pairug.read_pairug(path, root=root, on_error=on_error)
        self.name = path
        self.records = self.read.records
        self.root = self.read.root

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> pairug.PairRecord:
        return self.records[index]

    def understanding_image(self, index: int) -> bytes:
        rel = self.records[index].understand_ann.image_path
        with files.open_file(pairug.resolve_image_path(rel, self.root), "rb") as f:
            return f.read()

    def describe(self, index: int) -> str:
        return f"{self.name}:{self.read.lines[index]}"


def open_source(path: str, *, root: str | None = None, on_error: pairug.OnError = "raise"):
    """A PairUG JSONL file, or a directory prepared by `tfds_pairug.PairUG`, as a PairSource."""
    if files.isdir(path):
        from pairuni_jax.data.tfds_pairug import TfdsPairSource

        return TfdsPairSource(path)
    return JsonlPairSource(path, root=root, on_error=on_error)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    pairs_per_batch: int = 16  # P, per host
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    und_buckets: Sequence[int] | None = None  # padded lengths; None: multiples of bucket_multiple
    gen_buckets: Sequence[int] | None = None
    bucket_multiple: int = 64
    num_parallel_calls: int = -1  # -1: tf.data.AUTOTUNE
    prefetch_batches: int = 2
    num_epochs: int | None = None  # None: repeat forever
    # Decode JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling) while both sides stay >= the
    # letterboxed size, then the bicubic resize: much cheaper on large images; pixels differ
    # slightly from the reference preprocessing (`bench input` reports by how much).
    fast_resize: bool = False


def preprocess_encoded(data: bytes, size: int, *, fast: bool = False) -> np.ndarray:
    """Encoded image -> float32 [size, size, 3] in [-1, 1]: exactly
    JanusProcessor.preprocess_image of the decoded file (bit-identical; tested on RGB, grey,
    CMYK, palette and RGBA files).

    The same steps as processing.letterbox, without its copies: RGB images skip the no-op
    `convert("RGB")` (a full-size copy) and the resized image is scaled straight into its place
    in the float square, instead of pasted on a uint8 square by PIL, copied out by `np.asarray`
    and then scaled whole. Decode, convert, resize (PIL) and the scaling (numpy) run with the
    GIL released, so several threads do this at once.

    `fast`: JPEGs are decoded at 1/2, 1/4 or 1/8 scale (DCT scaling) as long as both sides stay
    at least the letterboxed size, then resized to the same geometry; pixels differ slightly
    from the exact path (`bench input` reports by how much) and the work is about halved.
    """
    with Image.open(io.BytesIO(data)) as im:
        width, height = resized_size(*im.size, size)  # of the full image, also when `fast`
        if fast:
            im.draft("RGB", (width, height))  # JPEG only; other formats decode at full size
        image = im if im.mode == "RGB" else im.convert("RGB")
        small = image.resize((width, height), Image.Resampling.BICUBIC)  # decodes, [h, w]
    square = np.empty((size, size, 3), np.float32)  # [S, S, 3]
    square[...] = _PAD_PIXEL
    top, left = (size - height) // 2, (size - width) // 2
    scale_pixels(np.asarray(small), out=square[top : top + height, left : left + width])
    return square


def scale_pixels(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1] (into `out` if given), bit-identical to
    preprocess_image's `(x / 255 - 0.5) / 0.5` for every byte value (tested), in two in-place
    passes instead of four allocating ones."""
    out = np.divide(pixels, np.float32(127.5), out=out, dtype=np.float32)
    return np.subtract(out, np.float32(1.0), out=out)


_PAD_PIXEL = scale_pixels(np.array(PAD_COLOUR, np.uint8))  # float32 [3]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), which can be fewer than the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def bucket_length(length: int, buckets: Sequence[int] | None, multiple: int, what: str) -> int:
    """Smallest bucket >= length (or length rounded up to `multiple` when no buckets are given)."""
    if buckets is None:
        return -(-length // multiple) * multiple
    at = bisect.bisect_left(sorted(buckets), length)
    if at == len(buckets):
        raise ValueError(f"{what}: length {length} exceeds the largest bucket {max(buckets)}")
    return sorted(buckets)[at]


class PairPipeline:
    """Deterministic, shardable, resumable batches of pairs (see the module docstring)."""

    def __init__(self, source: PairSource, processor, config: PipelineConfig = PipelineConfig()):  # noqa: B008
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")  # TF must never take accelerator memory
        c = config
        if not 0 <= c.process_index < c.process_count:
            raise ValueError(f"process_index {c.process_index} not in [0, {c.process_count})")
        self.source, self.processor, self.config = source, processor, config
        per_step = c.process_count * c.pairs_per_batch
        self.batches_per_epoch = len(source) // per_step
        self.dropped_per_epoch = len(source) - self.batches_per_epoch * per_step
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{source.name}: {len(source)} pairs are fewer than one global batch "
                f"({c.process_count} hosts x {c.pairs_per_batch} pairs)"
            )

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This host's record indices for `epoch`, in order: int64 [batches_per_epoch * P]."""
        c = self.config
        perm = np.random.default_rng([c.seed, epoch]).permutation(len(self.source))
        used = perm[: self.batches_per_epoch * c.process_count * c.pairs_per_batch]
        return used[c.process_index :: c.process_count]

    def iterator(self, state: dict | None = None) -> PairIterator:
        """An iterator starting at `state` (from `PairIterator.state()`), or at the beginning."""
        return PairIterator(self, state)

    def __iter__(self) -> Iterator[dict]:
        return self.iterator()

    # -- pieces used by the iterator --------------------------------------------------------

    def _image_dataset(self, indices: np.ndarray):
        """tf.data over `indices` yielding (index [P], pixels [P, S, S, 3]) batches, in order.

        Each image is decoded, letterboxed and scaled by `preprocess_encoded` in tf.data's thread
        pool; PIL and numpy release the GIL for nearly all of it, so the threads run at once.
        """
        import tensorflow as tf

        c, size, source = self.config, self.processor.image_size, self.source

        def load(index):  # runs in tf.data's thread pool
            try:
                data = source.understanding_image(int(index))
                return preprocess_encoded(data, size, fast=c.fast_resize)  # [S, S, 3]
            except Exception as e:
                rel = source.record(int(index)).understand_ann.image_path
                raise ValueError(
                    f"{source.describe(int(index))}: field 'understand_ann.image_path': "
                    f"cannot load {rel}: {type(e).__name__}: {e}"
                ) from e

        def map_fn(index):
            pixels = tf.numpy_function(load, [index], tf.float32, stateful=False)
            pixels.set_shape((size, size, 3))
            return index, pixels  # float32 [S, S, 3]

        parallel = tf.data.AUTOTUNE if c.num_parallel_calls < 0 else c.num_parallel_calls
        ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
        ds = ds.map(map_fn, num_parallel_calls=parallel, deterministic=True)
        ds = ds.batch(c.pairs_per_batch, drop_remainder=True)
        options = tf.data.Options()
        options.deterministic = True
        options.threading.private_threadpool_size = available_cores()
        # tf.data's autotuner often settled this map on one call at a time (on 2 cores: one core
        # busy, 76 pairs/s at any num_parallel_calls); without it AUTOTUNE means one call per
        # thread of the pool, and the map keeps every core busy (`bench input`).
        options.autotune.enabled = False
        return ds.with_options(options).prefetch(c.prefetch_batches)

    def _text_arrays(self, indices: np.ndarray) -> dict:
        c, proc = self.config, self.processor
        records = [self.source.record(int(i)) for i in indices]
        und = [proc.understanding_ids(r.understand_ann.question) for r in records]
        gen = [proc.generation_ids(r.generate_ann.prompt) for r in records]
        where = f"{self.source.name} records {indices.tolist()}"
        lu = bucket_length(max(map(len, und)), c.und_buckets, c.bucket_multiple, where)
        lg = bucket_length(max(map(len, gen)), c.gen_buckets, c.bucket_multiple, where)
        und_ids, und_mask = pad_left(und, proc.pad_id, lu)  # [P, Lu]
        gen_ids, gen_mask = pad_left(gen, proc.pad_id, lg)  # [P, Lg]
        uncond, _ = pad_left([proc.unconditional_ids(g) for g in gen], proc.pad_id, lg)
        answers = [r.understand_ann.answer for r in records]
        return {
            "und_ids": und_ids,
            "und_mask": und_mask,
            "und_image_mask": und_ids == proc.image_placeholder_id,
            "und_answer": np.array(answers, dtype=object),
            "und_answer_index": np.array([ord(a) - ord("A") for a in answers], np.int32),
            "und_num_options": np.array(
                [len(pairug.mc_options(r.understand_ann.question)) for r in records], np.int32
            ),
            "und_question": np.array([r.understand_ann.question for r in records], dtype=object),
            "und_tag": np.array([r.understand_ann.tag for r in records], dtype=object),
            "gen_ids": gen_ids,
            "gen_mask": gen_mask,
            "gen_uncond_ids": uncond,
            "gen_prompt": np.array([r.generate_ann.prompt for r in records], dtype=object),
            "gen_tag": np.array([r.generate_ann.tag for r in records], dtype=object),
            "pair_type": np.array(
                [pairug.PAIR_TYPES.index(r.pair_type) for r in records], np.int32
            ),
            "similarity": np.array([r.similarity for r in records], np.float32),
        }


class PairIterator:
    """Iterates batches from a position; `state()` is the position of the next batch."""

    def __init__(self, pipeline: PairPipeline, state: dict | None):
        self.pipeline = pipeline
        c = pipeline.config
        self._identity = {
            "seed": c.seed,
            "process_index": c.process_index,
            "process_count": c.process_count,
            "pairs_per_batch": c.pairs_per_batch,
            "num_records": len(pipeline.source),
        }
        state = dict(state or {"epoch": 0, "batch": 0})
        for key, value in self._identity.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"data state was saved with {key}={state[key]}, the pipeline has {value}; "
                    "resuming would not reproduce the saved order"
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= self.batch <= pipeline.batches_per_epoch:
            raise ValueError(f"batch {self.batch} outside [0, {pipeline.batches_per_epoch}]")
        self._it = None

    def state(self) -> dict:
        """JSON-ready position of the next batch, plus what it is only valid for."""
        return {"epoch": self.epoch, "batch": self.batch, **self._identity}

    def __iter__(self) -> PairIterator:
        return self

    def _start_epoch(self):
        p = self.pipeline
        offset = self.batch * p.config.pairs_per_batch
        self._it = iter(p._image_dataset(p.epoch_indices(self.epoch)[offset:]).as_numpy_iterator())

    def __next__(self) -> dict:
        p = self.pipeline
        if self.batch >= p.batches_per_epoch:
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        if p.config.num_epochs is not None and self.epoch >= p.config.num_epochs:
            raise StopIteration
        if self._it is None:
            self._start_epoch()
        indices, pixels = next(self._it)  # [P], [P, S, S, 3]
        batch = {"index": indices, "pixel_values": pixels, **p._text_arrays(indices)}
        self.batch += 1
        return batch
