"""LoRA on a small Flax model: targets by regex, B = 0 start, interceptor == merge, masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pairuni_jax.models import lora as lora_lib


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="q_proj")(x)
        h = nn.relu(nn.Dense(16, use_bias=False, name="up_proj")(h))
        return nn.DenseGeneral((2, 4), name="out_proj")(h).reshape(*x.shape[:-1], 8)


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="vision_model")(x)
        for i in range(2):
            x = x + Block(name=f"layers_{i}")(x)
        return nn.Dense(5, name="head")(x)


CFG = lora_lib.LoraConfig(rank=3, alpha=6.0, targets=(r"layers_\d+/(q|up|out)_proj/kernel$",))


@pytest.fixture(scope="module")
def setup():
    model = TinyNet()
    x = jax.random.normal(jax.random.key(0), (4, 8))
    params = model.init(jax.random.key(1), x)["params"]
    return model, params, x


def _apply(model, params, x, lora=None, **kw):
    if lora is None:
        return model.apply({"params": params}, x)
    with lora_lib.intercept(lora, CFG, **kw):
        return model.apply({"params": params}, x)


def _randomise_b(lora, seed=2):
    keys = iter(jax.random.split(jax.random.key(seed), len(lora)))
    return {
        p: {"a": ab["a"], "b": jax.random.normal(next(keys), ab["b"].shape)}
        for p, ab in lora.items()
    }


def test_init_targets_by_regex_with_zero_b(setup):
    model, params, x = setup
    lora = lora_lib.init(params, CFG, jax.random.key(3))
    assert sorted(lora) == [
        f"layers_{i}/{n}_proj/kernel" for i in range(2) for n in ("out", "q", "up")
    ]
    assert lora["layers_0/q_proj/kernel"]["a"].shape == (8, 3)
    assert lora["layers_1/out_proj/kernel"]["b"].shape == (3, 2, 4)  # DenseGeneral kernel
    assert all(float(jnp.abs(ab["b"]).max()) == 0.0 for ab in lora.values())
    assert all(float(jnp.abs(ab["a"]).max()) > 0.0 for ab in lora.values())
    # B = 0: the adapted model is the base model, through both paths.
    base = _apply(model, params, x)
    np.testing.assert_array_equal(_apply(model, params, x, lora), base)
    np.testing.assert_array_equal(
        model.apply({"params": lora_lib.merge(params, lora, CFG)}, x), base
    )


def test_bad_targets_are_errors(setup):
    _, params, _ = setup
    with pytest.raises(ValueError, match="no parameter path matches"):
        lora_lib.target_paths(params, lora_lib.LoraConfig(targets=("nothing_here",)))
    with pytest.raises(ValueError, match="q_proj/bias.*only Dense kernels"):
        lora_lib.target_paths(params, lora_lib.LoraConfig(targets=("q_proj/",)))
    with pytest.raises(ValueError, match="rank"):
        lora_lib.LoraConfig(rank=0)


def test_interceptor_equals_merged_weights_and_manual_delta(setup):
    model, params, x = setup
    lora = _randomise_b(lora_lib.init(params, CFG, jax.random.key(3)))
    got = jax.jit(lambda p, lr, x: _apply(model, p, x, lr))(params, lora, x)
    merged = lora_lib.merge(params, lora, CFG)
    np.testing.assert_allclose(got, model.apply({"params": merged}, x), rtol=1e-5, atol=1e-5)
    ab = lora["layers_0/q_proj/kernel"]
    np.testing.assert_allclose(
        merged["layers_0"]["q_proj"]["kernel"],
        params["layers_0"]["q_proj"]["kernel"] + 2.0 * ab["a"] @ ab["b"],
        rtol=1e-6,
    )
    assert not np.allclose(got, model.apply({"params": params}, x))


def test_gradients_through_interceptor_equal_gradients_through_merge(setup):
    model, params, x = setup
    lora = _randomise_b(lora_lib.init(params, CFG, jax.random.key(4)))

    def loss_intercept(lr):
        return jnp.sum(_apply(model, params, x, lr) ** 2)

    def loss_merge(lr):
        return jnp.sum(model.apply({"params": lora_lib.merge(params, lr, CFG)}, x) ** 2)

    g1 = jax.jit(jax.grad(loss_intercept))(lora)
    g2 = jax.jit(jax.grad(loss_merge))(lora)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # At init (B = 0) only B gets a gradient: the standard LoRA start.
    g0 = jax.grad(loss_intercept)(lora_lib.init(params, CFG, jax.random.key(4)))
    assert all(
        float(jnp.abs(v["a"]).max()) == 0 and float(jnp.abs(v["b"]).max()) > 0 for v in g0.values()
    )


def test_dropout_only_touches_the_adapter_branch(setup):
    model, params, x = setup
    cfg = lora_lib.LoraConfig(rank=3, alpha=6.0, dropout=0.5, targets=CFG.targets)
    lora = _randomise_b(lora_lib.init(params, cfg, jax.random.key(5)))

    def run(lr, **kw):
        with lora_lib.intercept(lr, cfg, **kw):
            return model.apply({"params": params}, x)

    det = run(lora)
    drop = run(lora, dropout_rng=jax.random.key(6), deterministic=False)
    assert not np.allclose(det, drop)
    np.testing.assert_array_equal(
        drop, run(lora, dropout_rng=jax.random.key(6), deterministic=False)
    )
    zero_b = lora_lib.init(params, cfg, jax.random.key(5))
    base = model.apply({"params": params}, x)
    np.testing.assert_array_equal(
        run(zero_b, dropout_rng=jax.random.key(6), deterministic=False), base
    )
    with pytest.raises(ValueError, match="dropout_rng"):
        run(lora, deterministic=False)


def test_unused_lora_params_are_an_error(setup):
    model, params, x = setup
    lora = lora_lib.init(params, CFG, jax.random.key(3))
    lora["layers_7/q_proj/kernel"] = lora["layers_0/q_proj/kernel"]
    with pytest.raises(ValueError, match="layers_7"):
        _apply(model, params, x, lora)
    with pytest.raises(ValueError, match="not in the params tree"):
        lora_lib.merge(params, lora, CFG)


def test_base_params_serve_as_reference_and_optimizer_holds_only_lora_state(setup):
    model, params, x = setup
    lora = lora_lib.init(params, CFG, jax.random.key(3))
    tx = optax.adamw(1e-2)
    state = tx.init(lora)
    n_lora = sum(v.size for v in jax.tree.leaves(lora))
    n_state = sum(v.size for v in jax.tree.leaves(state) if v.ndim > 0)
    assert n_state == 2 * n_lora  # Adam's two moments, over the adapters only

    @jax.jit
    def step(lr, st):
        g = jax.grad(lambda lr: jnp.sum((_apply(model, params, x, lr) - 1.0) ** 2))(lr)
        upd, st = tx.update(g, st, lr)
        return optax.apply_updates(lr, upd), st

    new_lora, _ = step(lora, state)
    ref = model.apply({"params": params}, x)  # the reference policy: base weights, no adapters
    np.testing.assert_array_equal(ref, _apply(model, params, x, lora))
    assert not np.allclose(_apply(model, params, x, new_lora), ref)


def test_trainable_mask_partition_and_masked_optimizer(setup):
    model, params, x = setup
    mask = lora_lib.trainable_mask(params, frozen=(r"^vision_model/",))
    assert not mask["vision_model"]["kernel"] and mask["head"]["kernel"]
    trainable, frozen = lora_lib.partition(params, mask)
    assert trainable["vision_model"]["kernel"] is None and frozen["head"]["kernel"] is None
    restored = lora_lib.combine(trainable, frozen)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        assert a is b
    n_train = sum(v.size for v in jax.tree.leaves(trainable))
    state = optax.adam(1e-2).init(trainable)
    assert sum(v.size for v in jax.tree.leaves(state) if v.ndim > 0) == 2 * n_train
    # The masked optimizer on the full tree: no state and no update for frozen leaves.
    tx = lora_lib.masked_optimizer(optax.adam(1e-2), mask)
    state = tx.init(params)
    assert sum(v.size for v in jax.tree.leaves(state) if v.ndim > 0) == 2 * n_train
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)
    upd, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, upd)
    np.testing.assert_array_equal(new["vision_model"]["kernel"], params["vision_model"]["kernel"])
    assert not np.allclose(new["head"]["kernel"], params["head"]["kernel"])


def test_janus_default_targets_on_the_tiny_model():
    from pairuni_jax.models import configs, janus

    shapes = janus.param_shapes(configs.tiny())
    paths = lora_lib.target_paths(shapes, lora_lib.LoraConfig())
    assert len(paths) == 7 * configs.tiny().text.num_layers
    assert "language_model/layers_1/self_attn/q_proj/kernel" in paths
    mask = lora_lib.trainable_mask(shapes)
    assert not any(jax.tree.leaves(mask["vision_model"])) and not any(
        jax.tree.leaves(mask["vqmodel"])
    )
    assert all(jax.tree.leaves(mask["language_model"]))
