"""Mesh, regex partition rules and batch sharding on 8 forced CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pairuni_jax.train import sharding


def test_make_mesh_sizes_and_errors():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {
        "data": 8,
        "fsdp": 1,
        "tensor": 1,
    }
    assert dict(sharding.make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(1, 4, devices=jax.devices()[:4]).shape)["fsdp"] == 4
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh(3, 4, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(-1, -1)


def test_rules_first_match_auto_fsdp_and_errors():
    mesh = sharding.make_mesh(1, 4, 2)
    rules = [(r"q_proj/kernel$", P("fsdp", "tensor")), (r"norm", "replicate"), (r".*", "fsdp")]
    assert sharding.spec_for("l/q_proj/kernel", (8, 6), rules, mesh) == P("fsdp", "tensor")
    assert sharding.spec_for("l/norm/scale", (8,), rules, mesh) == P()
    assert sharding.spec_for("l/mlp/kernel", (12, 16), rules, mesh) == P(None, "fsdp")
    assert sharding.spec_for("l/odd", (3, 5), rules, mesh) == P()  # nothing divisible: replicate
    assert sharding.spec_for("unmatched", (8,), rules[:1], mesh) == P()
    with pytest.raises(ValueError, match=r"l/q_proj/kernel \(6, 6\).*not divisible"):
        sharding.spec_for("l/q_proj/kernel", (6, 6), rules, mesh)
    with pytest.raises(ValueError, match="more entries"):
        sharding.spec_for("l/q_proj/kernel", (8,), rules, mesh)


def test_janus_rules_cover_the_tiny_model():
    from pairuni_jax.models import configs, janus

    mesh = sharding.make_mesh(2, 2, 2)
    shapes = janus.param_shapes(configs.tiny())
    specs = sharding.param_specs(shapes, sharding.JANUS_RULES, mesh)
    layer = specs["language_model"]["layers_0"]
    assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert layer["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    assert specs["generation_head"]["vision_head"]["kernel"] != P()  # generic fsdp rule


def test_sharded_params_and_batch_give_the_same_result_as_one_device():
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "self_attn": {"q_proj": {"kernel": jax.random.normal(k[0], (16, 32))}},
        "mlp": {"down_proj": {"kernel": jax.random.normal(k[1], (32, 8))}},
    }
    x = np.asarray(jax.random.normal(k[2], (16, 16)))

    def f(p, x):
        h = jnp.tanh(x @ p["self_attn"]["q_proj"]["kernel"])
        return h @ p["mlp"]["down_proj"]["kernel"], jax.grad(
            lambda p: jnp.sum(jnp.tanh(x @ p["self_attn"]["q_proj"]["kernel"]) ** 2)
        )(p)

    want = jax.jit(f)(params, x)
    mesh = sharding.make_mesh(2, 2, 2)
    sp = sharding.shard_params(params, sharding.JANUS_RULES, mesh)
    assert sp["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    sx = sharding.shard_batch({"x": x}, mesh)["x"]
    assert sx.sharding.spec == P(("data", "fsdp")) and len(sx.sharding.device_set) == 8
    got = jax.jit(f)(sp, sx)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\['y'\].*divisible by the 4"):
        sharding.shard_batch({"y": np.zeros((6, 2))}, mesh)
