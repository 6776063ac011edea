"""CLIP in Flax: a ViT image tower and a causal text tower mapped into one embedding space.

One module covers both checkpoint families the rewards use:
- open_clip (HPSv2 = open_clip ViT-H-14 + HPS v2.1 weights): exact (erf) GELU, LayerNorm eps 1e-5,
  `ln_pre` before the blocks, class token pooled after `ln_post`, projections without bias,
  text pooled at the end-of-text token found as the argmax of the ids (EOT has the largest id).
- transformers' CLIPModel: the same computation; OpenAI checkpoints use quick_gelu
  (x * sigmoid(1.702 x)); text pooled at the first `eos_token_id` (or argmax when the config's
  eos id is the legacy 2). Both are `CLIPConfig` fields.

Param tree (nn.scan stacks the n blocks of a tower on a leading layer axis, so ViT-H's 32 blocks
compile once; `{tower}` is `visual` or `text`):
```
visual/patch_embed/kernel [p, p, 3, W]          text/token_embedding/embedding [V, W]
visual/class_embedding [W]                      text/pos_embedding [L, W]
visual/pos_embedding [N+1, W]                   text/ln_final/{scale, bias}
visual/ln_pre/{scale, bias}                     text/proj/kernel [W, E]
visual/ln_post/{scale, bias}                    logit_scale []  (log inverse temperature)
visual/proj/kernel [W, E]
{tower}/transformer/blocks/ln_1/{scale, bias} [n, W]   (ln_2 alike)
{tower}/transformer/blocks/qkv/{kernel [n, W, 3W], bias [n, 3W]}  (q | k | v on the last axis)
{tower}/transformer/blocks/out/{kernel [n, W, W], bias [n, W]}
{tower}/transformer/blocks/fc1/{kernel [n, W, M], bias}, fc2/{kernel [n, M, W], bias}
```
Compute runs in `dtype` (bf16 on accelerators); LayerNorm statistics and the final L2
normalisation are always fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Sizes of both towers plus the few switches that differ between checkpoint families."""

    embed_dim: int
    # image tower
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_dim: int
    # text tower
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_dim: int
    act: str = "gelu"  # "gelu" (exact erf: open_clip, HPSv2) | "quick_gelu" (OpenAI CLIP)
    layer_norm_eps: float = 1e-5
    eos_id: int | None = None  # None: pool the text at argmax(ids); else at the first eos_id
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def vit_h_14(**overrides) -> CLIPConfig:
    """open_clip ViT-H-14 (the HPSv2 backbone): 632M image + 354M text parameters."""
    cfg = dict(
        embed_dim=1024, image_size=224, patch_size=14, vision_width=1280, vision_layers=32,
        vision_heads=16, vision_mlp_dim=5120, context_length=77, vocab_size=49408,
        text_width=1024, text_layers=24, text_heads=16, text_mlp_dim=4096, act="gelu",
    )
    return CLIPConfig(**{**cfg, **overrides})


def vit_l_14(**overrides) -> CLIPConfig:
    """OpenAI CLIP ViT-L/14 (transformers `openai/clip-vit-large-patch14`), the usual CLIP score."""
    cfg = dict(
        embed_dim=768, image_size=224, patch_size=14, vision_width=1024, vision_layers=24,
        vision_heads=16, vision_mlp_dim=4096, context_length=77, vocab_size=49408,
        text_width=768, text_layers=12, text_heads=12, text_mlp_dim=3072, act="quick_gelu",
        eos_id=49407,
    )
    return CLIPConfig(**{**cfg, **overrides})


def tiny(**overrides) -> CLIPConfig:
    """A 50K-parameter CLIP (open_clip defaults: GELU, argmax pooling, MLP 4x) for tests."""
    cfg = dict(
        embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
        vision_heads=4, vision_mlp_dim=128, context_length=16, vocab_size=99, text_width=24,
        text_layers=2, text_heads=4, text_mlp_dim=96, act="gelu",
    )
    return CLIPConfig(**{**cfg, **overrides})


def _activation(name: str):
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"CLIPConfig.act: unknown activation {name!r} (use 'gelu' or 'quick_gelu')")


class _LayerNorm(nn.Module):
    """LayerNorm with fp32 statistics (also under bf16 compute), output in the compute dtype."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class _Block(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x)). Scanned over layers."""

    width: int
    heads: int
    mlp_dim: int
    act: str
    eps: float
    causal: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, _):
        b, t, w = x.shape  # [B, T, W]
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        norm = lambda name: _LayerNorm(self.eps, self.dtype, self.param_dtype, name=name)  # noqa: E731

        h = norm("ln_1")(x)
        qkv = dense(3 * w, "qkv")(h).reshape(b, t, 3, self.heads, w // self.heads)
        attn = jax.nn.dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=self.causal
        )  # [B, T, H, Dh]
        x = x + dense(w, "out")(attn.reshape(b, t, w))

        h = norm("ln_2")(x)
        h = dense(self.mlp_dim, "fc1")(h)
        x = x + dense(w, "fc2")(_activation(self.act)(h))
        return x, None


