"""Input pipeline throughput: pairs/s at 384x384 from JPEG files of mixed sizes.

ours:      PairPipeline (tf.data, parallel decode + preprocessing, prefetch), P pairs per batch.
reference: the same work in a plain sequential Python loop (read, PIL decode, preprocess_image,
           tokenise, pad) — what a simple loader would do.
Goal: >= 100 pairs/s on 2 cores, so input never stalls a TPU host.
On a shared machine wall time understates what the code does, so the CPU time of the whole
process (all threads) is reported too: pairs per CPU-second x cores bounds the rate on idle cores.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from PIL import Image

from pairuni_jax.bench.common import Record
from pairuni_jax.data import pairug, pipeline
from pairuni_jax.processing import SPECIAL_TOKENS, JanusProcessor, pad_left

SIZES = [(640, 480), (1024, 768), (512, 512), (1280, 960), (480, 800), (1600, 1200), (800, 600)]


def add_args(parser) -> None:
    parser.add_argument("--pairs", type=int, default=768, help="pairs timed per run")
    parser.add_argument("--files", type=int, default=48, help="distinct JPEG files")
    parser.add_argument("--batch", type=int, default=16, help="pairs per batch (P)")
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


def _reference(source: pipeline.JsonlPairSource, processor: JanusProcessor, n: int):
    t0, c0 = time.perf_counter(), time.process_time()
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
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def run(args) -> list[Record]:
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer or os.path.join(tmp, "tok")
        if not args.tokenizer:
            save_word_tokenizer(tok_dir)
        processor = JanusProcessor.from_pretrained(tok_dir, image_size=384, num_image_tokens=576)
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        source = pipeline.JsonlPairSource(_dataset(data, args.pairs, args.files))
        rates = {fast: _pipeline_rate(source, processor, args.batch, fast) for fast in (0, 1)}
        ref, ref_cpu = _reference(source, processor, min(args.pairs, 256))
        fast_error = _fast_error(source, processor, args.files)
    cores = os.cpu_count()
    note = f"{cores} cores, P={args.batch}, JPEG sizes {SIZES}"
    records = []
    for fast, name in ((0, "exact preprocessing"), (1, "fast_resize")):
        wall, cpu = rates[fast]
        records += [
            Record(f"{name}: pairs/s (wall)", wall, ref, "pairs/s", note=note),
            Record(f"{name}: pairs per CPU-s", cpu, ref_cpu, "pairs/cpu-s",
                   note=f"x {cores} cores = {cpu * cores:.0f} pairs/s on idle cores"),
        ]
    records[-1].note += f"; mean |pixel diff| vs exact {fast_error:.4f} (range [-1, 1])"
    return records


def _pipeline_rate(source, processor, batch: int, fast: bool) -> tuple[float, float]:
    config = pipeline.PipelineConfig(pairs_per_batch=batch, num_epochs=1, fast_resize=fast)
    it = pipeline.PairPipeline(source, processor, config).iterator()
    next(it)  # start-up (graph construction, first images) is not throughput
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(len(b["index"]) for b in it)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def _fast_error(source, processor, n_files: int) -> float:
    errors = []
    for i in range(min(n_files, len(SIZES))):
        data = source.understanding_image(i)
        exact = pipeline.decode_letterboxed(data, processor.image_size).astype(np.float32)
        fast = pipeline.decode_letterboxed(data, processor.image_size, fast=True)
        errors.append(np.abs(exact - fast).mean() / 127.5)
    return float(np.mean(errors))
