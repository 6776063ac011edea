"""Text rollout: G sampled answers per (multimodal) prompt, one jitted program.

The prompt (left-padded ids, image features written over the `<image_placeholder>` positions) is
prefilled once per prompt; its cache is shared by the G samples (rollout_decode.py). The decode loop
is a `lax.while_loop` that stops as soon as every row has produced EOS or `max_new_tokens` tokens.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

from pairuni_jax.models import janus
from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.rollout_decode import DecodeCache, Params, RowLayout, decode_step
from pairuni_jax.sampling import Sampling, sample, token_logprobs


@flax.struct.dataclass
class TextRollout:
    """G answers per prompt. Positions after a row's EOS hold pad, mask False, log-probs 0.

    tokens [B, G, N] int32; mask [B, G, N] bool (generated tokens up to and including EOS);
    sample_logprobs [B, G, N]: log-prob under the distribution sampled from (after temperature,
    top-k, top-p); model_logprobs [B, G, N]: log_softmax of the raw logits (the policy at T = 1,
    what teacher forcing recomputes); lengths [B, G] int32 = mask.sum(-1).
    """

    tokens: jax.Array
    mask: jax.Array
    sample_logprobs: jax.Array
    model_logprobs: jax.Array
    lengths: jax.Array


def answer_mask(tokens: jax.Array, steps: jax.Array, eos_id: int) -> jax.Array:
    """Valid positions of tokens [R, N]: written (< steps) and not after the row's first EOS."""
    is_eos = tokens == eos_id
    eos_before = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
    return (jnp.arange(tokens.shape[1]) < steps) & ~eos_before


@functools.partial(jax.jit, static_argnames=("config", "num_samples", "max_new_tokens", "sampling"))
def generate_text(params: Params, config: JanusConfig, ids: jax.Array, mask: jax.Array,
                  rng: jax.Array, images: jax.Array | None = None, *, num_samples: int = 1,
                  max_new_tokens: int, sampling: Sampling, eos_id: int, pad_id: int,
                  image_token_id: int | None = None) -> TextRollout:
    """Sample `num_samples` answers for each left-padded prompt ids/mask [B, L].

    images [B, S, S, 3] in [-1, 1] (one per prompt) are encoded and written over the positions
    where ids == image_token_id. Shapes and (config, num_samples, max_new_tokens, sampling) are
    static; token ids are traced. Bucket prompt lengths (rollout.pad_prompts) so that new lengths
    reuse the compiled program. Deterministic for a given rng key.
    """
    b, length = ids.shape
    n = max_new_tokens
    features = image_mask = None
    if images is not None:
        if image_token_id is None:
            raise ValueError("generate_text: images given without image_token_id")
        features = janus.image_features(params, config, images)
        image_mask = ids == image_token_id
    embeds = janus.embed_prompt(params, config, ids, features, image_mask)
    hidden, prefill = janus.forward(params, config, embeds, mask,
                                    janus.init_cache(config, b, length))
    layout = RowLayout((("b", b), ("g", num_samples)))
    cache = DecodeCache.from_prefill(prefill, layout, n)
    logits = jnp.repeat(janus.text_logits(params, config, hidden[:, -1]), num_samples, axis=0)

    def pick(step, logits, done):
        tokens, sample_lp = sample(jax.random.fold_in(rng, step), logits, sampling)
        model_lp = token_logprobs(logits, tokens)
        tokens = jnp.where(done, pad_id, tokens)
        return tokens, jnp.where(done, 0.0, sample_lp), jnp.where(done, 0.0, model_lp)

    r = layout.num_rows
    not_done = jnp.zeros((r,), bool)
    first = pick(0, logits, not_done)
    bufs = tuple(jnp.zeros((r, n), x.dtype).at[:, 0].set(x) for x in first)
    state = (jnp.int32(1), cache, first[0] == eos_id, bufs)

    def cond(state):
        step, _, done, _ = state
        return (step < n) & ~jnp.all(done)

    def body(state):
        step, cache, done, bufs = state
        previous = jax.lax.dynamic_index_in_dim(bufs[0], step - 1, axis=1, keepdims=False)
        x = janus.embed_tokens(params, config, previous)  # [R, D]
        hidden, cache = decode_step(params, config, x, cache)
        picked = pick(step, janus.text_logits(params, config, hidden), done)
        bufs = tuple(jax.lax.dynamic_update_index_in_dim(buf, x, step, axis=1)
                     for buf, x in zip(bufs, picked, strict=True))
        return step + 1, cache, done | (picked[0] == eos_id), bufs

    steps, _, _, (tokens, sample_lp, model_lp) = jax.lax.while_loop(cond, body, state)
    valid = answer_mask(tokens, steps, eos_id)
    tokens = jnp.where(valid, tokens, pad_id)
    shape = (b, num_samples, n)
    return TextRollout(
        tokens=tokens.reshape(shape), mask=valid.reshape(shape),
        sample_logprobs=jnp.where(valid, sample_lp, 0.0).reshape(shape),
        model_logprobs=jnp.where(valid, model_lp, 0.0).reshape(shape),
        lengths=jnp.sum(valid, axis=1, dtype=jnp.int32).reshape(b, num_samples))
