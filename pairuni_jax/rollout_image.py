"""Image rollout: G samples of N image tokens per prompt with classifier-free guidance.

Each prompt gives two prompt rows: the conditional one, and the unconditional one where every id
except BOS and `<begin_of_image>` is replaced by pad (transformers' rule; the original Janus code
pads positions 1..-2, the same thing for an unpadded prompt). Both are prefilled once and shared by
the G samples (rollout_decode.py). Then a fixed-length loop of N steps: guided logits
l = u + w (c - u), sample softmax(l / T) (plus optional top-k/top-p), and feed the token's
gen_aligner(gen_embed(token)) to both rows of the pair.

Row layouts: "interleaved" (default, the original Janus: rows [c, u, c, u, ...], sample-major,
so a sharded batch keeps each cond/uncond pair on one device and guidance needs no communication)
or "stacked" (transformers' [cond rows; uncond rows]).
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

from pairuni_jax.models import janus
from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.rollout_decode import DecodeCache, Params, RowLayout, decode_step
from pairuni_jax.sampling import DEFAULT, Sampling, guide, sample, token_logprobs

LAYOUTS = ("interleaved", "stacked")


@flax.struct.dataclass
class ImageRollout:
    """tokens [B, G, N] int32 (row-major over the h x w grid); sample_logprobs [B, G, N]: under
    the guided, tempered distribution sampled from; model_logprobs [B, G, N]: log_softmax of the
    conditional branch's raw logits (the policy's own probability, as GRPO recomputes it);
    pixels [B, G, H, W, 3] uint8 or None."""

    tokens: jax.Array
    sample_logprobs: jax.Array
    model_logprobs: jax.Array
    pixels: jax.Array | None = None


def row_layout(layout: str, batch: int, num_samples: int) -> RowLayout:
    """The decode rows of a CFG rollout; axis "c" is 0 = conditional, 1 = unconditional."""
    if layout == "interleaved":
        return RowLayout((("b", batch), ("g", num_samples), ("c", 2)))
    if layout == "stacked":
        return RowLayout((("c", 2), ("b", batch), ("g", num_samples)))
    raise ValueError(f"unknown CFG layout {layout!r}; expected one of {LAYOUTS}")


def unconditional_ids(ids: jax.Array, bos_id: int, boi_id: int, pad_id: int) -> jax.Array:
    """Every id other than BOS and <begin_of_image> replaced by pad (left padding stays masked)."""
    return jnp.where((ids == bos_id) | (ids == boi_id), ids, pad_id)


def _split_cfg(layout: RowLayout, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows [R, ...] -> (cond, uncond), each [B * G, ...] in (prompt, sample) order."""
    x = layout.reorder(x, layout.names, ("c", "b", "g"))
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _merge_cfg(layout: RowLayout, x: jax.Array) -> jax.Array:
    """[B * G, ...] in (prompt, sample) order -> rows [R, ...], the same value for c and u."""
    return layout.reorder(jnp.concatenate([x, x]), ("c", "b", "g"), layout.names)


@functools.partial(jax.jit, static_argnames=(
    "config", "num_samples", "num_tokens", "sampling", "layout"))
def generate_image_tokens(params: Params, config: JanusConfig, ids: jax.Array, mask: jax.Array,
                          rng: jax.Array, guidance: float | jax.Array = 5.0, *,
                          num_samples: int = 1, num_tokens: int | None = None,
                          sampling: Sampling = DEFAULT, bos_id: int, boi_id: int, pad_id: int,
                          layout: str = "interleaved") -> ImageRollout:
    """Sample `num_samples` images of `num_tokens` (default: the VQ grid) tokens per prompt.

    ids/mask [B, L]: left-padded generation prompts ending with <begin_of_image>. `guidance` and
    the token ids are traced (changing them does not recompile). Deterministic for a given key.
    """
    b, length = ids.shape
    n = num_tokens or config.vq.num_tokens
    rows = row_layout(layout, b, num_samples)
    prompt_axes = tuple(a for a in rows.names if a != "g")  # prefill order of the prompt rows
    pair = jnp.stack([ids, unconditional_ids(ids, bos_id, boi_id, pad_id)])  # [2, B, L]
    pair_mask = jnp.stack([mask, mask])
    if prompt_axes == ("b", "c"):
        pair, pair_mask = jnp.swapaxes(pair, 0, 1), jnp.swapaxes(pair_mask, 0, 1)
    prompt_ids, prompt_mask = pair.reshape(2 * b, length), pair_mask.reshape(2 * b, length)

    embeds = janus.embed_tokens(params, config, prompt_ids)
    hidden, prefill = janus.forward(params, config, embeds, prompt_mask,
                                    janus.init_cache(config, 2 * b, length))
    cache = DecodeCache.from_prefill(prefill, rows, n)
    logits = janus.image_logits(params, config, hidden[:, -1])  # [2B, K]
    logits = rows.ungroup(jnp.broadcast_to(logits[:, None], (2 * b, num_samples, logits.shape[-1])))

    def pick(step, logits):
        cond, uncond = _split_cfg(rows, logits)  # [B * G, K] each
        guided = guide(cond, uncond, guidance)
        tokens, sample_lp = sample(jax.random.fold_in(rng, step), guided, sampling)
        return tokens, sample_lp, token_logprobs(cond, tokens)

    first = pick(0, logits)
    bufs = tuple(jnp.zeros((b * num_samples, n), x.dtype).at[:, 0].set(x) for x in first)

    def body(step, state):
        cache, bufs = state
        previous = jax.lax.dynamic_index_in_dim(bufs[0], step - 1, axis=1, keepdims=False)
        x = janus.image_token_embeds(params, config, _merge_cfg(rows, previous))  # [R, D]
        hidden, cache = decode_step(params, config, x, cache)
        picked = pick(step, janus.image_logits(params, config, hidden))
        bufs = tuple(jax.lax.dynamic_update_index_in_dim(buf, x, step, axis=1)
                     for buf, x in zip(bufs, picked, strict=True))
        return cache, bufs

    _, (tokens, sample_lp, model_lp) = jax.lax.fori_loop(1, n, body, (cache, bufs))
    shape = (b, num_samples, n)
    return ImageRollout(tokens=tokens.reshape(shape), sample_logprobs=sample_lp.reshape(shape),
                        model_logprobs=model_lp.reshape(shape))


@functools.partial(jax.jit, static_argnames=("config",))
def decode_pixels(params: Params, config: JanusConfig, tokens: jax.Array) -> jax.Array:
    """Image tokens [..., N] -> uint8 pixels [..., H, W, 3] through the VQ decoder."""
    grid = config.vq.grid
    lead = tokens.shape[:-1]
    if tokens.shape[-1] != grid * grid:
        raise ValueError(f"decode_pixels: {tokens.shape[-1]} tokens do not fill the VQ grid "
                         f"{grid}x{grid}")
    pixels = janus.vq_decode(params, config, tokens.reshape((-1, grid, grid)))
    pixels = janus.pixels_to_uint8(pixels)
    return pixels.reshape(lead + pixels.shape[1:])


def generate_images(params: Params, config: JanusConfig, ids: jax.Array, mask: jax.Array,
                    rng: jax.Array, guidance: float | jax.Array = 5.0, *,
                    with_pixels: bool = True, **kwargs) -> ImageRollout:
    """`generate_image_tokens`, then (with_pixels) the VQ-decoded images [B, G, H, W, 3] uint8."""
    out = generate_image_tokens(params, config, ids, mask, rng, guidance, **kwargs)
    if with_pixels:
        out = out.replace(pixels=decode_pixels(params, config, out.tokens))
    return out
