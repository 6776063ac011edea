"""Pair-GRPO objective: exact to its definitions, and micro-batching equal to the full batch."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pairuni_jax.rl import grpo


def test_group_advantages_match_definition_for_both_std_conventions():
    r = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    for ddof in (0, 1):
        want = (r - r.mean(-1, keepdims=True)) / (r.std(-1, ddof=ddof, keepdims=True) + 1e-3)
        got = grpo.group_advantages(jnp.asarray(r), eps=1e-3, ddof=ddof)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_group_advantages_match_torch_std(torch):
    r = np.random.default_rng(1).uniform(size=(3, 4)).astype(np.float32)
    t = torch.tensor(r)
    want = ((t - t.mean(-1, keepdim=True)) / (t.std(-1, keepdim=True) + 1e-4)).numpy()
    np.testing.assert_allclose(grpo.group_advantages(jnp.asarray(r)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ddof", [0, 1])
def test_equal_rewards_give_zero_advantage_never_nan(ddof):
    r = jnp.array([[0.1] * 7, [1.0] * 7, [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.9]])
    a = grpo.group_advantages(r, eps=0.0, ddof=ddof)
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a[:2], 0.0)
    assert a[2, -1] > 0 and np.all(a[2, :-1] < 0)
    single = grpo.group_advantages(jnp.array([[3.0], [5.0]]), eps=0.0, ddof=ddof)  # G = 1
    np.testing.assert_array_equal(single, 0.0)


def test_pair_weights_modes():
    s = jnp.array([0.64, 0.81, 0.36, -0.2])
    aligned = jnp.array([True, False, False, False])
    np.testing.assert_allclose(grpo.pair_weights(s, aligned, "sqrt"), [1, 0.9, 0.6, 0.0])
    np.testing.assert_allclose(grpo.pair_weights(s, aligned, "linear"), [1, 0.81, 0.36, 0.0])
    np.testing.assert_allclose(grpo.pair_weights(s, aligned, "none"), [1, 1, 1, 1])
    with pytest.raises(ValueError, match="pair weighting"):
        grpo.pair_weights(s, aligned, "cube")


def test_pair_weight_applied_after_normalisation_to_both_tasks():
    rng = np.random.default_rng(2)
    ru, rg = rng.uniform(size=(3, 4)), rng.uniform(size=(3, 4))
    w = jnp.array([1.0, 0.5, 0.25])
    cfg = grpo.GRPOConfig()
    adv = grpo.pair_advantages({"und": jnp.asarray(ru), "gen": jnp.asarray(rg)}, w, cfg)
    for task, r in (("und", ru), ("gen", rg)):
        plain = grpo.group_advantages(jnp.asarray(r))  # [3, 4]
        np.testing.assert_allclose(adv[task], (np.asarray(w)[:, None] * plain).reshape(-1))
    with pytest.raises(ValueError, match=r"rewards\['und'\]"):
        grpo.pair_advantages({"und": jnp.ones((2, 4))}, w, cfg)


def test_token_log_probs_and_teacher_forcing_shift():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11), jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    got = grpo.next_token_log_probs(logits, ids)
    assert got.shape == (2, 4) and got.dtype == jnp.float32
    full = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    want = np.take_along_axis(full[:, :-1], np.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_token_log_probs_gradient_is_one_hot_minus_softmax():
    logits = jax.random.normal(jax.random.key(2), (3, 4, 9))
    ids = jax.random.randint(jax.random.key(3), (3, 4), 0, 9)
    weights = jax.random.uniform(jax.random.key(4), (3, 4))
    grad = jax.grad(lambda x: jnp.sum(weights * grpo.token_log_probs(x, ids)))(logits)
    want = weights[..., None] * (jax.nn.one_hot(ids, 9) - jax.nn.softmax(logits, axis=-1))
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_guided_logits():
    c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, 3.0])
    np.testing.assert_allclose(grpo.guided_logits(c, u, 5.0), [3.0, -2.0])
    np.testing.assert_allclose(grpo.guided_logits(c, u, 1.0), c)


def _surrogate_reference(rho, a, lo, hi):
    """Straight from the definition, with explicit cases per sign of A."""
    if a >= 0:
        return -a * min(rho, 1 + hi)
    return -a * max(rho, 1 - lo)


def test_clipped_surrogate_every_sign_of_advantage():
    rhos = np.array([0.3, 0.79, 0.8, 0.95, 1.0, 1.1, 1.3, 2.5])
    advs = np.array([-2.0, -0.5, 0.0, 0.7, 3.0])
    lo, hi = 0.2, 0.28
    logp = jnp.log(jnp.asarray(np.repeat(rhos[None], len(advs), 0), jnp.float32))
    old = jnp.zeros_like(logp)
    loss, clipped, _ = grpo.clipped_surrogate(logp, old, jnp.asarray(advs), lo, hi)
    for i, j in itertools.product(range(len(advs)), range(len(rhos))):
        want = _surrogate_reference(rhos[j], advs[i], lo, hi)
        np.testing.assert_allclose(loss[i, j], want, rtol=1e-5, atol=1e-6)
        active = (advs[i] > 0 and rhos[j] > 1 + hi) or (advs[i] < 0 and rhos[j] < 1 - lo)
        assert bool(clipped[i, j]) == active, (advs[i], rhos[j])
    # The gradient stops exactly where the clip is active, and only there (A != 0).
    grad = jax.grad(
        lambda lp: jnp.sum(grpo.clipped_surrogate(lp, old, jnp.asarray(advs), lo, hi)[0])
    )(logp)
    nonzero_adv = np.asarray(advs)[:, None] != 0
    np.testing.assert_array_equal(np.asarray(grad) == 0, np.asarray(clipped) | ~nonzero_adv)


def test_old_log_probs_carry_no_gradient():
    logp = jnp.array([[0.1, -0.3]])
    g = jax.grad(lambda old: jnp.sum(grpo.clipped_surrogate(logp, old, jnp.ones(1), 0.2, 0.2)[0]))(
        jnp.zeros((1, 2))
    )
    np.testing.assert_array_equal(g, 0.0)


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    lp = jax.random.normal(jax.random.key(3), (100,))
    ref = jax.random.normal(jax.random.key(4), (100,))
    kl = grpo.k3_kl(lp, ref)
    assert np.all(kl >= 0)
    np.testing.assert_allclose(grpo.k3_kl(lp, lp), 0.0)
    d = np.asarray(ref - lp)
    np.testing.assert_allclose(kl, np.exp(d) - d - 1, rtol=1e-5, atol=1e-6)


def _ragged_batch(seed, n, t):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, t + 1, size=n)
    lengths[0] = t
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    return mask, rng.normal(size=(n, t)).astype(np.float32)


def test_aggregation_modes_match_their_definitions():
    mu, lu = _ragged_batch(0, 6, 5)
    mg, lg = _ragged_batch(1, 4, 9)
    masks = {"und": jnp.asarray(mu), "gen": jnp.asarray(mg)}

    def agg(mode):
        w = grpo.loss_weights(masks, mode)
        return {t: float(jnp.sum(w[t] * x)) for t, x in (("und", lu), ("gen", lg))}

    tokens = mu.sum() + mg.sum()
    got = agg("token_mean")
    np.testing.assert_allclose(
        got["und"] + got["gen"], ((mu * lu).sum() + (mg * lg).sum()) / tokens, rtol=1e-6
    )

    def seq_means(m, x):
        return [(m[i] * x[i]).sum() / m[i].sum() for i in range(len(m)) if m[i].sum() > 0]

    su, sg = seq_means(mu, lu), seq_means(mg, lg)
    got = agg("seq_mean")
    np.testing.assert_allclose(got["und"] + got["gen"], np.mean(su + sg), rtol=1e-6)
    got = agg("task_sum")
    np.testing.assert_allclose(got["und"], np.mean(su), rtol=1e-6)
    np.testing.assert_allclose(got["gen"], np.mean(sg), rtol=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        grpo.loss_weights(masks, "mean_of_means")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="pair_weighting"):
        grpo.GRPOConfig(pair_weighting="cos")
    with pytest.raises(ValueError, match="aggregation"):
        grpo.GRPOConfig(aggregation="sum")
    with pytest.raises(ValueError, match="std_ddof"):
        grpo.GRPOConfig(std_ddof=2)


def test_beta_positive_needs_reference_and_adds_kl():
    mask = jnp.ones((2, 3))
    lp = jnp.full((2, 3), -1.0)
    batch = grpo.TaskBatch(lp, jnp.zeros(2), mask / 6, mask)
    cfg = grpo.GRPOConfig(beta=0.1)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.task_loss(lp, batch, cfg)
    ref = jnp.full((2, 3), -1.5)
    loss, m = grpo.task_loss(lp, grpo.TaskBatch(lp, jnp.zeros(2), mask / 6, mask, ref), cfg)
    d = -0.5
    np.testing.assert_allclose(loss, 0.1 * (np.exp(d) - d - 1), rtol=1e-6)
    np.testing.assert_allclose(m["ref_kl"] / m["tokens"], np.exp(d) - d - 1, rtol=1e-6)
    loss0, m0 = grpo.task_loss(lp, batch, grpo.GRPOConfig())  # beta = 0: no reference needed
    assert float(loss0) == 0.0 and "ref_kl" not in m0


def _toy_problem(mode):
    """A linear 'policy' over a vocab of 7 for two tasks, with ragged masks and old log-probs."""
    k = jax.random.split(jax.random.key(5), 8)
    n_u, t_u, n_g, t_g, d, v = 8, 5, 8, 6, 4, 7
    params = {"w": jax.random.normal(k[0], (d, v)), "b": jnp.zeros(v)}
    feats = {
        "und": jax.random.normal(k[1], (n_u, t_u, d)),
        "gen": jax.random.normal(k[2], (n_g, t_g, d)),
    }
    ids = {
        "und": jax.random.randint(k[3], (n_u, t_u), 0, v),
        "gen": jax.random.randint(k[4], (n_g, t_g), 0, v),
    }
    masks = {t: jnp.asarray(_ragged_batch(i + 10, *ids[t].shape)[0]) for i, t in enumerate(ids)}
    weights = grpo.loss_weights(masks, mode)

    def logps(p, f, i):
        return grpo.token_log_probs(f @ p["w"] + p["b"], i)

    old = {
        t: logps(params, feats[t], ids[t]) + 0.3 * jax.random.normal(k[6], ids[t].shape)
        for t in ids
    }
    adv = {"und": jax.random.normal(k[7], (n_u,)), "gen": -jax.random.normal(k[7], (n_g,))}
    batch = {
        t: {
            "f": feats[t],
            "ids": ids[t],
            "tb": grpo.TaskBatch(old[t], adv[t], weights[t], masks[t]),
        }
        for t in ids
    }
    return params, batch, logps


@pytest.mark.parametrize("mode", grpo.AGGREGATIONS)
def test_micro_batch_accumulation_equals_full_batch(mode):
    params, batch, logps = _toy_problem(mode)
    cfg = grpo.GRPOConfig(aggregation=mode, eps_low=0.1, eps_high=0.15)

    def loss_and_grad(mb):
        def loss_fn(p):
            lp = {t: logps(p, mb[t]["f"], mb[t]["ids"]) for t in mb}
            losses, metrics = grpo.pair_grpo_loss(lp, {t: mb[t]["tb"] for t in mb}, cfg)
            return losses["total"], (losses, metrics)

        (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return aux, g

    full = jax.jit(loss_and_grad)(batch)
    acc = jax.jit(lambda b: grpo.accumulate(loss_and_grad, b, 4))(batch)
    for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    (losses, metrics), _ = full
    np.testing.assert_allclose(losses["total"], losses["und"] + losses["gen"], rtol=1e-6)
    fm = grpo.finalize_metrics(metrics)
    assert 0 < float(fm["und/clip_fraction"]) < 1 and float(fm["gen/approx_kl"]) > 0


def test_micro_batch_split_errors_name_the_leaf():
    with pytest.raises(ValueError, match=r"\['x'\].*num_micro_batches=4"):
        grpo.split_micro_batches({"x": jnp.zeros((6, 2))}, 4)


def test_pair_grpo_loss_checks_shapes():
    mask = jnp.ones((2, 3))
    tb = grpo.TaskBatch(jnp.zeros((2, 3)), jnp.zeros(2), mask, mask)
    with pytest.raises(ValueError, match="task 'und'"):
        grpo.pair_grpo_loss({"und": jnp.zeros((2, 4))}, {"und": tb}, grpo.GRPOConfig())
    with pytest.raises(ValueError, match="tasks differ"):
        grpo.pair_grpo_loss({"gen": jnp.zeros((2, 3))}, {"und": tb}, grpo.GRPOConfig())
