"""The single-token LM step of the rollout, over a KV cache whose prompt part is shared.

A rollout decodes R = P x G rows: G samples of each of P prompt rows (for CFG images the
conditional and unconditional prompts are separate prompt rows). The prompt is prefilled once per
prompt row by `janus.forward`; its keys/values stay in a *prefix* cache of P rows that every
sample of that prompt attends to, and only the tokens generated after it live in a per-row
*suffix* cache. Compared with prefilling G copies (or broadcasting the prefill cache to G rows) this
saves G - 1 prefills, the memory of G - 1 prompt caches, and the reads of them at every step, which
matters for understanding prompts with an image (~600 prompt tokens vs ~100-300 answer tokens).

Cache layout is [rows, kv_heads, slots, head_dim] (per layer) so that the per-head scores and
weighted sums are contiguous matrix products on CPU as well as on accelerators.

The math is exactly the decoder layer of models/llama.py (RMSNorm in fp32, RoPE rotate_half,
softmax in fp32, SwiGLU), re-expressed for one token per row; tests check it against
`janus.forward` over a full sequence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.models.llama import KVCache, apply_rope, rope_cos_sin

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How decode rows map to (prompt row, sample): a row grid of named axes, major to minor.

    The sample axis is "g"; every other axis indexes prompt rows, which are ordered by those axes
    in the order they appear here. Text: (("b", B), ("g", G)). CFG images, the original Janus
    interleaving [c, u, c, u, ...]: (("b", B), ("g", G), ("c", 2)); transformers' [cond; uncond]:
    (("c", 2), ("b", B), ("g", G)).
    """

    axes: tuple[tuple[str, int], ...]

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def num_rows(self) -> int:
        return math.prod(n for _, n in self.axes)

    @property
    def num_samples(self) -> int:
        return self.sizes.get("g", 1)

    @property
    def num_prompts(self) -> int:
        return self.num_rows // self.num_samples

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    def reorder(self, x: jax.Array, src: tuple[str, ...], dst: tuple[str, ...]) -> jax.Array:
        """Rows of x [R, ...] ordered by the axes `src` (major to minor) -> ordered by `dst`."""
        sizes = self.sizes
        grid = x.reshape(tuple(sizes[a] for a in src) + x.shape[1:])
        perm = [src.index(a) for a in dst] + list(range(len(src), grid.ndim))
        return jnp.transpose(grid, perm).reshape(x.shape)

    @property
    def grouped_names(self) -> tuple[str, ...]:
        """Prompt axes in layout order, then the sample axis: the order of `group`."""
        return tuple(a for a in self.names if a != "g") + (("g",) if "g" in self.names else ())

    def group(self, x: jax.Array) -> jax.Array:
        """[R, ...] -> [P, G, ...] (prompt rows in prefill order, then samples)."""
        x = self.reorder(x, self.names, self.grouped_names)
        return x.reshape((self.num_prompts, self.num_samples) + x.shape[1:])

    def ungroup(self, x: jax.Array) -> jax.Array:
        """[P, G, ...] -> [R, ...], the inverse of `group`."""
        x = x.reshape((self.num_rows,) + x.shape[2:])
        return self.reorder(x, self.grouped_names, self.names)


