"""`python -m pairuni_jax.bench reward`: CLIP-score throughput, ours (jitted JAX) vs transformers.

Both sides do the same work from decoded uint8 images [B, 384, 384, 3] (Janus-Pro's output size)
and token ids [B, 77]: bicubic antialiased resize to 224 + CLIP normalisation, the image and text
towers, L2 normalisation and the per-row dot. The model is a small random CLIP (ViT-Ti/16-like
towers, fp32, loaded through our transformers-checkpoint loader), so the run takes seconds on CPU.
Tokenisation (host, identical for both) is timed separately.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from pairuni_jax.bench.common import Record, time_fn


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=16, help="images (and prompts) per call")
    parser.add_argument("--image_px", type=int, default=384, help="side of the decoded images")
    parser.add_argument("--width", type=int, default=192, help="tower width (both towers)")
    parser.add_argument("--layers", type=int, default=4, help="blocks per tower")
    parser.add_argument("--repeats", type=int, default=5)


def _hf_model(args):
    import torch
    import transformers

    torch.manual_seed(0)
    tower = dict(
        hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.width // 64), hidden_act="gelu",
    )
    cfg = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(tower, image_size=224, patch_size=16),
        projection_dim=args.width,
    )
    return transformers.CLIPModel(cfg).eval()


def _torch_scores(torch, model, images_u8, ids):
    """The reference pipeline: HPSv2's tensor transform, then transformers' CLIPModel."""
    from pairuni_jax.clip_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    with torch.no_grad():
        x = images_u8.permute(0, 3, 1, 2).float() / 255  # [B, 3, H, W]
        x = torch.nn.functional.interpolate(
            x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False
        )
        mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
        std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
        img = model.get_image_features(pixel_values=(x - mean) / std).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
        return (img * txt).sum(-1)


def run(args) -> list[Record]:
    import torch

    from pairuni_jax import clip_checkpoints, clip_processing
    from pairuni_jax.rl.rewards import ClipScore

    model = _hf_model(args)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        config, params = clip_checkpoints.load_hf_clip(d)

    prompts = [f"a photo of {n} red circles next to a blue square" for n in range(args.batch)]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.image_px, args.image_px, 3), dtype=np.uint8)

    records = []
    tok_path = clip_processing.open_clip_bpe_path()
    if tok_path is not None:
        tok = clip_processing.load_tokenizer(tok_path)
        t_tok = time_fn(lambda: clip_processing.tokenize(tok, prompts), repeats=args.repeats)
        ids = clip_processing.tokenize(tok, prompts)
        records.append(Record("tokenize (host, shared)", args.batch / t_tok, None, "prompts/s"))
    else:  # no open_clip vocabulary installed: random ids with EOT last
        ids = rng.integers(1, 49406, (args.batch, 77)).astype(np.int32)
        ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 0

    scorer = ClipScore(config, params, tokenizer=None)
    images_j, ids_j = jax.device_put(jnp.asarray(images)), jax.device_put(jnp.asarray(ids))
    t0 = time.perf_counter()
    ours_scores = scorer._jitted(scorer.params, images_j, ids_j).block_until_ready()
    compile_s = time.perf_counter() - t0
    t_ours = time_fn(
        lambda: scorer._jitted(scorer.params, images_j, ids_j).block_until_ready(),
        repeats=args.repeats,
    )

    images_t, ids_t = torch.from_numpy(images), torch.from_numpy(ids.astype(np.int64))
    ref_scores = _torch_scores(torch, model, images_t, ids_t).numpy()
    t_ref = time_fn(lambda: _torch_scores(torch, model, images_t, ids_t), repeats=args.repeats)
    err = float(np.abs(np.asarray(ours_scores) - ref_scores).max())

    shape = f"B={args.batch} {args.image_px}px->224, W={args.width} L={args.layers}"
    records += [
        Record(f"CLIP score ({shape})", args.batch / t_ours, args.batch / t_ref, "images/s",
               note=f"max |score diff| {err:.1e}; torch threads {torch.get_num_threads()}"),
        Record("first call (trace + compile)", compile_s, None, "s"),
    ]
    return records
