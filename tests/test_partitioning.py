"""Under an FSDP mesh the VQ keeps each device on its own images (models/partitioning.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from pairuni_jax.models import configs, janus
from pairuni_jax.models.configs import VQConfig
from pairuni_jax.models.partitioning import batch_shards, shard_rows
from pairuni_jax.train import sharding

ROWS = 8


def _rows_split(spec) -> bool:
    """Whether a PartitionSpec splits the leading (row) axis over the batch axes."""
    return len(spec) > 0 and spec[0] in ("fsdp", ("data", "fsdp"))


def _fsdp_mesh():
    assert jax.device_count() == 8
    return sharding.make_mesh(data=1, fsdp=8, tensor=1)


def _compile_vq_decode(config, mesh, *, on_mesh: bool):
    """The VQ decode of ROWS code grids, lowered from abstract FSDP-sharded params and codes."""
    shapes = janus.param_shapes(config)
    shardings = sharding.param_shardings(shapes, sharding.JANUS_RULES, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    codes = jax.ShapeDtypeStruct((ROWS, config.vq.grid, config.vq.grid), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    with sharding.mesh_context(mesh if on_mesh else None):
        return jax.jit(janus.vq_decode, static_argnums=1).lower(params, config, codes).compile()


def test_vq_decode_on_an_fsdp_mesh_keeps_each_devices_images_on_that_device():
    mesh = _fsdp_mesh()
    config = configs.tiny(vq=VQConfig(image_size=128, codebook_size=64, codebook_dim=8, ch=64,
                                      ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32))
    free = _compile_vq_decode(config, mesh, on_mesh=False)
    pinned = _compile_vq_decode(config, mesh, on_mesh=True)
    # left alone, the partitioner follows the channel-sharded convolutions and every device holds
    # activations of all 8 images; pinned, a device holds its own image's
    assert not _rows_split(free.output_shardings.spec)
    assert _rows_split(pinned.output_shardings.spec)
    free_mib = free.memory_analysis().temp_size_in_bytes / 2**20
    pinned_mib = pinned.memory_analysis().temp_size_in_bytes / 2**20
    assert pinned_mib < 0.5 * free_mib, (pinned_mib, free_mib)


def test_vq_on_a_mesh_gives_the_values_of_one_device():
    mesh = _fsdp_mesh()
    config = configs.tiny()
    params = janus.init_params(config, 0)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, config.vq.codebook_size, (ROWS, config.vq.grid, config.vq.grid),
                         dtype=np.int32)
    pixels = rng.uniform(-1, 1, (ROWS, config.vq.image_size, config.vq.image_size, 3)
                         ).astype(np.float32)
    want = janus.vq_decode(params, config, codes), janus.vq_encode(params, config, pixels)
    sharded = sharding.shard_params(params, sharding.JANUS_RULES, mesh)
    with sharding.mesh_context(mesh):
        got = (janus.vq_decode(sharded, config, sharding.shard_batch(codes, mesh)),
               janus.vq_encode(sharded, config, sharding.shard_batch(pixels, mesh)))
    assert _rows_split(got[0].sharding.spec) and _rows_split(got[1].sharding.spec)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_shard_rows_leaves_arrays_alone_without_a_mesh_or_when_rows_do_not_split():
    x = jnp.ones((6, 4))
    assert batch_shards() == 1 and shard_rows(x) is x
    with sharding.mesh_context(sharding.make_mesh(data=2, fsdp=4, tensor=1)):
        assert batch_shards() == 8
        assert shard_rows(x) is x  # 6 rows over 8 shards: left to the partitioner
        spec = jax.jit(shard_rows).lower(jnp.ones((16, 4))).compile().output_shardings.spec
    assert spec[0] == ("data", "fsdp")