class _Transformer(nn.Module):
    """`layers` blocks with stacked params (one compiled block body)."""

    width: int
    layers: int
    heads: int
    mlp_dim: int
    act: str
    eps: float
    causal: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        x, _ = stack(
            self.width, self.heads, self.mlp_dim, self.act, self.eps, self.causal,
            self.dtype, self.param_dtype, name="blocks",
        )(x, None)
        return x


def _l2_normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class VisionTower(nn.Module):
    """ViT: patchify, prepend the class token, add positions, ln_pre, blocks, ln_post(cls) @ W."""

    config: CLIPConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, 3] normalised by CLIP mean/std -> unnormalised features [B, E]."""
        c = self.config
        init = nn.initializers.normal(c.vision_width**-0.5)
        x = nn.Conv(
            c.vision_width, (c.patch_size, c.patch_size), strides=c.patch_size, use_bias=False,
            padding="VALID", dtype=c.dtype, param_dtype=c.param_dtype, name="patch_embed",
        )(pixels.astype(c.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, c.vision_width)  # [B, N, W], patches in row-major order
        cls = self.param("class_embedding", init, (c.vision_width,), c.param_dtype)
        pos = self.param("pos_embedding", init, (c.num_patches + 1, c.vision_width), c.param_dtype)
        cls = jnp.broadcast_to(cls.astype(c.dtype), (b, 1, c.vision_width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(c.dtype)  # [B, N+1, W]
        x = _LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="ln_pre")(x)
        x = _Transformer(
            c.vision_width, c.vision_layers, c.vision_heads, c.vision_mlp_dim, c.act,
            c.layer_norm_eps, False, c.dtype, c.param_dtype, name="transformer",
        )(x)
        pooled = _LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="ln_post")(x[:, 0])
        return nn.Dense(
            c.embed_dim, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, name="proj"
        )(pooled)


def eot_positions(ids: jax.Array, eos_id: int | None) -> jax.Array:
    """Index of the end-of-text token per row of ids [B, L]: argmax(ids), or the first eos_id."""
    if eos_id is None:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == eos_id, axis=-1)


class TextTower(nn.Module):
    """Causal transformer over token + position embeddings; ln_final; EOT feature @ proj."""

    config: CLIPConfig

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [B, L] int (L <= context_length) -> unnormalised features [B, E]."""
        c = self.config
        x = nn.Embed(
            c.vocab_size, c.text_width, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(0.02), name="token_embedding",
        )(ids)  # [B, L, W]
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.01), (c.context_length, c.text_width),
            c.param_dtype,
        )
        x = x + pos[: ids.shape[1]].astype(c.dtype)
        x = _Transformer(
            c.text_width, c.text_layers, c.text_heads, c.text_mlp_dim, c.act, c.layer_norm_eps,
            True, c.dtype, c.param_dtype, name="transformer",
        )(x)
        x = _LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="ln_final")(x)
        pooled = jnp.take_along_axis(x, eot_positions(ids, c.eos_id)[:, None, None], axis=1)[:, 0]
        return nn.Dense(
            c.embed_dim, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, name="proj"
        )(pooled)


class CLIP(nn.Module):
    """Both towers and the learned temperature. Methods return unnormalised features."""

    config: CLIPConfig

    def setup(self):
        self.visual = VisionTower(self.config)
        self.text = TextTower(self.config)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), (), jnp.float32
        )

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        return self.visual(pixels)

    def encode_text(self, ids: jax.Array) -> jax.Array:
        return self.text(ids)

    def __call__(self, pixels: jax.Array, ids: jax.Array):
        """-> (image features [B, E], text features [B', E], logit_scale), features unnormalised."""
        return self.encode_image(pixels), self.encode_text(ids), self.logit_scale


def init_params(config: CLIPConfig, rng: jax.Array) -> dict:
    """Random params (the `params` collection) for `config`; real weights come from the loaders."""
    pixels = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, config.context_length), jnp.int32)
    return CLIP(config).init(rng, pixels, ids)["params"]


def image_features(config: CLIPConfig, params: dict, pixels: jax.Array) -> jax.Array:
    """L2-normalised fp32 image features [B, E] from preprocessed pixels [B, S, S, 3]."""
    feats = CLIP(config).apply({"params": params}, pixels, method=CLIP.encode_image)
    return _l2_normalise(feats)


def text_features(config: CLIPConfig, params: dict, ids: jax.Array) -> jax.Array:
    """L2-normalised fp32 text features [B, E] from token ids [B, L]."""
    feats = CLIP(config).apply({"params": params}, ids, method=CLIP.encode_text)
    return _l2_normalise(feats)


def paired_similarity(
    config: CLIPConfig, params: dict, pixels: jax.Array, ids: jax.Array
) -> jax.Array:
    """cos(image_i, text_i) per row [B]: the diagonal of normalised image @ text.T, computed
    directly as a row-wise dot (no [B, B] matrix)."""
    img = image_features(config, params, pixels)
    txt = text_features(config, params, ids)
    return jnp.sum(img * txt, axis=-1)
