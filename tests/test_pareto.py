"""Pareto min-norm combiner: solver properties, brute-force agreement, guards, pytrees, devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pairuni_jax.rl import pareto

PARETO = pareto.CombinerConfig(mode="pareto")


def _grads(seed, k, shared=0.0, dtype=np.float32):
    """Per-objective gradients as a small pytree; leaves [k, ...] with different scales per task."""
    rng = np.random.default_rng(seed)
    shapes = {"dense": {"kernel": (3, 4), "bias": (4,)}, "head": {"kernel": (5, 2)}}
    scales = rng.uniform(0.1, 10.0, size=k)

    def leaf(shape):
        common = rng.normal(size=shape)
        g = np.stack([s * (rng.normal(size=shape) + shared * common) for s in scales])
        return jnp.asarray(g, dtype)

    return jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))


def _matrix(grads_k):
    return np.concatenate(
        [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in jax.tree.leaves(grads_k)], 1
    )


def _vector(tree):
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


@functools.lru_cache
def _jitted(config):
    return jax.jit(lambda g, losses, p: pareto.combine(g, losses, config, p))


def _combine(grads, config=PARETO, losses=None, present=None):
    k = jax.tree.leaves(grads)[0].shape[0]
    losses = jnp.ones(k) if losses is None else losses
    present = jnp.ones(k, bool) if present is None else present
    return _jitted(config)(grads, losses, present)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_min_norm_properties_on_random_pytrees(k):
    for seed in range(6):
        g = _grads(seed, k, shared=float(seed % 3))
        d, info = _combine(g)
        w = np.asarray(info["weights"][0], np.float64)
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-6
        G, dv = _matrix(g), _vector(d)
        norms = np.linalg.norm(G, axis=1)
        tol = 1e-5 * norms.max() ** 2
        assert np.linalg.norm(dv) <= norms.min() * (1 + 1e-5)
        assert np.all(G @ dv >= dv @ dv - tol), (seed, G @ dv, dv @ dv)
        np.testing.assert_allclose(dv, w @ G, rtol=1e-4, atol=1e-6 * norms.max())
        # Swapping objectives swaps the weights; a common scale leaves them unchanged.
        perm = np.roll(np.arange(k), 1)
        _, info_p = _combine(jax.tree.map(lambda x, perm=perm: x[perm], g))
        np.testing.assert_allclose(info_p["weights"][0], w[perm], atol=2e-4)
        _, info_s = _combine(jax.tree.map(lambda x: 37.0 * x, g))
        np.testing.assert_allclose(info_s["weights"][0], w, atol=2e-4)


def test_opposed_gradients_give_zero_update():
    g1 = _grads(0, 1)
    g = jax.tree.map(lambda x: jnp.concatenate([x, -3.0 * x]), g1)
    d, info = _combine(g)
    np.testing.assert_allclose(info["weights"][0], [0.75, 0.25], rtol=1e-6)
    np.testing.assert_allclose(_vector(d), 0.0, atol=1e-6)
    np.testing.assert_allclose(info["cosine"], -1.0, rtol=1e-6)


def _compositions(k, n):
    """All [k] non-negative integer vectors summing to n: [count, k]."""
    if k == 1:
        return np.array([[n]])
    return np.concatenate(
        [
            np.concatenate([np.full((len(t), 1), i), t], 1)
            for i in range(n + 1)
            for t in [_compositions(k - 1, n - i)]
        ]
    )


def _simplex_grid(k, steps):
    """All points of the simplex with coordinates in {0, 1/steps, ..., 1}: [n, k] float64."""
    return _compositions(k, steps) / steps


def test_simplex_grid_helper():
    grid = _simplex_grid(3, 4)
    assert len(grid) == 15 and np.allclose(grid.sum(1), 1) and np.all(grid >= 0)


def test_two_objectives_agree_with_brute_force_to_1e6():
    a = np.linspace(0.0, 1.0, 2_000_001)
    grid = np.stack([a, 1 - a], 1)
    for seed in range(5):
        G = _matrix(_grads(seed, 2, shared=1.0))
        gram = G @ G.T
        w = np.asarray(pareto.min_norm_weights(jnp.asarray(gram, jnp.float32)), np.float64)
        vals = np.einsum("ni,ij,nj->n", grid, gram, grid)
        best = grid[np.argmin(vals)]
        assert abs(w @ gram @ w - vals.min()) <= 1e-6 * vals.min() + 1e-12 * gram.max()
        np.testing.assert_allclose(w, best, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,steps", [(3, 300), (4, 60), (5, 32)])
def test_more_objectives_agree_with_brute_force(k, steps):
    """Frank-Wolfe is at least as good as every grid point (to 1e-5 relative) and its weights are
    within 2 grid steps of the best grid point (the minimiser is unique: full-rank Gram)."""
    grid = _simplex_grid(k, steps)
    for seed in range(3):
        G = _matrix(_grads(seed, k, shared=1.0))
        gram = G @ G.T
        w = np.asarray(pareto.min_norm_weights(jnp.asarray(gram, jnp.float32)), np.float64)
        vals = np.einsum("ni,ij,nj->n", grid, gram, grid)
        assert w @ gram @ w <= vals.min() * (1 + 1e-5)
        np.testing.assert_allclose(w, grid[np.argmin(vals)], atol=2.0 / steps)


def test_solver_is_batched_and_jittable():
    grams = []
    for seed in range(4):
        G = _matrix(_grads(seed, 3, shared=1.0))
        grams.append(G @ G.T)
    grams = jnp.asarray(np.stack(grams).reshape(2, 2, 3, 3), jnp.float32)
    batched = jax.jit(pareto.min_norm_weights)(grams)
    assert batched.shape == (2, 2, 3)
    for i in range(2):
        for j in range(2):
            np.testing.assert_allclose(
                batched[i, j], pareto.min_norm_weights(grams[i, j]), atol=1e-6
            )


def test_guards_zero_identical_and_absent():
    g = _grads(1, 2)
    zero = jax.tree.map(jnp.zeros_like, g)
    d, info = _combine(zero)
    assert np.all(np.isfinite(_vector(d))) and np.allclose(_vector(d), 0.0)
    assert np.all(np.isfinite(info["weights"])) and np.all(np.isfinite(info["cosine_matrix"]))
    same = jax.tree.map(lambda x: jnp.stack([x[0], x[0]]), g)
    d, info = _combine(same)
    np.testing.assert_allclose(info["weights"][0], [0.5, 0.5])
    np.testing.assert_allclose(_vector(d), _vector(jax.tree.map(lambda x: x[0], g)), rtol=1e-6)
    # One objective absent (flag) -> follow the present one, even if the absent one is NaN.
    poisoned = jax.tree.map(lambda x: x.at[1].set(jnp.nan), g)
    for cfg in (PARETO, pareto.CombinerConfig(mode="sum")):
        d, info = _combine(poisoned, cfg, present=jnp.array([True, False]))
        np.testing.assert_allclose(_vector(d), _vector(jax.tree.map(lambda x: x[0], g)), rtol=1e-6)
    # One objective with an all-zero gradient is no reason to stop: follow the other one.
    half = jax.tree.map(lambda x: x.at[0].set(0.0), g)
    d, info = _combine(half)
    np.testing.assert_allclose(info["weights"][0], [0.0, 1.0])
    np.testing.assert_allclose(_vector(d), _vector(jax.tree.map(lambda x: x[1], g)), rtol=1e-6)


def test_per_group_solve_keeps_every_objective_non_worse_per_group():
    g = _grads(3, 3, shared=0.5)
    # The text loss has no gradient on 'head' (like gen_head under the understanding loss).
    g["head"]["kernel"] = g["head"]["kernel"].at[0].set(0.0)
    cfg = pareto.CombinerConfig(mode="pareto", groups=(r"^(dense|head)/",))
    d, info = _combine(g, cfg)
    assert pareto.group_names(g, cfg) == ["dense", "head"]
    assert info["weights"].shape == (2, 3)
    for name in ("dense", "head"):
        Gg, dg = _matrix(g[name]), _vector(d[name])
        norms = np.linalg.norm(Gg, axis=1)
        live = norms > 0  # the property holds for the objectives that have a gradient here
        assert np.all((Gg @ dg)[live] >= dg @ dg - 1e-5 * norms.max() ** 2)
        assert np.linalg.norm(dg) <= norms[live].min() * (1 + 1e-5)
    assert float(info["weights"][1, 0]) == 0.0 and np.linalg.norm(_vector(d["head"])) > 0


def test_param_groups_by_regex_with_captures():
    tree = {
        "language_model": {f"layers_{i}": {"q_proj": {"kernel": 0}, "norm": 0} for i in (0, 1)},
        "gen_head": {"kernel": 0},
    }
    ids, names = pareto.param_groups(tree, [r"layers_(\d+)/", "gen_head"])
    assert names == ["gen_head", "0", "1"]
    assert ids == [0, 1, 1, 2, 2]
    assert pareto.param_groups(tree, [])[1] == ["all"]
    with pytest.raises(ValueError, match="bad regex"):
        pareto.CombinerConfig(groups=("(",))
    with pytest.raises(ValueError, match="normalization"):
        pareto.CombinerConfig(normalization="l1")


def test_normalizations():
    g = _grads(4, 2, shared=1.0)
    G = _matrix(g)
    norms = np.linalg.norm(G, axis=1)
    losses = jnp.array([2.0, 0.5])
    for kind, c in (
        ("l2", norms),
        ("loss", np.array([2.0, 0.5])),
        ("loss+", np.array([2.0, 0.5]) * norms),
    ):
        cfg = pareto.CombinerConfig(mode="pareto", normalization=kind)
        d, info = _combine(g, cfg, losses=losses)
        Gn = G / c[:, None]
        w = np.asarray(pareto.min_norm_weights(jnp.asarray(Gn @ Gn.T, jnp.float32)))
        np.testing.assert_allclose(info["weights"][0], w, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(info["effective_weights"][0], w / c, rtol=1e-4)
        np.testing.assert_allclose(_vector(d), w @ Gn, rtol=1e-4, atol=1e-6)


def test_bf16_gradients_are_dotted_in_fp32():
    g32 = _grads(5, 2, shared=1.0)
    g16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g32)
    d, info = _combine(g16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(d))
    G = _matrix(g16)  # exact bf16 values, float64 dots
    w = np.asarray(pareto.min_norm_weights(jnp.asarray(G @ G.T, jnp.float32)))
    np.testing.assert_allclose(info["weights"][0], w, rtol=1e-5)


def _mlp_losses(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    y = h @ params["w2"]
    return jnp.stack([jnp.mean(y[:, 0] ** 2), jnp.mean((y[:, 1] - 1.0) ** 2), jnp.mean(h**2)])


def _mlp():
    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k[0], (6, 16)) / 3,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k[1], (16, 2)) / 4,
    }
    return params, jax.random.normal(k[2], (32, 6))


def test_objective_grads_one_forward_equals_separate_grads():
    params, x = _mlp()
    run = jax.jit(pareto.objective_grads, static_argnums=0, static_argnames="method")
    l1, g1, _ = run(_mlp_losses, params, x, method="vjp")
    l2, g2, _ = run(_mlp_losses, params, x, method="grad")
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for t in range(3):
        want = jax.jit(jax.grad(lambda p, t=t: _mlp_losses(p, x)[t]))(params)
        for a, b, c in zip(
            jax.tree.leaves(g1), jax.tree.leaves(g2), jax.tree.leaves(want), strict=True
        ):
            np.testing.assert_allclose(a[t], c, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(b[t], c, rtol=1e-5, atol=1e-7)


def test_combined_gradient_sum_mode_is_the_gradient_of_the_sum():
    params, x = _mlp()
    want = jax.grad(lambda p: jnp.sum(_mlp_losses(p, x)))(params)
    for stats in (True, False):
        cfg = pareto.CombinerConfig(mode="sum", objective_stats=stats)
        grads, info, _ = pareto.combined_gradient(_mlp_losses, params, x, config=cfg)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(info["weights"], np.ones((1, 3)))
    assert info.keys() == {"losses", "weights"}
    grads, info, aux = pareto.combined_gradient(
        lambda p, x: (_mlp_losses(p, x), "aux"), params, x, config=PARETO, has_aux=True
    )
    assert aux == "aux" and {"grad_norms", "cosine_matrix", "weights_mean"} <= info.keys()


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_eight_devices_give_the_same_result_as_one(axis_type):
    assert jax.device_count() == 8
    g = _grads(6, 3, shared=1.0)
    g = jax.tree.map(lambda x: jnp.tile(x, (1,) * (x.ndim - 1) + (8,)), g)  # last dim % 8 == 0
    cfg = pareto.CombinerConfig(mode="pareto", groups=(r"^(dense|head)/",), normalization="l2")
    one_d, one_info = _combine(g, cfg)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))
    spec = lambda x: NamedSharding(mesh, PartitionSpec(*([None] * (x.ndim - 1)), "fsdp"))  # noqa: E731
    sharded = jax.tree.map(lambda x: jax.device_put(x, spec(x)), g)
    assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
    many_d, many_info = _combine(sharded, cfg)
    np.testing.assert_allclose(many_info["weights"], one_info["weights"], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(many_d), jax.tree.leaves(one_d), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
