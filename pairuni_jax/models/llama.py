"""Llama decoder (DeepSeek-LLM) with attention over an explicit, fixed-size KV cache.

Every call writes its T new keys/values into the cache at slot `cache.index` and attends over all
S_max slots with a mask (key validity AND causal by slot), so prefill (T = prompt length) and decode
(T = 1) are the same code and the single-token step costs O(S_max) per layer, nothing more.
Left-padded batches: `mask [B, T]` marks real tokens; positions are per row
`(#valid tokens already cached) + cumsum(mask) - 1`, as transformers' generate computes them.

Numerics follow transformers' LlamaModel: RMSNorm in fp32 then `weight * x.astype(input dtype)`,
RoPE in the rotate_half layout with cos/sin computed in fp32, softmax in fp32, SwiGLU, no biases.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from pairuni_jax.models.configs import LlamaConfig


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values [B, S_max, kvH, Dh], key validity [B, S_max], next write slot []."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array  # [B, S_max] bool: slot holds a real (non-pad) token
    index: jax.Array  # [] int32: slots [0, index) are written

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))  # noqa: E731
        return cls(k=zeros(), v=zeros(), mask=jnp.zeros((batch, max_len), bool),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def repeat_rows(self, n: int) -> KVCache:
        """Each row repeated n times consecutively ([r0, r0, r1, r1, ...]), e.g. G samples."""
        rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
        return self.replace(k=tuple(map(rep, self.k)), v=tuple(map(rep, self.v)),
                            mask=rep(self.mask))


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(x.dtype).astype(self.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, ...]:
    """cos, sin [B, T, Dh] for integer positions [B, T] (fp32 math, then cast)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, Dh]; rotate_half layout (first half paired with second half)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        dense = lambda n: nn.Dense(n, use_bias=False, dtype=self.dtype,  # noqa: E731
                                   param_dtype=self.param_dtype)
        self.q_proj = dense(c.num_heads * c.head_dim)
        self.k_proj = dense(c.num_kv_heads * c.head_dim)
        self.v_proj = dense(c.num_kv_heads * c.head_dim)
        self.o_proj = dense(c.hidden_size)

    def __call__(self, x, cos, sin, k_cache, v_cache, index, attn_mask):
        """x [B, T, D]; caches [B, S, kvH, Dh]; attn_mask [B, T, S] -> (out, k_cache, v_cache)."""
        c = self.config
        b, t, d = x.shape
        groups = c.num_heads // c.num_kv_heads
        x = x.reshape(b * t, d)  # 2-D projections: see `MLP`
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))

        q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)  # head h = kv * groups + g
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k_cache.astype(self.dtype),
                            preferred_element_type=jnp.float32) * c.head_dim**-0.5
        scores = jnp.where(attn_mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, kvH, G, T, S]
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache.astype(self.dtype))
        out = self.o_proj(out.reshape(b * t, c.num_heads * c.head_dim)).reshape(b, t, d)
        return out, k_cache, v_cache


class MLP(nn.Module):
    """SwiGLU on rows flattened to [B * T, D].

    A Dense over [B, T, D] has a weight gradient contracting two axes (B and T), which XLA:CPU
    lowers with a transposed copy of every activation gradient; over [B * T, D] it is one plain
    matrix product (about 1.5x faster for the MLP's backward on CPU, the same on TPU/GPU).
    """

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,  # noqa: E731
                                         param_dtype=self.param_dtype, name=name)
        rows = x.reshape(-1, x.shape[-1])  # [B * T, D]
        gate = dense(c.intermediate_size, "gate_proj")(rows)
        up = dense(c.intermediate_size, "up_proj")(rows)
        return dense(c.hidden_size, "down_proj")(jax.nn.silu(gate) * up).reshape(x.shape)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.input_layernorm = RMSNorm(self.config.rms_norm_eps, **kw)
        self.self_attn = Attention(self.config, **kw)
        self.post_attention_layernorm = RMSNorm(self.config.rms_norm_eps, **kw)
        self.mlp = MLP(self.config, **kw)

    def __call__(self, x, cos, sin, k_cache, v_cache, index, attn_mask):
        h, k_cache, v_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, k_cache, v_cache, index, attn_mask)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_cache, v_cache


class LlamaModel(nn.Module):
    """Token embedding, decoder layers `layers_{i}`, final `norm` (no lm_head: see janus.py)."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, **kw)
        self.layers = [DecoderLayer(c, **kw) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, **kw)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.embed_tokens(ids)

    def __call__(self, embeds: jax.Array, mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """embeds [B, T, D], mask [B, T] -> (final-normed hidden [B, T, D], updated cache).

        Without a cache, a temporary one of length T is used and None is returned.
        """
        b, t, _ = embeds.shape
        c = self.config
        given = cache
        if cache is None:
            cache = KVCache.init(c, b, t, self.dtype)
        mask = mask.astype(bool)
        index = cache.index
        key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))  # [B, S]
        slots = jnp.arange(cache.max_len)
        causal = slots[None, :] <= (index + jnp.arange(t))[:, None]  # [T, S]
        attn_mask = key_mask[:, None, :] & causal[None]  # [B, T, S]
        past = jnp.sum(cache.mask, axis=1, dtype=jnp.int32)[:, None]  # [B, 1]
        positions = past + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1  # [B, T]
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, self.dtype)

        x = embeds.astype(self.dtype)
        new_k, new_v = [], []
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v, strict=True):
            x, k_cache, v_cache = layer(x, cos, sin, k_cache, v_cache, index, attn_mask)
            new_k.append(k_cache)
            new_v.append(v_cache)
        x = self.norm(x)
        if given is None:
            return x, None
        return x, KVCache(k=tuple(new_k), v=tuple(new_v), mask=key_mask, index=index + t)
