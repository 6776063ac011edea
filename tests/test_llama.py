"""The Llama decoder's fixed-size KV cache: prefill + single-token steps == one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pairuni_jax.models import configs, janus
from pairuni_jax.models.llama import KVCache, apply_rope, rope_cos_sin

CONFIG = configs.tiny()


@pytest.fixture(scope="module")
def params():
    return janus.init_params(CONFIG, 0)


def _embeds(params, batch, length, seed=0):
    ids = np.random.RandomState(seed).randint(0, CONFIG.text.vocab_size, size=(batch, length))
    return janus.embed_tokens(params, CONFIG, jnp.asarray(ids))


def _cached(params, x, mask, prefill, max_len):
    """Prefill `prefill` tokens, then one token at a time -> hidden [B, T, D], final cache."""
    cache = janus.init_cache(CONFIG, x.shape[0], max_len)
    h, cache = janus.forward(params, CONFIG, x[:, :prefill], mask[:, :prefill], cache)
    out = [h]
    for t in range(prefill, x.shape[1]):
        h, cache = janus.forward(params, CONFIG, x[:, t:t + 1], mask[:, t:t + 1], cache)
        out.append(h)
    return jnp.concatenate(out, axis=1), cache


# Every test uses batch 2, length 8, a cache of 8 slots and a prefill of 5, so the jitted forward
# compiles three times in total (full, prefill, single step).
B, T, PREFILL = 2, 8, 5


def test_prefill_plus_steps_equals_full_forward(params):
    x = _embeds(params, B, T)
    mask = jnp.ones((B, T), bool)
    full, none = janus.forward(params, CONFIG, x, mask)
    assert none is None
    steps, cache = _cached(params, x, mask, PREFILL, max_len=T)
    np.testing.assert_allclose(np.asarray(steps), np.asarray(full), atol=1e-5)
    assert int(cache.index) == T and cache.max_len == T
    assert cache.k[0].shape == (B, T, CONFIG.text.num_kv_heads, CONFIG.text.head_dim)
    assert bool(cache.mask.all())


def test_left_padding_does_not_change_a_row(params):
    """Row 0 = 3 pads + the first 5 tokens of row 1: its real tokens give row 1's first 5 states."""
    row = _embeds(params, 1, T, seed=1)
    pad = jnp.asarray(np.random.RandomState(2).normal(size=(1, 3, row.shape[-1])), row.dtype)
    x = jnp.concatenate([jnp.concatenate([pad, row[:, :5]], axis=1), row], axis=0)
    mask = jnp.asarray([[False] * 3 + [True] * 5, [True] * T])
    full, _ = janus.forward(params, CONFIG, x, mask)
    np.testing.assert_allclose(np.asarray(full[0, 3:]), np.asarray(full[1, :5]), atol=1e-5)
    steps, _ = _cached(params, x, mask, PREFILL, max_len=T)
    np.testing.assert_allclose(np.asarray(steps[0, 3:]), np.asarray(full[1, :5]), atol=1e-5)


def test_left_padded_batch_cached_equals_full(params):
    x = _embeds(params, B, T, seed=3)
    mask = jnp.asarray(np.arange(T)[None] >= np.array([[2], [6]]))  # pads end inside the prefill
    full, _ = janus.forward(params, CONFIG, x, mask)
    steps, _ = _cached(params, x, mask, PREFILL, max_len=T)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(steps)[m], np.asarray(full)[m], atol=1e-5)


def test_repeat_rows_for_group_sampling(params):
    x = _embeds(params, B, PREFILL, seed=4)
    cache = janus.init_cache(CONFIG, B, T)
    _, cache = janus.forward(params, CONFIG, x, jnp.ones((B, PREFILL), bool), cache)
    rep = cache.repeat_rows(3)
    assert isinstance(rep, KVCache) and rep.k[1].shape[0] == 6 and int(rep.index) == PREFILL
    np.testing.assert_array_equal(np.asarray(rep.v[0][3:6]),
                                  np.asarray(cache.v[0][1:2]).repeat(3, 0))
    nxt = _embeds(params, 2, 1, seed=5)
    h1, _ = janus.forward(params, CONFIG, nxt, jnp.ones((2, 1), bool), cache)
    h2, _ = janus.forward(params, CONFIG, jnp.repeat(nxt, 3, 0), jnp.ones((6, 1), bool), rep)
    np.testing.assert_allclose(np.asarray(h2[::3]), np.asarray(h1), atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    d = CONFIG.text.head_dim
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, d)), jnp.float32)

    def score(pq, pk):
        cq, sq = rope_cos_sin(jnp.array([[pq]]), d, 10000.0, jnp.float32)
        ck, sk = rope_cos_sin(jnp.array([[pk]]), d, 10000.0, jnp.float32)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


def test_forward_is_jittable_with_donated_cache(params):
    step = jax.jit(lambda p, x, m, c: janus.forward(p, CONFIG, x, m, c), donate_argnums=3)
    cache = janus.init_cache(CONFIG, B, T)
    x = _embeds(params, B, T, seed=6)
    for t in range(T):
        h, cache = step(params, x[:, t:t + 1], jnp.ones((B, 1), bool), cache)
    full, _ = janus.forward(params, CONFIG, x, jnp.ones((B, T), bool))
    np.testing.assert_allclose(np.asarray(h[:, 0]), np.asarray(full[:, -1]), atol=1e-5)
    assert step._cache_size() == 1  # one compilation for every decode step


def test_bf16_params_and_compute_stay_close_to_fp32(params):
    cfg16 = CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    x = _embeds(params, B, T, seed=7)
    mask = jnp.ones((B, T), bool)
    h32, _ = janus.forward(params, CONFIG, x, mask)
    cache = janus.init_cache(cfg16, B, T)
    assert cache.k[0].dtype == jnp.bfloat16
    h16, cache = janus.forward(p16, cfg16, x.astype(jnp.bfloat16), mask, cache)
    assert h16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(h16, np.float32) - np.asarray(h32)).max()
    assert err < 0.05 * np.abs(np.asarray(h32)).max()


def test_cache_overflow_is_an_error_when_called_eagerly(params):
    cache = janus.init_cache(CONFIG, B, T)
    x = _embeds(params, B, PREFILL, seed=8)
    _, cache = janus.forward(params, CONFIG, x, jnp.ones((B, PREFILL), bool), cache)
    with pytest.raises(ValueError, match="KV cache overflow: writing 5 tokens at slot 5"):
        janus.forward(params, CONFIG, x, jnp.ones((B, PREFILL), bool), cache)
