"""Load CLIP weights into `pairuni_jax.models.clip` params.

Two source formats:
- open_clip state dicts (`.pt`/`.bin`, read with `torch.load(weights_only=True)`), optionally
  wrapped as {"state_dict": ...} and/or prefixed "module." — this is how HPSv2 ships
  `HPS_v2.1_compressed.pt` (open_clip ViT-H-14 names). The architecture is not stored in the file:
  pass the `CLIPConfig` (default: ViT-H-14).
- transformers CLIPModel directories (config.json + model.safetensors, or sharded with
  model.safetensors.index.json), e.g. `openai/clip-vit-large-patch14`.

Every expected tensor is checked: missing, unexpected or wrongly shaped tensors raise ONE error
listing each offending name (never a silent random init).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pairuni_jax.models import clip

# Tensors that may be present and are not weights (buffers older exporters wrote).
_IGNORED_SUFFIXES = ("position_ids", "attn_mask")


class CheckpointError(ValueError):
    """A checkpoint that does not match the expected CLIP architecture."""


class _Source:
    """Tensors by name with bookkeeping of what was read, missing and left over."""

    def __init__(self, path: str, tensors: Mapping[str, np.ndarray]):
        self.path = path
        self.tensors = dict(tensors)
        self.used: set[str] = set()
        self.missing: list[str] = []

    def get(self, name: str) -> np.ndarray | None:
        if name not in self.tensors:
            self.missing.append(name)
            return None
        self.used.add(name)
        return self.tensors[name]

    def unexpected(self) -> list[str]:
        return sorted(
            k for k in self.tensors if k not in self.used and not k.endswith(_IGNORED_SUFFIXES)
        )


def _t(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else x.T


def _stack(parts: list[np.ndarray | None]) -> np.ndarray | None:
    return None if any(p is None for p in parts) else np.stack(parts)


def _concat(parts: list[np.ndarray | None], axis: int) -> np.ndarray | None:
    return None if any(p is None for p in parts) else np.concatenate(parts, axis=axis)


# -- per-format name maps: each returns {our param path: array or None (missing)} ---------------

def _blocks_open_clip(src: _Source, prefix: str, layers: int) -> dict[str, Any]:
    def per_layer(fn: Callable[[str], np.ndarray | None]) -> np.ndarray | None:
        return _stack([fn(f"{prefix}.resblocks.{i}.") for i in range(layers)])

    return {
        "blocks/ln_1/scale": per_layer(lambda p: src.get(p + "ln_1.weight")),
        "blocks/ln_1/bias": per_layer(lambda p: src.get(p + "ln_1.bias")),
        "blocks/qkv/kernel": per_layer(lambda p: _t(src.get(p + "attn.in_proj_weight"))),
        "blocks/qkv/bias": per_layer(lambda p: src.get(p + "attn.in_proj_bias")),
        "blocks/out/kernel": per_layer(lambda p: _t(src.get(p + "attn.out_proj.weight"))),
        "blocks/out/bias": per_layer(lambda p: src.get(p + "attn.out_proj.bias")),
        "blocks/ln_2/scale": per_layer(lambda p: src.get(p + "ln_2.weight")),
        "blocks/ln_2/bias": per_layer(lambda p: src.get(p + "ln_2.bias")),
        "blocks/fc1/kernel": per_layer(lambda p: _t(src.get(p + "mlp.c_fc.weight"))),
        "blocks/fc1/bias": per_layer(lambda p: src.get(p + "mlp.c_fc.bias")),
        "blocks/fc2/kernel": per_layer(lambda p: _t(src.get(p + "mlp.c_proj.weight"))),
        "blocks/fc2/bias": per_layer(lambda p: src.get(p + "mlp.c_proj.bias")),
    }


def _open_clip_map(src: _Source, cfg: clip.CLIPConfig) -> dict[str, Any]:
    conv = src.get("visual.conv1.weight")  # [W, 3, p, p] OIHW -> HWIO
    out = {
        "visual/patch_embed/kernel": None if conv is None else conv.transpose(2, 3, 1, 0),
        "visual/class_embedding": src.get("visual.class_embedding"),
        "visual/pos_embedding": src.get("visual.positional_embedding"),
        "visual/ln_pre/scale": src.get("visual.ln_pre.weight"),
        "visual/ln_pre/bias": src.get("visual.ln_pre.bias"),
        "visual/ln_post/scale": src.get("visual.ln_post.weight"),
        "visual/ln_post/bias": src.get("visual.ln_post.bias"),
        "visual/proj/kernel": src.get("visual.proj"),  # already [W, E]
        "text/token_embedding/embedding": src.get("token_embedding.weight"),
        "text/pos_embedding": src.get("positional_embedding"),
        "text/ln_final/scale": src.get("ln_final.weight"),
        "text/ln_final/bias": src.get("ln_final.bias"),
        "logit_scale": src.get("logit_scale"),
    }
    # text_projection is a [W, E] parameter in CLIP, an nn.Linear ([E, W] weight) in some variants
    if "text_projection.weight" in src.tensors:
        out["text/proj/kernel"] = _t(src.get("text_projection.weight"))
    else:
        out["text/proj/kernel"] = src.get("text_projection")
    for tower, prefix, layers in (
        ("visual", "visual.transformer", cfg.vision_layers),
        ("text", "transformer", cfg.text_layers),
    ):
        for k, v in _blocks_open_clip(src, prefix, layers).items():
            out[f"{tower}/transformer/{k}"] = v
    return out


def _blocks_hf(src: _Source, prefix: str, layers: int) -> dict[str, Any]:
    def per_layer(fn: Callable[[str], np.ndarray | None]) -> np.ndarray | None:
        return _stack([fn(f"{prefix}.encoder.layers.{i}.") for i in range(layers)])

    def qkv(p: str, kind: str) -> np.ndarray | None:
        parts = [src.get(f"{p}self_attn.{n}_proj.{kind}") for n in "qkv"]
        if kind == "weight":
            return _concat([_t(x) for x in parts], axis=1)  # [W, 3W]
        return _concat(parts, axis=0)

    return {
        "blocks/ln_1/scale": per_layer(lambda p: src.get(p + "layer_norm1.weight")),
        "blocks/ln_1/bias": per_layer(lambda p: src.get(p + "layer_norm1.bias")),
        "blocks/qkv/kernel": per_layer(lambda p: qkv(p, "weight")),
        "blocks/qkv/bias": per_layer(lambda p: qkv(p, "bias")),
        "blocks/out/kernel": per_layer(lambda p: _t(src.get(p + "self_attn.out_proj.weight"))),
        "blocks/out/bias": per_layer(lambda p: src.get(p + "self_attn.out_proj.bias")),
        "blocks/ln_2/scale": per_layer(lambda p: src.get(p + "layer_norm2.weight")),
        "blocks/ln_2/bias": per_layer(lambda p: src.get(p + "layer_norm2.bias")),
        "blocks/fc1/kernel": per_layer(lambda p: _t(src.get(p + "mlp.fc1.weight"))),
        "blocks/fc1/bias": per_layer(lambda p: src.get(p + "mlp.fc1.bias")),
        "blocks/fc2/kernel": per_layer(lambda p: _t(src.get(p + "mlp.fc2.weight"))),
        "blocks/fc2/bias": per_layer(lambda p: src.get(p + "mlp.fc2.bias")),
    }


def _hf_map(src: _Source, cfg: clip.CLIPConfig) -> dict[str, Any]:
    conv = src.get("vision_model.embeddings.patch_embedding.weight")
    out = {
        "visual/patch_embed/kernel": None if conv is None else conv.transpose(2, 3, 1, 0),
        "visual/class_embedding": src.get("vision_model.embeddings.class_embedding"),
        "visual/pos_embedding": src.get("vision_model.embeddings.position_embedding.weight"),
        "visual/ln_pre/scale": src.get("vision_model.pre_layrnorm.weight"),
        "visual/ln_pre/bias": src.get("vision_model.pre_layrnorm.bias"),
        "visual/ln_post/scale": src.get("vision_model.post_layernorm.weight"),
        "visual/ln_post/bias": src.get("vision_model.post_layernorm.bias"),
        "visual/proj/kernel": _t(src.get("visual_projection.weight")),
        "text/token_embedding/embedding": src.get(
            "text_model.embeddings.token_embedding.weight"
        ),
        "text/pos_embedding": src.get("text_model.embeddings.position_embedding.weight"),
        "text/ln_final/scale": src.get("text_model.final_layer_norm.weight"),
        "text/ln_final/bias": src.get("text_model.final_layer_norm.bias"),
        "text/proj/kernel": _t(src.get("text_projection.weight")),
        "logit_scale": src.get("logit_scale"),
    }
    for tower, prefix, layers in (
        ("visual", "vision_model", cfg.vision_layers),
        ("text", "text_model", cfg.text_layers),
    ):
        for k, v in _blocks_hf(src, prefix, layers).items():
            out[f"{tower}/transformer/{k}"] = v
    return out


def _assemble(src: _Source, flat: dict[str, Any], cfg: clip.CLIPConfig) -> dict:
    """Check every tensor against the shapes `init_params` would make; cast; unflatten."""
    expected = traverse_util.flatten_dict(
        jax.eval_shape(lambda k: clip.init_params(cfg, k), jax.random.key(0)), sep="/"
    )
    problems = [f"missing tensor {name}" for name in dict.fromkeys(src.missing)]
    problems += [f"unexpected tensor {name}" for name in src.unexpected()]
    params = {}
    for path, want in expected.items():
        got = flat.get(path)
        if got is None:
            continue  # already reported as missing under its source name
        shape = tuple(np.shape(got))
        if shape != tuple(want.shape):
            problems.append(f"{path}: expected shape {tuple(want.shape)}, got {shape}")
            continue
        dtype = jnp.float32 if path == "logit_scale" else cfg.param_dtype
        params[path] = jnp.asarray(np.asarray(got, np.float32), dtype=dtype)
    if problems:
        raise CheckpointError(
            f"{src.path}: checkpoint does not match the CLIP config "
            f"({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
    return traverse_util.unflatten_dict(params, sep="/")


def _torch_state_dict(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path}: reading an open_clip .pt checkpoint needs torch (pip install torch)"
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is {type(t).__name__}, not a tensor")
        name = name.removeprefix("module.")
        out[name] = t.detach().to(torch.float32).numpy()
    return out


def load_open_clip(
    path: str, config: clip.CLIPConfig | None = None, *, dtype: Any = jnp.float32
) -> tuple[clip.CLIPConfig, dict]:
    """open_clip state dict (.pt, e.g. HPSv2's `HPS_v2.1_compressed.pt`) -> (config, params).

    `config` gives the architecture (default `clip.vit_h_14()`); params are stored in `dtype`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file. For HPSv2 download HPS_v2.1_compressed.pt from the Hugging "
            "Face repo xswu/HPSv2 and pass its local path."
        )
    cfg = config or clip.vit_h_14()
    cfg = _with_dtype(cfg, dtype)
    src = _Source(path, _torch_state_dict(path))
    return cfg, _assemble(src, _open_clip_map(src, cfg), cfg)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> clip.CLIPConfig:
    """transformers CLIPConfig dict (config.json) -> CLIPConfig."""
    t, v = hf["text_config"], hf["vision_config"]
    acts = {t.get("hidden_act", "quick_gelu"), v.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise CheckpointError(f"config.json: unsupported hidden_act {sorted(acts)}")
    eos = t.get("eos_token_id", 49407)
    eps = {t.get("layer_norm_eps", 1e-5), v.get("layer_norm_eps", 1e-5)}
    if len(eps) != 1:
        raise CheckpointError(f"config.json: towers use different layer_norm_eps {sorted(eps)}")
    cfg = clip.CLIPConfig(
        embed_dim=hf.get("projection_dim", 512),
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        vision_width=v.get("hidden_size", 768),
        vision_layers=v.get("num_hidden_layers", 12),
        vision_heads=v.get("num_attention_heads", 12),
        vision_mlp_dim=v.get("intermediate_size", 3072),
        context_length=t.get("max_position_embeddings", 77),
        vocab_size=t.get("vocab_size", 49408),
        text_width=t.get("hidden_size", 512),
        text_layers=t.get("num_hidden_layers", 12),
        text_heads=t.get("num_attention_heads", 8),
        text_mlp_dim=t.get("intermediate_size", 2048),
        act=acts.pop(),
        layer_norm_eps=eps.pop(),
        # transformers pools at argmax(ids) when the config carries the legacy eos id 2
        eos_id=None if eos == 2 else int(eos),
    )
    return _with_dtype(cfg, **overrides) if overrides else cfg


def _with_dtype(cfg: clip.CLIPConfig, dtype: Any = None, **kw) -> clip.CLIPConfig:
    if dtype is not None:
        kw["param_dtype"] = dtype
        kw["dtype"] = dtype
    return dataclasses.replace(cfg, **kw)


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json (expected a transformers "
        "CLIPModel directory, e.g. a local copy of openai/clip-vit-large-patch14)"
    )


def load_hf_clip(path: str, *, dtype: Any = jnp.float32) -> tuple[clip.CLIPConfig, dict]:
    """transformers CLIPModel directory (config.json + safetensors) -> (config, params)."""
    from safetensors import safe_open

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (expected a transformers CLIPModel dir)")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), dtype=dtype)
    tensors = {}
    for file in _safetensors_files(path):
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    src = _Source(path, tensors)
    return cfg, _assemble(src, _hf_map(src, cfg), cfg)
