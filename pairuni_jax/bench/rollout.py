"""Rollout speed, ours vs transformers' PyTorch Janus, same random weights, same CPU, fp32.

`python -m pairuni_jax.bench rollout [--image-tokens 576] [--text-tokens 64] [--points a,b]`

Config (where compute matters): LLM hidden 1024, intermediate 2816, 8 layers, 8 heads, vocab
32000; VQ codebook 16384 with a 24x24 grid (576 image tokens). Points: (a) 2 prompts x 1 sample,
(b) 1 prompt x G = 8 samples; image rollouts use CFG (w = 5, so 2x the rows).
Reference: `generate(generation_mode="image", do_sample=True, guidance_scale=5,
num_return_sequences=G)` and `generate(do_sample=True, ...)` for text, as a new user would call
them (default attention and cache). Ours: rollout.generate_image_tokens / generate_text.
Reported: tokens/s (compile time excluded and reported on its own), the decode-step time, the
weight bytes read per second during decode over the machine's read bandwidth measured in the same
run (bench/machine.py), and for text what sharing one prompt prefill between the G samples saves
against prefilling G copies.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from pairuni_jax.bench import machine
from pairuni_jax.bench.common import Record
from pairuni_jax.rollout import Sampling, generate_image_tokens, generate_text

BOS, EOS, PAD, BOI = 1, 2, 0, 3
GUIDANCE = 5.0


def add_args(parser) -> None:
    parser.add_argument("--image-tokens", type=int, default=576,
                        help="image tokens per sample (576 = the real 24x24 grid)")
    parser.add_argument("--text-tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--text-prompt", type=int, default=640,
                        help="text prompt length (an understanding prompt with one image: ~640)")
    parser.add_argument("--image-prompt", type=int, default=32, help="generation prompt length")
    parser.add_argument("--points", default="a,b", help="a: 2 prompts x 1, b: 1 prompt x 8")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs (median)")


def hf_config():
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    text = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=2048, tie_word_embeddings=False,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    # A small vision tower (text prompts here are text only); the VQ has the real 24x24 grid.
    vision = JanusVisionConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                               image_size=384, patch_size=16, projection_dim=1024,
                               num_image_tokens=576)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384, latent_channels=32,
                          base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                          projection_dim=1024, image_token_embed_dim=1024)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=31999, tie_word_embeddings=False)


def build_models():
    """A random transformers model and the same weights loaded by our loader."""
    import torch
    from transformers import JanusForConditionalGeneration

    from pairuni_jax.checkpoints import load_janus

    torch.manual_seed(0)
    model = JanusForConditionalGeneration(hf_config()).eval()
    gc = model.generation_config
    gc.generation_kwargs = {"boi_token_id": BOI}
    gc.bos_token_id, gc.pad_token_id, gc.eos_token_id = BOS, PAD, EOS
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        config, params = load_janus(d)
    return model, config, params


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` later calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


@dataclasses.dataclass
class Point:
    name: str
    prompts: int
    samples: int


POINTS = {"a": Point("a: 2 prompts x 1", 2, 1), "b": Point("b: 1 prompt x 8", 1, 8)}


def _weight_bytes(params, mode: str) -> int:
    """Bytes of the weights one decode step reads (the LM layers, final norm and the head)."""
    lm = params["language_model"]
    trees = [{k: v for k, v in lm.items() if k != "embed_tokens"}]
    if mode == "image":
        trees += [params["generation_head"], params["generation_aligner"]]
    else:
        trees += [params["lm_head"]]
    return sum(x.nbytes for x in jax.tree.leaves(trees))


def _prompts(rng, batch: int, length: int, last: int | None) -> tuple[np.ndarray, np.ndarray]:
    body = rng.integers(4, 31000, (batch, length - 1 - (last is not None)))
    parts = [np.full((batch, 1), BOS), body] + ([np.full((batch, 1), last)] if last else [])
    ids = np.concatenate(parts, 1).astype(np.int32)
    return ids, np.ones_like(ids, bool)


def _image_point(args, point, model, config, params, mach, rng) -> list[Record]:
    import torch

    b, g, n = point.prompts, point.samples, args.image_tokens
    ids, mask = _prompts(rng, b, args.image_prompt, BOI)
    ids_j, mask_j, key = jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0)

    def ours(tokens=n):
        out = generate_image_tokens(params, config, ids_j, mask_j, key, GUIDANCE, num_samples=g,
                                    num_tokens=tokens, bos_id=BOS, boi_id=BOI, pad_id=PAD)
        return jax.block_until_ready(out.tokens)

    def reference():
        with torch.no_grad():
            return model.generate(
                input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                generation_mode="image", do_sample=True, guidance_scale=GUIDANCE,
                num_return_sequences=g)

    first, ours_t = _timed(ours, args.repeats)
    _, prefill_t = _timed(lambda: ours(1), args.repeats)
    step_t = (ours_t - prefill_t) / (n - 1)
    wbytes = _weight_bytes(params, "image")
    ref_rate = None
    if not args.no_reference:
        vision = model.model.vision_model.config
        saved, vision.num_image_tokens = vision.num_image_tokens, n
        try:
            ref_rate = b * g * n / _timed(reference, args.repeats)[1]
        finally:
            vision.num_image_tokens = saved
    name = f"image {point.name}"
    return [
        Record(f"{name}: tokens/s", b * g * n / ours_t, ref_rate, "tok/s",
               note=f"{n} tokens per sample, CFG"),
        Record(f"{name}: compile", first - ours_t, None, "s"),
        Record(f"{name}: decode step", step_t * 1e3, None, "ms", note=f"{2 * b * g} rows"),
        Record(f"{name}: weight read / bandwidth", wbytes / step_t / mach.read_bandwidth, None,
               "fraction", note=f"{wbytes / 2**20:.0f} MiB per step"),
    ]


def _text_point(args, point, model, config, params, mach, rng) -> list[Record]:
    import torch

    b, g, n = point.prompts, point.samples, args.text_tokens
    ids, mask = _prompts(rng, b, args.text_prompt, None)
    ids_j, mask_j, key = jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0)

    def ours(tokens=n, prompts=ids_j, prompt_mask=mask_j, samples=g):
        out = generate_text(params, config, prompts, prompt_mask, key, num_samples=samples,
                            max_new_tokens=tokens, sampling=Sampling(), eos_id=-1, pad_id=PAD)
        return jax.block_until_ready(out.tokens)

    def reference():
        with torch.no_grad():
            return model.generate(
                input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)), do_sample=True,
                max_new_tokens=n, min_new_tokens=n, top_k=None, top_p=None,
                num_return_sequences=g)

    first, ours_t = _timed(ours, args.repeats)
    _, prefill_t = _timed(lambda: ours(1), args.repeats)
    step_t = (ours_t - prefill_t) / (n - 1)
    wbytes = _weight_bytes(params, "text")
    ref_rate = None if args.no_reference else b * g * n / _timed(reference, args.repeats)[1]
    name = f"text {point.name}"
    records = [
        Record(f"{name}: tokens/s", b * g * n / ours_t, ref_rate, "tok/s",
               note=f"{n} tokens per answer, prompt {args.text_prompt}"),
        Record(f"{name}: compile", first - ours_t, None, "s"),
        Record(f"{name}: decode step", step_t * 1e3, None, "ms", note=f"{b * g} rows"),
        Record(f"{name}: weight read / bandwidth", wbytes / step_t / mach.read_bandwidth, None,
               "fraction", note=f"{wbytes / 2**20:.0f} MiB per step"),
    ]
    if g > 1:  # what one shared prefill saves against prefilling G copies of the prompt
        copies = (jnp.repeat(ids_j, g, 0), jnp.repeat(mask_j, g, 0))
        _, copies_t = _timed(lambda: ours(prompts=copies[0], prompt_mask=copies[1], samples=1),
                             args.repeats)
        records.append(Record(f"{name}: shared prompt vs {g} copies", ours_t, copies_t, "s",
                              note="whole rollout; ratio < 1 = saving"))
    return records


def run(args) -> list[Record]:
    import torch

    model, config, params = build_models()
    mach = machine.measure()
    records = [Record("memory read bandwidth (measured)", mach.read_bandwidth / 1e9, None, "GB/s")]
    rng = np.random.default_rng(0)
    for point in [POINTS[p] for p in args.points.split(",")]:
        records += _image_point(args, point, model, config, params, mach, rng)
        records += _text_point(args, point, model, config, params, mach, rng)
    records.append(Record("torch threads", torch.get_num_threads(), None, "",
                          note=f"jax devices {jax.device_count()}, cpus {os.cpu_count()}"))
    return records
