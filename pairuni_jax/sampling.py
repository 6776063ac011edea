"""Next-token sampling over logits [B, V]: greedy, temperature, top-k, top-p, and CFG mixing.

The order of operations follows transformers' logits warpers (and the original Janus code):
classifier-free guidance on the raw logits, then temperature, then top-k, then top-p, then a
categorical draw. Everything is a pure function of (rng, logits), so the same key gives the same
tokens. Masked-out tokens get -inf; the categorical draw is Gumbel-max (`jax.random.categorical`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token (hashable: a static argument under jit).

    greedy: argmax of the (guided) logits; temperature/top_k/top_p are then ignored.
    temperature: logits are divided by it before softmax (> 0).
    top_k: keep the k most likely tokens (None = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (None = 1).
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"Sampling.temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"Sampling.top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1] or None, got {self.top_p}")


GREEDY = Sampling(greedy=True)
DEFAULT = Sampling()  # temperature 1, no filtering


def guide(cond: jax.Array, uncond: jax.Array, weight: float | jax.Array) -> jax.Array:
    """Classifier-free guidance on logits: uncond + weight * (cond - uncond), in fp32."""
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    return uncond + weight * (cond - uncond)


def _mask_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row (ties at the k-th value are kept), -inf elsewhere."""
    if k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _mask_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest prefix of the sorted distribution whose mass reaches p (at least 1)."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    # The smallest kept logit is the threshold; ties with it are kept as well.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def warp(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The logits of the distribution actually sampled from: temperature, top-k, top-p (fp32)."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        logits = _mask_top_k(logits, sampling.top_k)
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = _mask_top_p(logits, sampling.top_p)
    return logits


def sample(rng: jax.Array, logits: jax.Array, sampling: Sampling) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from logits [B, V].

    Returns (tokens [B] int32, log-probs [B] fp32 of the drawn tokens under the sampled
    distribution, i.e. log_softmax(warp(logits))). Greedy returns the argmax and its log-prob
    under softmax(logits).
    """
    warped = warp(logits, sampling)
    if sampling.greedy:
        tokens = jnp.argmax(warped, axis=-1).astype(jnp.int32)
    else:
        tokens = jax.random.categorical(rng, warped, axis=-1).astype(jnp.int32)
    return tokens, token_logprobs(warped, tokens)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits)[tokens]: logits [B, V], tokens [B] -> [B] fp32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
