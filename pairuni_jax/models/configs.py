"""Model configs for Janus-Pro: frozen dataclasses (hashable: usable as jit static args), presets.

Presets: `janus_pro_1b()`, `janus_pro_7b()` (the released geometries), `tiny()` (random weights).
`from_hf_config(d)` reads a checkpoint's config.json in either the transformers format
(`text_config`/`vision_config`/`vq_config`, model_type "janus") or the original DeepSeek format
(`language_config`/`vision_config`/`aligner_config`/`gen_vision_config`/`gen_aligner_config`/
`gen_head_config`, model_type "multi_modality").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The decoder LM (DeepSeek-LLM, Llama architecture without biases)."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 16384


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    """The understanding vision tower (SigLIP ViT, no class token, no pooling)."""

    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """The VQ image tokenizer (LlamaGen VQ-16 architecture; other geometries for small images).

    The latent grid is image_size / 2**(len(ch_mult) - 1): 384 / 16 = 24 for the real model,
    e.g. 32 / 4 = 8 with ch_mult of length 3. Channels ch * ch_mult[i] must divide by num_groups.
    """

    image_size: int = 384
    codebook_size: int = 16384
    codebook_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    in_channels: int = 3
    out_channels: int = 3
    num_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid**2


@dataclasses.dataclass(frozen=True)
class JanusConfig:
    """The unified model. `dtype`: compute dtype; `param_dtype`: storage dtype of the params."""

    text: LlamaConfig = LlamaConfig()
    vision: SigLIPConfig = SigLIPConfig()
    vq: VQConfig = VQConfig()
    aligner_depth: int = 2  # understanding aligner: Linear (GELU Linear) x (depth - 1)
    gen_aligner_depth: int = 2  # generation aligner, same shape family
    gen_head_dim: int = 2048  # hidden width of gen_head (Linear GELU Linear)
    image_token_id: int = 100581  # <image_placeholder> id, kept for writing transformers configs
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for field in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, field))  # raises on an unknown dtype name
        t = self.text
        if t.num_heads % t.num_kv_heads:
            raise ValueError(f"num_heads {t.num_heads} not divisible by num_kv_heads "
                             f"{t.num_kv_heads}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **kwargs: Any) -> JanusConfig:
        return dataclasses.replace(self, **kwargs)


def janus_pro_1b(**kwargs: Any) -> JanusConfig:
    """Janus-Pro-1B geometry (hidden 2048, 24 layers, 16 heads)."""
    return JanusConfig(**kwargs)


def janus_pro_7b(**kwargs: Any) -> JanusConfig:
    """Janus-Pro-7B geometry (hidden 4096, 30 layers, 32 heads)."""
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_layers=30, num_heads=32, num_kv_heads=32
    )
    return JanusConfig(text=text, gen_head_dim=4096, **kwargs)


def tiny(**kwargs: Any) -> JanusConfig:
    """A few-hundred-kB random model with every component (grouped KV heads, 3-level VQ)."""
    text = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=512,
    )
    vision = SigLIPConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)
    vq = VQConfig(
        image_size=16, codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 1, 2),
        num_res_blocks=1, z_channels=32,
    )
    defaults = dict(text=text, vision=vision, vq=vq, gen_head_dim=64, image_token_id=511)
    return JanusConfig(**{**defaults, **kwargs})


# ----------------------------------------------------------------------------- config.json readers

# The original code builds its vision tower from a timm-style name; only these shapes exist there.
_SIGLIP_PRESETS = {
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, depth=24,
                                     num_heads=16, mlp_dim=4096),
}


def _llama_from_dict(d: dict[str, Any], where: str) -> LlamaConfig:
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError(f"{where}: attention_bias/mlp_bias are not supported (Janus has none)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"{where}: rope scaling {rope!r} is not supported")
    heads = d.get("num_attention_heads", 32)
    hidden = d.get("hidden_size", 4096)
    return LlamaConfig(
        vocab_size=d.get("vocab_size", 32000),
        hidden_size=hidden,
        intermediate_size=d.get("intermediate_size", 11008),
        num_layers=d.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=d.get("max_position_embeddings", 16384),
    )


def _from_transformers(d: dict[str, Any]) -> JanusConfig:
    tc, vc, qc = d.get("text_config") or {}, d.get("vision_config") or {}, d.get("vq_config") or {}
    text = _llama_from_dict(tc, "config.json: text_config")
    if vc.get("use_qk_norm"):
        raise ValueError("config.json: vision_config.use_qk_norm=true is not supported")
    if vc.get("hidden_act", "gelu") != "gelu" or qc.get("hidden_act", "gelu") != "gelu":
        raise ValueError("config.json: only hidden_act='gelu' (exact) is supported")
    width = vc.get("hidden_size", 1024)
    image_size = vc.get("image_size", 384)
    patch = vc.get("patch_size", 16)
    vision = SigLIPConfig(
        image_size=image_size, patch_size=patch, num_channels=vc.get("num_channels", 3),
        width=width, depth=vc.get("num_hidden_layers", 24),
        num_heads=vc.get("num_attention_heads", 16), mlp_dim=int(width * vc.get("mlp_ratio", 4.0)),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
    )
    ch_mult = tuple(qc.get("channel_multiplier", (1, 1, 2, 2, 4)))
    # transformers ties the VQ latent grid to the vision patch grid (num_patches).
    grid = image_size // patch
    vq = VQConfig(
        image_size=grid * 2 ** (len(ch_mult) - 1), codebook_size=qc.get("num_embeddings", 16384),
        codebook_dim=qc.get("embed_dim", 8), ch=qc.get("base_channels", 128), ch_mult=ch_mult,
        num_res_blocks=qc.get("num_res_blocks", 2), z_channels=qc.get("latent_channels", 256),
        num_groups=qc.get("num_groups", 32),
        in_channels=qc.get("in_channels", 3), out_channels=qc.get("out_channels", 3),
    )
    if qc.get("double_latent"):
        raise ValueError("config.json: vq_config.double_latent=true is not supported")
    for name, value in (("vision_config.projection_dim", vc.get("projection_dim", 2048)),
                        ("vq_config.image_token_embed_dim", qc.get("image_token_embed_dim", 2048))):
        if value != text.hidden_size:
            raise ValueError(f"config.json: {name}={value} must equal text hidden_size "
                             f"{text.hidden_size}")
    return JanusConfig(
        text=text, vision=vision, vq=vq, aligner_depth=vc.get("depth", 2),
        gen_aligner_depth=qc.get("num_hidden_layers", 2),
        gen_head_dim=qc.get("projection_dim", 2048),
        image_token_id=d.get("image_token_id", 100581),
    )


def _params(d: dict[str, Any], key: str) -> dict[str, Any]:
    if key not in d:
        raise ValueError(f"config.json: missing field {key!r} (original DeepSeek format)")
    return d[key].get("params") or {}


def _from_original(d: dict[str, Any]) -> JanusConfig:
    text = _llama_from_dict(d["language_config"], "config.json: language_config")
    vp = _params(d, "vision_config")
    name = vp.get("model_name", "siglip_large_patch16_384")
    if name not in _SIGLIP_PRESETS and "width" not in vp:
        raise ValueError(f"config.json: vision_config.params.model_name {name!r} is unknown; "
                         f"known: {sorted(_SIGLIP_PRESETS)}")
    vision_kw = dict(_SIGLIP_PRESETS.get(name, {}))
    vision_kw["image_size"] = vp.get("image_size", vision_kw.get("image_size", 384))
    # Extra keys (not in the released configs) let tests describe tiny towers.
    for key in ("patch_size", "width", "depth", "num_heads", "mlp_dim"):
        if key in vp:
            vision_kw[key] = vp[key]
    if vp.get("select_layer", -1) != -1:
        raise ValueError("config.json: vision_config.params.select_layer must be -1 (last layer)")
    vision = SigLIPConfig(**vision_kw)

    ap, gap, ghp = _params(d, "aligner_config"), _params(d, "gen_aligner_config"), _params(
        d, "gen_head_config")
    gvp = _params(d, "gen_vision_config")
    for where, p in (("aligner_config", ap), ("gen_aligner_config", gap)):
        if p.get("projector_type", "mlp_gelu") != "mlp_gelu":
            raise ValueError(f"config.json: {where}.params.projector_type must be 'mlp_gelu'")
    enc = tuple(gvp.get("encoder_ch_mult", (1, 1, 2, 2, 4)))
    dec = tuple(gvp.get("decoder_ch_mult", enc))
    if enc != dec:
        raise ValueError(f"config.json: gen_vision_config encoder_ch_mult {enc} != "
                         f"decoder_ch_mult {dec}")
    grid = vision.grid
    vq = VQConfig(
        image_size=gvp.get("image_size", grid * 2 ** (len(enc) - 1)),
        codebook_size=gvp.get("image_token_size", gvp.get("codebook_size", 16384)),
        codebook_dim=gvp.get("n_embed", gvp.get("codebook_embed_dim", 8)),
        ch=gvp.get("ch", 128), ch_mult=enc, num_res_blocks=gvp.get("num_res_blocks", 2),
        z_channels=gvp.get("z_channels", 256),
    )
    return JanusConfig(
        text=text, vision=vision, vq=vq, aligner_depth=ap.get("depth", 2),
        gen_aligner_depth=gap.get("depth", 2),
        gen_head_dim=ghp.get("image_token_embed", text.hidden_size),
        image_token_id=d.get("image_token_id", 100581),
    )


def from_hf_config(d: dict[str, Any], **kwargs: Any) -> JanusConfig:
    """JanusConfig from a checkpoint's config.json dict (transformers or original format).

    `kwargs` (e.g. dtype, param_dtype) override fields of the result.
    """
    if "language_config" in d:
        config = _from_original(d)
    elif "text_config" in d:
        config = _from_transformers(d)
    else:
        raise ValueError("config.json: neither 'text_config' (transformers format) nor "
                         "'language_config' (original DeepSeek format) is present")
    return config.replace(**kwargs) if kwargs else config
