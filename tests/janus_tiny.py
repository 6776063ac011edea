"""Tiny random transformers Janus checkpoints for tests (built once per test process).

`tiny_checkpoint(kind)` -> TinyCheckpoint(torch model, transformers-format dir, our config/params):
  "gqa":   num_key_value_heads < num_attention_heads, a 2-level VQ, aligner depth 2;
  "deep":  plain multi-head attention, a 3-level VQ (attention blocks at the last encoder level,
           the first decoder level and both mids), aligner depth 3.
`write_original_format(src_dir, dst_dir, shards=...)` rewrites such a checkpoint under the original
DeepSeek names (fused qkv, [1, N, D] pos_embed, unused attn_pool / codebook_used tensors) as
pytorch_model.bin (or shards + pytorch_model.bin.index.json) with an original-style config.json.
Weights are re-drawn with O(1) activations (not transformers' 0.02 init) so parity figures mean
something.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

KINDS = ("gqa", "deep")
IMAGE_TOKEN_ID = 255
VOCAB = 256


def hf_config(kind: str):
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    gqa = kind == "gqa"
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2 if gqa else 4, head_dim=16,
        rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    vision = JanusVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
        mlp_ratio=2.0, projection_dim=64, depth=2 if gqa else 3,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8, num_embeddings=96, latent_channels=32, base_channels=32,
        channel_multiplier=[1, 2] if gqa else [1, 1, 2], num_res_blocks=1,
        projection_dim=64, image_token_embed_dim=64, num_hidden_layers=2,
    )
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=False)


def _redraw(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and ("norm" in name or name.endswith("weight")):
                p.copy_(1.0 + 0.1 * noise)  # norm scales
            elif p.ndim == 1:
                p.copy_(0.1 * noise)  # biases
            elif "embed" in name or "quantize" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))  # fan-in scaling


@dataclasses.dataclass
class TinyCheckpoint:
    model: Any  # transformers JanusForConditionalGeneration, fp32, eval mode
    path: str  # transformers-format directory (config.json + model.safetensors)
    config: Any  # our JanusConfig (fp32)
    params: Any  # our params, loaded from `path`


_ROOT: list[str] = []


def _tmp_root() -> str:
    if not _ROOT:
        _ROOT.append(tempfile.mkdtemp(prefix="janus_tiny_"))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


@functools.cache
def tiny_checkpoint(kind: str) -> TinyCheckpoint:
    import torch
    from transformers import JanusForConditionalGeneration

    from pairuni_jax.checkpoints import load_janus

    torch.manual_seed(0)
    model = JanusForConditionalGeneration(hf_config(kind)).eval()
    model.config._attn_implementation = "eager"
    _redraw(model, seed=KINDS.index(kind))
    path = os.path.join(_tmp_root(), kind)
    model.save_pretrained(path)
    config, params = load_janus(path)
    return TinyCheckpoint(model, path, config, params)


# ----------------------------------------------------------------------------- original format

def _aligner_original(prefix: str, rest: str) -> str:
    m = re.match(r"fc1\.(.*)", rest)
    if m:
        return f"{prefix}.layers.0.{m.group(1)}"
    k, tail = re.match(r"hidden_layers\.(\d+)\.(.*)", rest).groups()
    return f"{prefix}.layers.{2 * (int(k) + 1)}.{tail}"


def hf_to_original(name: str) -> str:
    """transformers name -> original DeepSeek name (q/k/v stay split; fused by the caller)."""
    rules = [
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_model\.embeddings\.position_embedding\.weight$",
         "vision_model.vision_tower.pos_embed"),
        (r"^model\.vision_model\.embeddings\.patch_embedding\.",
         "vision_model.vision_tower.patch_embed.proj."),
        (r"^model\.vision_model\.post_layernorm\.", "vision_model.vision_tower.norm."),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.",
         r"vision_model.vision_tower.blocks.\1.norm\2."),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.",
         r"vision_model.vision_tower.blocks.\1.attn.proj."),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.",
         r"vision_model.vision_tower.blocks.\1.attn."),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.",
         r"vision_model.vision_tower.blocks.\1.mlp."),
        (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
        (r"^model\.generation_head\.", "gen_head."),
        (r"^model\.generation_embeddings\.", "gen_embed."),
        (r"^model\.vqmodel\.encoder\.down\.", "gen_vision_model.encoder.conv_blocks."),
        (r"^model\.vqmodel\.decoder\.up\.", "gen_vision_model.decoder.conv_blocks."),
        (r"^model\.vqmodel\.", "gen_vision_model."),
        (r"\.block\.(\d+)\.", r".res.\1."),
        (r"\.mid\.block_1\.", ".mid.0."),
        (r"\.mid\.attn_1\.", ".mid.1."),
        (r"\.mid\.block_2\.", ".mid.2."),
    ]
    for prefix, orig in (("model.aligner.", "aligner"),
                         ("model.generation_aligner.", "gen_aligner")):
        if name.startswith(prefix):
            return _aligner_original(orig, name[len(prefix):])
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def original_state_dict(hf_state: dict[str, Any]) -> dict[str, Any]:
    """torch state dict under original names, from a transformers-named one."""
    import torch

    out = {}
    for name, t in hf_state.items():
        orig = hf_to_original(name)
        if re.search(r"\.attn\.[kv]_proj\.", orig):
            continue
        m = re.search(r"\.attn\.q_proj\.", orig)
        if m:
            parts = [hf_state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[orig.replace("q_proj", "qkv")] = torch.cat(parts, dim=0)
        elif orig.endswith("pos_embed"):
            out[orig] = t[None]
        else:
            out[orig] = t
    # Present in the released checkpoints, unused by the model.
    out["vision_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, 4)
    out["gen_vision_model.quantize.codebook_used"] = torch.zeros(8)
    return out


def original_config(hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """An original-format config.json (plus the geometry keys tiny towers need)."""
    t, v, q = hf_cfg["text_config"], hf_cfg["vision_config"], hf_cfg["vq_config"]
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
            "max_position_embeddings", "head_dim")
    language = {k: t[k] for k in keys}
    language["model_type"] = "llama"
    mlp = lambda depth, i, n: {"cls": "MlpProjector", "params": {  # noqa: E731
        "depth": depth, "input_dim": i, "n_embed": n, "projector_type": "mlp_gelu"}}
    return {
        "model_type": "multi_modality",
        "language_config": language,
        "vision_config": {"cls": "CLIPVisionTower", "params": {
            "image_size": v["image_size"], "model_name": "siglip_tiny", "select_layer": -1,
            "patch_size": v["patch_size"], "width": v["hidden_size"],
            "depth": v["num_hidden_layers"], "num_heads": v["num_attention_heads"],
            "mlp_dim": int(v["hidden_size"] * v["mlp_ratio"])}},
        "aligner_config": mlp(v["depth"], v["hidden_size"], v["projection_dim"]),
        "gen_vision_config": {"cls": "VQ-16", "params": {
            "image_token_size": q["num_embeddings"], "n_embed": q["embed_dim"],
            "ch": q["base_channels"], "encoder_ch_mult": q["channel_multiplier"],
            "decoder_ch_mult": q["channel_multiplier"], "num_res_blocks": q["num_res_blocks"],
            "z_channels": q["latent_channels"]}},
        "gen_aligner_config": mlp(q["num_hidden_layers"], q["embed_dim"], q["projection_dim"]),
        "gen_head_config": {"cls": "vision_head", "params": {
            "image_token_embed": q["projection_dim"], "image_token_size": q["num_embeddings"],
            "n_embed": t["hidden_size"]}},
        "image_token_id": hf_cfg["image_token_id"],
    }


def write_original_format(src_dir: str, dst_dir: str, shards: int = 1) -> None:
    """Rewrite a transformers-format tiny checkpoint in the original DeepSeek format."""
    import torch
    from safetensors.torch import load_file

    os.makedirs(dst_dir, exist_ok=True)
    state = original_state_dict(load_file(os.path.join(src_dir, "model.safetensors")))
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = original_config(json.load(f))
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if shards == 1:
        torch.save(state, os.path.join(dst_dir, "pytorch_model.bin"))
        return
    names = sorted(state)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in chunk}, os.path.join(dst_dir, file))
        weight_map.update({n: file for n in chunk})
    with open(os.path.join(dst_dir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
