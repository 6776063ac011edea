"""Sampling: exact distributions (chi-square against many draws), filters, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from pairuni_jax.sampling import GREEDY, Sampling, guide, sample, token_logprobs, warp

V = 12
DRAWS = 40_000


def _logits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=V).astype(np.float32), rng.normal(size=V).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _draw(logits_row: np.ndarray, sampling: Sampling, seed: int = 0) -> np.ndarray:
    """DRAWS tokens from one row, as one batch of identical rows (one key)."""
    batch = jnp.broadcast_to(jnp.asarray(logits_row), (DRAWS, V))
    tokens, _ = jax.jit(sample, static_argnums=2)(jax.random.key(seed), batch, sampling)
    return np.asarray(tokens)


def _chi2_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit of the draws to probs (tokens with p = 0 must never appear)."""
    counts = np.bincount(tokens, minlength=V)
    probs = np.asarray(probs, np.float64)
    support = probs > 0
    if counts[~support].any():
        return 0.0
    expected = DRAWS * probs[support] / probs[support].sum()
    return stats.chisquare(counts[support], expected).pvalue


def test_cfg_with_temperature_matches_the_exact_distribution_and_rejects_wrong_formulas():
    cond, uncond = _logits(0)
    w, temperature = 3.0, 0.7
    mixed = np.asarray(guide(jnp.asarray(cond), jnp.asarray(uncond), w))
    np.testing.assert_allclose(mixed, uncond + w * (cond - uncond), rtol=1e-6, atol=1e-6)

    tokens = _draw(mixed, Sampling(temperature=temperature))
    exact = _softmax((uncond + w * (cond - uncond)) / temperature)
    assert _chi2_pvalue(tokens, exact) > 1e-4
    # The same draws must reject plausible mistakes: the test has power.
    wrong = {
        "no temperature": _softmax(uncond + w * (cond - uncond)),
        "temperature multiplied": _softmax((uncond + w * (cond - uncond)) * temperature),
        "guidance around cond": _softmax((cond + w * (cond - uncond)) / temperature),
        "weight w - 1": _softmax((uncond + (w - 1) * (cond - uncond)) / temperature),
        "cond only": _softmax(cond / temperature),
        "probabilities mixed": (lambda p: p / p.sum())(np.maximum(
            _softmax(uncond / temperature)
            + w * (_softmax(cond / temperature) - _softmax(uncond / temperature)), 0)),
    }
    for name, probs in wrong.items():
        assert _chi2_pvalue(tokens, probs) < 1e-12, name


def test_temperature_above_one_matches():
    cond, _ = _logits(1)
    tokens = _draw(cond, Sampling(temperature=1.8), seed=3)
    assert _chi2_pvalue(tokens, _softmax(cond / 1.8)) > 1e-4
    assert _chi2_pvalue(tokens, _softmax(cond)) < 1e-12


def test_top_k_samples_only_the_k_best_with_renormalised_probabilities():
    cond, _ = _logits(2)
    k, temperature = 4, 1.3
    tokens = _draw(cond, Sampling(temperature=temperature, top_k=k), seed=1)
    keep = np.argsort(-cond)[:k]
    probs = np.zeros(V)
    probs[keep] = _softmax(cond[keep] / temperature)
    assert set(np.unique(tokens)) == set(keep)
    assert _chi2_pvalue(tokens, probs) > 1e-4


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    cond, _ = _logits(3)
    temperature, p = 1.5, 0.6
    tempered = _softmax(cond / temperature)
    order = np.argsort(-tempered)
    mass_before = np.cumsum(tempered[order]) - tempered[order]
    keep = order[mass_before < p]
    assert 1 < len(keep) < V  # the case is not trivial
    probs = np.zeros(V)
    probs[keep] = tempered[keep] / tempered[keep].sum()
    tokens = _draw(cond, Sampling(temperature=temperature, top_p=p), seed=2)
    assert set(np.unique(tokens)) == set(keep)
    assert _chi2_pvalue(tokens, probs) > 1e-4


def test_top_p_matches_transformers_warper(torch):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(4).normal(size=(6, 50)).astype(np.float32) * 2
    for top_k, top_p in ((None, 0.3), (None, 0.9), (10, 0.8), (5, None)):
        ours = np.asarray(warp(jnp.asarray(logits), Sampling(top_k=top_k, top_p=top_p)))
        ref = torch.from_numpy(logits)
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p:
            ref = TopPLogitsWarper(top_p)(None, ref)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref.numpy()))


def test_greedy_is_argmax_and_log_probs_are_of_the_sampled_distribution():
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(3, V)), jnp.float32)
    tokens, logp = sample(jax.random.key(0), logits, GREEDY)
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
    np.testing.assert_allclose(logp, jnp.max(jax.nn.log_softmax(logits), -1), atol=1e-6)

    s = Sampling(temperature=0.5, top_k=3)
    tokens, logp = sample(jax.random.key(1), logits, s)
    np.testing.assert_allclose(logp, token_logprobs(warp(logits, s), tokens), atol=1e-6)
    top3 = jax.nn.log_softmax(jnp.sort(logits, -1)[:, -3:] / 0.5)  # renormalised over the top 3
    assert np.all(np.asarray(logp)[:, None] >= np.asarray(top3).min(-1, keepdims=True) - 1e-6)


def test_same_key_same_tokens_different_key_different_tokens():
    logits = jnp.zeros((64, 1000))
    a, _ = sample(jax.random.key(7), logits, Sampling())
    b, _ = sample(jax.random.key(7), logits, Sampling())
    c, _ = sample(jax.random.key(8), logits, Sampling())
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.asarray(a) != np.asarray(c)) > 0.9


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(top_k=0), dict(top_p=0.0),
                                    dict(top_p=1.5)])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError, match="Sampling"):
        Sampling(**kwargs)