@flax.struct.dataclass
class DecodeCache:
    """Prefix (prompt) keys/values shared by the samples of a prompt, per-row suffix keys/values.

    prefix_k/v: per layer [P, kvH, L, Dh]; prefix_mask [P, L] (left padding is False);
    k/v: per layer [R, kvH, N, Dh] for the generated tokens, slot i = i-th generated token;
    index []: suffix slots [0, index) are written; positions [R]: RoPE position of the next token.
    """

    prefix_k: tuple[jax.Array, ...]
    prefix_v: tuple[jax.Array, ...]
    prefix_mask: jax.Array
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    index: jax.Array
    positions: jax.Array
    layout: RowLayout = flax.struct.field(pytree_node=False)

    @classmethod
    def from_prefill(cls, prefill: KVCache, layout: RowLayout, max_new: int) -> DecodeCache:
        """Wrap a full prefill cache ([P, L, kvH, Dh], index == L) and add an empty suffix."""
        p, length, kv_heads, head_dim = prefill.k[0].shape
        if p != layout.num_prompts:
            raise ValueError(f"prefill has {p} rows, layout expects {layout.num_prompts}")
        to_heads = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731  [P, kvH, L, Dh]
        suffix = (layout.num_rows, kv_heads, max_new, head_dim)
        zeros = lambda: tuple(jnp.zeros(suffix, prefill.k[0].dtype) for _ in prefill.k)  # noqa: E731
        valid = jnp.sum(prefill.mask, axis=1, dtype=jnp.int32)  # [P]
        positions = layout.ungroup(jnp.broadcast_to(valid[:, None], (p, layout.num_samples)))
        return cls(prefix_k=tuple(map(to_heads, prefill.k)),
                   prefix_v=tuple(map(to_heads, prefill.v)), prefix_mask=prefill.mask,
                   k=zeros(), v=zeros(), index=jnp.zeros((), jnp.int32), positions=positions,
                   layout=layout)

    @property
    def max_new(self) -> int:
        return self.k[0].shape[2]


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    """As llama.RMSNorm: normalise in fp32, cast back, times the scale (in compute dtype)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * xf.astype(x.dtype).astype(dtype)


def _dense(x: jax.Array, p: Params, dtype) -> jax.Array:
    """x [R, in] @ kernel [in, out] in the compute dtype (as flax Dense without bias)."""
    return jnp.dot(x.astype(dtype), p["kernel"].astype(dtype))


def _attend(q, k_pre, v_pre, pre_mask, k_suf, v_suf, index, layout: RowLayout, dtype):
    """Softmax attention of one query per row over its prompt prefix and its own suffix.

    q [R, kvH, groups, Dh]; k/v_pre [P, kvH, L, Dh]; pre_mask [P, L];
    k/v_suf [R, kvH, N, Dh] with slots [0, index] valid. Returns [R, kvH, groups, Dh].
    """
    neg = jnp.finfo(jnp.float32).min
    scale = q.shape[-1] ** -0.5
    qg = layout.group(q)  # [P, G, kvH, groups, Dh]
    s_pre = jnp.einsum("pmkgd,pkld->pmkgl", qg, k_pre.astype(dtype),
                       preferred_element_type=jnp.float32) * scale
    s_pre = jnp.where(pre_mask[:, None, None, None, :], s_pre, neg)
    s_pre = layout.ungroup(s_pre)  # [R, kvH, groups, L]
    s_suf = jnp.einsum("rkgd,rknd->rkgn", q, k_suf.astype(dtype),
                       preferred_element_type=jnp.float32) * scale
    s_suf = jnp.where(jnp.arange(k_suf.shape[2]) <= index, s_suf, neg)
    top = jnp.maximum(jnp.max(s_pre, -1, keepdims=True), jnp.max(s_suf, -1, keepdims=True))
    e_pre, e_suf = jnp.exp(s_pre - top), jnp.exp(s_suf - top)
    total = jnp.sum(e_pre, -1, keepdims=True) + jnp.sum(e_suf, -1, keepdims=True)
    p_pre, p_suf = (e_pre / total).astype(dtype), (e_suf / total).astype(dtype)
    out = jnp.einsum("pmkgl,pkld->pmkgd", layout.group(p_pre), v_pre.astype(dtype))
    return layout.ungroup(out) + jnp.einsum("rkgn,rknd->rkgd", p_suf, v_suf.astype(dtype))


def decode_step(params: Params, config: JanusConfig, embeds: jax.Array,
                cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
    """One token per row through the LM: embeds [R, D] -> (final-normed hidden [R, D], cache)."""
    c, dtype = config.text, config.compute_dtype
    lm = params["language_model"]
    r = embeds.shape[0]
    groups = c.num_heads // c.num_kv_heads
    cos, sin = rope_cos_sin(cache.positions[:, None], c.head_dim, c.rope_theta, dtype)  # [R, 1, Dh]
    x = embeds.astype(dtype)
    new_k, new_v = [], []
    for i in range(c.num_layers):
        p = lm[f"layers_{i}"]
        a = p["self_attn"]
        h = _rms_norm(x, p["input_layernorm"]["scale"], c.rms_norm_eps, dtype)
        q = _dense(h, a["q_proj"], dtype).reshape(r, 1, c.num_heads, c.head_dim)
        k = _dense(h, a["k_proj"], dtype).reshape(r, 1, c.num_kv_heads, c.head_dim)
        v = _dense(h, a["v_proj"], dtype).reshape(r, c.num_kv_heads, 1, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = jnp.transpose(k, (0, 2, 1, 3))  # [R, kvH, 1, Dh]
        k_suf = jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k[i].dtype),
                                             (0, 0, cache.index, 0))
        v_suf = jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v[i].dtype),
                                             (0, 0, cache.index, 0))
        q = q.reshape(r, c.num_kv_heads, groups, c.head_dim)  # head h = kv * groups + g
        att = _attend(q, cache.prefix_k[i], cache.prefix_v[i], cache.prefix_mask, k_suf, v_suf,
                      cache.index, cache.layout, dtype)
        x = x + _dense(att.reshape(r, c.num_heads * c.head_dim), a["o_proj"], dtype)
        h = _rms_norm(x, p["post_attention_layernorm"]["scale"], c.rms_norm_eps, dtype)
        m = p["mlp"]
        gate, up = _dense(h, m["gate_proj"], dtype), _dense(h, m["up_proj"], dtype)
        x = x + _dense(jax.nn.silu(gate) * up, m["down_proj"], dtype)
        new_k.append(k_suf)
        new_v.append(v_suf)
    x = _rms_norm(x, lm["norm"]["scale"], c.rms_norm_eps, dtype)
    cache = cache.replace(k=tuple(new_k), v=tuple(new_v), index=cache.index + 1,
                          positions=cache.positions + 1)
    return x, cache
