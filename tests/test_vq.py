"""The VQ tokenizer: geometries other than 384/16, the original L2-normalised quantizer, and the
pieces a trainer composes (latents, codebook, quantize, decode_latents; training itself is tested
with the VQ trainer)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pairuni_jax.models import configs
from pairuni_jax.models.vq import VQModel, l2_normalize, nearest_code
from pairuni_jax.models.vq import init_params as vq_init_params

SMALL = configs.VQConfig(image_size=32, codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 1, 2),
                         num_res_blocks=1, z_channels=32)


@functools.cache
def _jit(method):
    return jax.jit(lambda p, *args: VQModel(config=SMALL).apply(p, *args, method=method))


@pytest.fixture(scope="module")
def latents(vq):
    model, params, pixels = vq
    return _jit(VQModel.encode_latents)(params, pixels)  # [B, h, w, d]


@pytest.fixture(scope="module")
def vq():
    model = VQModel(config=SMALL)
    pixels = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    params = vq_init_params(SMALL, 0)
    return model, params, pixels


def test_small_geometry_round_trip_shapes(vq, latents):
    model, params, pixels = vq
    assert SMALL.grid == 8 and SMALL.num_tokens == 64
    codes, _ = model.apply(params, latents, method=VQModel.quantize_latents)
    assert codes.shape == (2, 8, 8) and codes.dtype == jnp.int32
    out = _jit(VQModel.decode)(params, codes)
    assert out.shape == (2, 32, 32, 3) and bool(jnp.all(jnp.isfinite(out)))


def test_real_geometry_is_24x24_for_384px():
    real = configs.VQConfig()
    model = VQModel(config=real)
    x = jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    codes = jax.eval_shape(lambda p, x: model.apply(p, x, method=VQModel.encode), params, x)
    assert codes.shape == (1, 24, 24)
    enc = params["params"]["encoder"]
    assert set(enc["down_4"]) == {"block_0", "block_1", "attn_0", "attn_1"}  # attn: last level
    assert "downsample" in enc["down_3"] and "downsample" not in enc["down_4"]
    dec = params["params"]["decoder"]
    assert {"attn_0", "attn_1", "attn_2"} <= set(dec["up_0"]) and "attn_0" not in dec["up_1"]
    assert dec["up_0"]["block_0"]["conv1"]["kernel"].shape == (3, 3, 512, 512)
    assert dec["up_4"]["block_2"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


def test_quantizer_normalises_like_the_original(vq, latents):
    model, params, pixels = vq
    z = np.asarray(latents)
    table = np.asarray(params["params"]["quantize"]["embedding"])
    zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
    tn = table / np.linalg.norm(table, axis=-1, keepdims=True)
    expect = np.argmax(zn @ tn.T, axis=-1)  # nearest on the unit sphere = max cosine
    codes, zq = model.apply(params, jnp.asarray(z), method=VQModel.quantize_latents)
    np.testing.assert_array_equal(np.asarray(codes), expect)
    np.testing.assert_allclose(np.asarray(zq), tn[expect], atol=1e-6)
    raw, _ = model.apply(params, jnp.asarray(z), False, method=VQModel.quantize_latents)
    np.testing.assert_array_equal(np.asarray(raw), np.argmin(
        ((z[..., None, :] - table) ** 2).sum(-1), axis=-1))


def test_normalize_switch_changes_the_choice():
    table = jnp.asarray([[1.0, 0.0], [10.0, 1.0]])
    z = jnp.asarray([[1.1, 0.15]])
    assert int(nearest_code(z, table)[0]) == 0  # transformers: raw distance
    assert int(nearest_code(l2_normalize(z), l2_normalize(table))[0]) == 1  # original: direction


def test_pieces_compose_like_decode_of_encode(vq, latents):
    """What a trainer composes (latents -> quantize -> decode_latents) equals decode(encode), and
    the straight-through latents have the quantised values."""
    model, params, pixels = vq
    codes, zq = model.apply(params, latents, method=VQModel.quantize_latents)
    zq_st = l2_normalize(latents) + jax.lax.stop_gradient(zq - l2_normalize(latents))
    np.testing.assert_allclose(np.asarray(zq_st), np.asarray(zq), atol=1e-6)
    decode = _jit(VQModel.decode_latents)
    np.testing.assert_allclose(np.asarray(decode(params, zq)),
                               np.asarray(_jit(VQModel.decode)(params, codes)), atol=1e-5)


def test_numpy_init_fills_the_models_own_param_tree():
    want = jax.eval_shape(VQModel(config=SMALL).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    got = vq_init_params(SMALL, 3)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
    p = got["params"]
    assert float(jnp.abs(p["quantize"]["embedding"]).max()) <= 1.0 / SMALL.codebook_size
    kernel = np.asarray(p["encoder"]["conv_in"]["kernel"])  # [3, 3, 3, ch]: fan_in 27
    assert abs(kernel.std() * np.sqrt(27) - 1.0) < 0.15
    assert not np.any(np.asarray(p["encoder"]["conv_in"]["bias"]))
    again, other = vq_init_params(SMALL, 3), vq_init_params(SMALL, 4)
    np.testing.assert_array_equal(again["params"]["decoder"]["conv_out"]["kernel"],
                                  p["decoder"]["conv_out"]["kernel"])
    assert np.any(other["params"]["decoder"]["conv_out"]["kernel"]
                  != p["decoder"]["conv_out"]["kernel"])
