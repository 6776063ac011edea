"""SigLIP ViT understanding encoder of Janus, and the MLP aligners.

Patch conv, learned position embedding, pre-LN blocks (q/k/v split; the original checkpoint's
fused `qkv` is split by the loader), exact (erf) GELU, LayerNorm eps 1e-6, final LayerNorm, no
class token and no pooling: the output is one feature per patch [B, N, D].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pairuni_jax.models.configs import SigLIPConfig


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, as torch.nn.GELU() / transformers' "gelu" everywhere in Janus."""
    return jax.nn.gelu(x, approximate=False)


class MlpProjector(nn.Module):
    """`fc1`, then (GELU, `hidden_layers_{k}`) x (depth - 1): the aligners of Janus."""

    features: int
    depth: int = 2
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc1 = nn.Dense(self.features, **kw)
        self.hidden_layers = [nn.Dense(self.features, **kw) for _ in range(self.depth - 1)]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(gelu(x))
        return x


class VisionEmbeddings(nn.Module):
    config: SigLIPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        x = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="patch_embedding")(pixels)
        b, h, w, d = x.shape
        pos = self.param("position_embedding", nn.initializers.normal(0.02),
                         (c.num_tokens, c.width), self.param_dtype)
        if h * w != c.num_tokens:
            raise ValueError(f"vision tower expects {c.image_size}px images ({c.num_tokens} "
                             f"patches), got {pixels.shape[1]}x{pixels.shape[2]}")
        return x.reshape(b, h * w, d) + pos.astype(self.dtype)  # [B, N, D], row-major patches


class VisionAttention(nn.Module):
    config: SigLIPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        b, n, d = x.shape
        hd = d // c.num_heads
        dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                      name=name)
        q = dense("q_proj")(x).reshape(b, n, c.num_heads, hd)
        k = dense("k_proj")(x).reshape(b, n, c.num_heads, hd)
        v = dense("v_proj")(x).reshape(b, n, c.num_heads, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * hd**-0.5, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
        return dense("projection_layer")(out)


class VisionMLP(nn.Module):
    config: SigLIPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = gelu(nn.Dense(self.config.mlp_dim, name="fc1", **kw)(x))
        return nn.Dense(self.config.width, name="fc2", **kw)(x)


def _layer_norm(config: SigLIPConfig, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class VisionBlock(nn.Module):
    config: SigLIPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.config
        x = x + VisionAttention(c, name="self_attn", **kw)(
            _layer_norm(c, self.dtype, self.param_dtype, "layer_norm1")(x))
        return x + VisionMLP(c, name="mlp", **kw)(
            _layer_norm(c, self.dtype, self.param_dtype, "layer_norm2")(x))


class SigLIPVisionModel(nn.Module):
    """pixels [B, H, W, 3] (normalised to [-1, 1]) -> patch features [B, N, width]."""

    config: SigLIPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = VisionEmbeddings(c, **kw)
        self.layers = [VisionBlock(c, **kw) for _ in range(c.depth)]
        self.post_layernorm = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False,
                                           **kw)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.embeddings(pixels.astype(self.dtype))
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)
