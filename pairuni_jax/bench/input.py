"""Input pipeline throughput: pairs/s at 384x384 from JPEG files of mixed sizes.

ours:      PairPipeline (tf.data, parallel decode + preprocessing, prefetch), P pairs per batch,
           with 1 decode thread and with one per core, exact and fast_resize.
reference: the same work in a plain sequential Python loop (read, PIL decode, preprocess_image,
           tokenise, pad) — what a simple loader would do.
Goal: >= 100 pairs/s on 2 cores, so input never stalls a TPU host.

On a shared machine wall time understates what the code does, so each run also reports the CPU
time of all the process's threads per pair, the CPU-bound limit on idle cores (cores / CPU-s per
pair), the cores used (CPU-s per wall-s: above 1 only if threads run at once, which the GIL
would prevent) and the load average. The wall speed-up of N decode threads over 1 shows scaling
when the machine is otherwise idle. Linux gives every session (autogroup) an equal share of the
cores, so one other busy session caps a run at 1 of 2 cores whatever its thread count.
On a virtual machine the hypervisor may also take CPU time from the guest ("steal": its share of
the machine's CPU time during each run is reported, from /proc/stat).
`--steps` adds the CPU cost of each step per image (decode, convert, resize, letterbox + scale).
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from pairuni_jax.bench.common import Record
from pairuni_jax.data import pairug, pipeline
from pairuni_jax.processing import SPECIAL_TOKENS, JanusProcessor, pad_left, resized_size

SIZES = [(640, 480), (1024, 768), (512, 512), (1280, 960), (480, 800), (1600, 1200), (800, 600)]


def add_args(parser) -> None:
    parser.add_argument("--pairs", type=int, default=768, help="pairs timed per pipeline run")
    parser.add_argument("--reference-pairs", type=int, default=128, help="pairs timed sequentially")
    parser.add_argument("--files", type=int, default=48, help="distinct JPEG files")
    parser.add_argument("--batch", type=int, default=16, help="pairs per batch (P)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, pipeline.available_cores()],
                        help="decode threads (num_parallel_calls) to run the pipeline with")
    parser.add_argument("--steps", action="store_true", help="also time each step per image")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: a small word-level one)")


def save_word_tokenizer(path: str) -> None:
    """A word-level tokenizer with Janus's special tokens, loadable by AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pairuni_jax.processing import SYSTEM_PROMPT

    specials = list(SPECIAL_TOKENS.values())
    words = set((SYSTEM_PROMPT + " a photo of red blue green circle square A B C D . : ?").split())
    vocab = {t: i for i, t in enumerate(["<unk>"] + specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=specials[0], eos_token=specials[1],
        pad_token=specials[2], additional_special_tokens=specials[3:],
    )
    fast.save_pretrained(path)


def _dataset(root: str, n_pairs: int, n_files: int) -> str:
    rng = np.random.default_rng(0)
    for i in range(n_files):
        w, h = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)  # photo-like
        image.save(os.path.join(root, f"{i}.jpg"), quality=90)
    question = pairug.format_mc_question("What colour is the circle?", ["red", "blue", "green"])
    records = [
        pairug.PairRecord(
            0.7, "retrieved",
            pairug.GenerationAnn(f"{(i + 1) % n_files}.jpg", "a photo of a red circle", "t"),
            pairug.UnderstandingAnn(f"{i % n_files}.jpg", question, "A", "t"),
        )
        for i in range(n_pairs)
    ]
    path = os.path.join(root, "pairs.jsonl")
    pairug.write_pairug(path, records)
    return path


def cpu_jiffies() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat; (0, 0) where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


class Meter:
    """Wall and CPU time (all threads of this process) from construction to `stop`, and the
    share of the machine's CPU time its hypervisor took (steal: a virtual machine's cores
    were not ours for that share, whatever the code does)."""

    def __init__(self):
        self.start_wall, self.start_cpu = time.perf_counter(), time.process_time()
        self.start_jiffies = cpu_jiffies()

    def stop(self, pairs: int) -> dict:
        """Figures for `pairs` delivered since construction."""
        wall = time.perf_counter() - self.start_wall
        cpu = time.process_time() - self.start_cpu
        steal, total = (b - a for a, b in zip(self.start_jiffies, cpu_jiffies(), strict=True))
        return {"wall": pairs / wall, "cpu_per_pair": cpu / pairs, "cores_used": cpu / wall,
                "load": os.getloadavg()[0], "steal": steal / total if total > 0 else 0.0}


def _reference(source: pipeline.JsonlPairSource, processor: JanusProcessor, n: int) -> dict:
    meter = Meter()
    for s in range(0, n, 16):
        pixels, und = [], []
        for i in range(s, min(s + 16, n)):
            rec = source.record(i)
            with open(os.path.join(source.root, rec.understand_ann.image_path), "rb") as f:
                with Image.open(f) as im:
                    pixels.append(processor.preprocess_image(im))
            und.append(processor.understanding_ids(rec.understand_ann.question))
        np.stack(pixels)
        pad_left(und, processor.pad_id)
    return meter.stop(n)


