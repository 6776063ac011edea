"""SigLIP tower and aligner against a plain numpy implementation of the reference equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from pairuni_jax.models import configs
from pairuni_jax.models.siglip import MlpProjector, SigLIPVisionModel

CFG = configs.SigLIPConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=48)


def _ln(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _reference(p, pixels):
    """Non-overlapping patches (row-major), pre-LN blocks, exact GELU, final LayerNorm."""
    b, s = pixels.shape[:2]
    g, k = CFG.grid, CFG.patch_size
    patches = pixels.reshape(b, g, k, g, k, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    w = p["embeddings"]["patch_embedding"]["kernel"].reshape(-1, CFG.width)  # HWIO -> [k*k*3, D]
    x = patches @ w + p["embeddings"]["patch_embedding"]["bias"] + p["embeddings"][
        "position_embedding"]
    hd = CFG.width // CFG.num_heads
    for i in range(CFG.depth):
        lp = p[f"layers_{i}"]
        h = _ln(x, lp["layer_norm1"])
        a = lp["self_attn"]
        q, kk, v = (_dense(h, a[n]).reshape(b, -1, CFG.num_heads, hd) for n in
                    ("q_proj", "k_proj", "v_proj"))
        s_ = np.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(hd)
        s_ = np.exp(s_ - s_.max(-1, keepdims=True))
        s_ /= s_.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", s_, v).reshape(b, -1, CFG.width)
        x = x + _dense(o, a["projection_layer"])
        h = _ln(x, lp["layer_norm2"])
        x = x + _dense(_gelu(_dense(h, lp["mlp"]["fc1"])), lp["mlp"]["fc2"])
    return _ln(x, p["post_layernorm"])


def _random_params(module, x, seed):
    """Random O(1) params drawn with numpy from the abstract tree (nothing to compile)."""
    leaves, tree = jax.tree.flatten(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    rng = np.random.RandomState(seed)
    return jax.tree.unflatten(tree, [rng.normal(0, 0.3, x.shape).astype(np.float32) + (
        1.0 if x.ndim == 1 else 0.0) for x in leaves])


def test_tower_matches_numpy_reference():
    model = SigLIPVisionModel(CFG)
    pixels = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    params = _random_params(model, pixels, 1)
    ours = jax.jit(model.apply)({"params": params}, pixels)
    ref = _reference(jax.tree.map(np.asarray, params), pixels)
    assert ours.shape == (2, 16, 32)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


def test_wrong_image_size_is_a_clear_error():
    model = SigLIPVisionModel(CFG)
    with pytest.raises(ValueError, match="expects 16px images"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 20, 20, 3)))


def test_aligner_depth_and_exact_gelu():
    proj = MlpProjector(8, depth=3)
    x = np.random.RandomState(2).normal(size=(3, 5)).astype(np.float32)
    p = _random_params(proj, x, 3)
    assert sorted(p) == ["fc1", "hidden_layers_0", "hidden_layers_1"]
    h = _dense(x, p["fc1"])
    for name in ("hidden_layers_0", "hidden_layers_1"):
        h = _dense(_gelu(h), jax.tree.map(np.asarray, p[name]))
    np.testing.assert_allclose(np.asarray(jax.jit(proj.apply)({"params": p}, x)), h, atol=1e-4)
