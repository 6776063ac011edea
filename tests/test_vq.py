"""The VQ tokenizer: geometries other than 384/16, the original L2-normalised quantizer, and the
pieces a trainer composes (latents, codebook, quantize, decode_latents)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pairuni_jax.models import configs, janus
from pairuni_jax.models.vq import VQModel, l2_normalize, nearest_code

SMALL = configs.VQConfig(image_size=32, codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 1, 2),
                         num_res_blocks=1, z_channels=32)


@pytest.fixture(scope="module")
def vq():
    model = VQModel(config=SMALL)
    pixels = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    params = {"params": janus.init_params(configs.tiny(vq=SMALL), 0)["vqmodel"]}
    return model, params, pixels


def test_small_geometry_round_trip_shapes(vq):
    model, params, pixels = vq
    assert SMALL.grid == 8 and SMALL.num_tokens == 64
    codes = jax.jit(lambda p, x: model.apply(p, x, method=VQModel.encode))(params, pixels)
    assert codes.shape == (2, 8, 8) and codes.dtype == jnp.int32
    out = jax.jit(lambda p, c: model.apply(p, c, method=VQModel.decode))(params, codes)
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


def test_quantizer_normalises_like_the_original(vq):
    model, params, pixels = vq
    z = np.asarray(jax.jit(lambda p, x: model.apply(p, x, method=VQModel.encode_latents))(
        params, pixels))  # [B, h, w, d]
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


def test_pieces_compose_and_train_with_straight_through(vq):
    model, params, pixels = vq

    def loss(p):
        z = model.apply(p, pixels, method=VQModel.encode_latents)
        _, zq = model.apply(p, z, method=VQModel.quantize_latents)
        zq_st = l2_normalize(z) + jax.lax.stop_gradient(zq - l2_normalize(z))
        rec = model.apply(p, zq_st, method=VQModel.decode_latents)
        return jnp.mean((rec - pixels) ** 2), rec

    def reference(p):
        return model.apply(p, model.apply(p, pixels, method=VQModel.encode), method=VQModel.decode)

    (value, rec), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(rec), np.asarray(jax.jit(reference)(params)), atol=1e-5)
    g = grads["params"]
    assert float(jnp.abs(g["encoder"]["conv_in"]["kernel"]).sum()) > 0  # reaches the encoder
    assert float(jnp.abs(g["decoder"]["conv_out"]["kernel"]).sum()) > 0
    assert np.isfinite(float(value))