def run(args) -> list[Record]:
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer or os.path.join(tmp, "tok")
        if not args.tokenizer:
            save_word_tokenizer(tok_dir)
        processor = JanusProcessor.from_pretrained(tok_dir, image_size=384, num_image_tokens=576)
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        source = pipeline.JsonlPairSource(_dataset(data, args.pairs + args.batch, args.files))
        ref = _reference(source, processor, min(args.pairs, args.reference_pairs))
        # The first pipeline of a process runs at about half speed on one core for its first
        # seconds (TF runtime start-up), which is not throughput: it is timed and shown apart.
        cold = _pipeline_rate(source, processor, args.batch, False, args.threads[-1])
        runs = {
            (fast, threads): _pipeline_rate(source, processor, args.batch, fast, threads)
            for fast in (False, True) for threads in args.threads
        }
        blobs = [source.understanding_image(i) for i in range(args.files)]
        fast_error = _fast_error(blobs, processor.image_size)
        steps = _steps(blobs, processor.image_size) if args.steps else []
    cores = pipeline.available_cores()
    records = [_record("reference (sequential loop)", ref, None, cores, "P=1"),
               _record(f"first pipeline of the process (exact, {args.threads[-1]} decode "
                       "thread(s)): start-up included", cold, ref, cores,
                       f"P={args.batch}; not counted below")]
    for (fast, threads), figures in runs.items():
        name = f"{'fast_resize' if fast else 'exact'}, {threads} decode thread(s)"
        note = f"P={args.batch}"
        if threads != args.threads[0]:
            speedup = figures["wall"] / runs[fast, args.threads[0]]["wall"]
            note += f"; wall x{speedup:.2f} of {args.threads[0]} thread(s)"
        records.append(_record(name, figures, ref, cores, note))
    records[-1].note += f"; fast_resize mean |pixel diff| vs exact {fast_error:.4f} (range [-1, 1])"
    return records + steps


def _record(name: str, f: dict, ref: dict | None, cores: int, note: str) -> Record:
    """One run as a Record: wall pairs/s (ratio: vs reference); the note has the CPU figures."""
    note = (f"{1e3 * f['cpu_per_pair']:.2f} ms CPU/pair (CPU-bound limit "
            f"{cores / f['cpu_per_pair']:.0f} pairs/s on {cores} idle cores); "
            f"{f['cores_used']:.2f} cores used; load {f['load']:.1f}; "
            f"steal {100 * f['steal']:.0f}%; {note}")
    if ref is not None:
        note += f"; CPU/pair x{f['cpu_per_pair'] / ref['cpu_per_pair']:.2f} of reference"
    return Record(f"{name}: pairs/s (wall)", f["wall"], ref and ref["wall"], "pairs/s", note=note)


def _pipeline_rate(source, processor, batch: int, fast: bool, threads: int) -> dict:
    config = pipeline.PipelineConfig(
        pairs_per_batch=batch, num_epochs=1, fast_resize=fast, num_parallel_calls=threads
    )
    p = pipeline.PairPipeline(source, processor, config)
    it = p.iterator()
    next(it)  # start-up (graph construction, first images) is not throughput
    meter = Meter()
    n = sum(len(b["index"]) for b in it)
    return meter.stop(n)


def _fast_error(blobs: list[bytes], size: int) -> float:
    errors = []
    for data in blobs[: len(SIZES)]:
        exact = pipeline.preprocess_encoded(data, size)
        errors.append(np.abs(exact - pipeline.preprocess_encoded(data, size, fast=True)).mean())
    return float(np.mean(errors))


class _Laps:
    """Thread CPU time per named step, accumulated over calls of `lap`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.last = time.thread_time()

    def lap(self, step: str) -> None:
        now = time.thread_time()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self.last
        self.last = now


def _steps(blobs: list[bytes], size: int) -> list[Record]:
    """CPU ms per image of each step of pipeline.preprocess_encoded (one thread), exact and
    fast, next to what processing.preprocess_image spends on the steps it does differently."""
    records = []
    for fast in (False, True):
        laps = _Laps()
        for data in blobs:
            with Image.open(io.BytesIO(data)) as im:
                width, height = resized_size(*im.size, size)
                if fast:
                    im.draft("RGB", (width, height))
                im.load()
                laps.lap("decode")
                image = im if im.mode == "RGB" else im.convert("RGB")
                laps.lap("convert")
                small = image.resize((width, height), Image.Resampling.BICUBIC)
                laps.lap("resize")
                square = np.empty((size, size, 3), np.float32)  # as preprocess_encoded
                square[...] = -1.0
                top, left = (size - height) // 2, (size - width) // 2
                pipeline.scale_pixels(np.asarray(small),
                                      out=square[top : top + height, left : left + width])
                laps.lap("letterbox + scale")
                im.convert("RGB")  # processing.letterbox converts always: a copy of an RGB image
                laps.lap("reference convert")
                padded = Image.new("RGB", (size, size), (127, 127, 127))
                padded.paste(small, (left, top))
                (np.asarray(padded).astype(np.float32) / 255.0 - 0.5) / 0.5
                laps.lap("reference letterbox + scale")
        ms = {step: 1e3 * seconds / len(blobs) for step, seconds in laps.seconds.items()}
        mode = "fast_resize" if fast else "exact"
        for step in ("decode", "convert", "resize", "letterbox + scale"):
            reference = ms.get(f"reference {step}")
            records.append(Record(f"{mode} step: {step}", ms[step], reference, "ms CPU/img",
                                  note="one thread; reference: as processing.preprocess_image"))
    return records
