"""Row sharding of activations under a device mesh.

A batch enters a jitted step split over the mesh's batch axes ('data', 'fsdp'); what happens to
it inside is the SPMD partitioner's choice. For the LLM that choice is a good one: with
FSDP-sharded weights it keeps each weight shard where it is and moves activations instead, which
holds far less than pinning the rows and gathering whole weights (Janus-Pro 1B on 16 devices,
`python -m pairuni_jax.bench memory`: image rollout 2.6 GiB per device, text rollout 8.0; with
every module output's rows pinned 11.7 and 13.6). For the VQ's convolutions it is a bad one: the
partitioner follows their channel-sharded kernels and every device ends up holding activations
of every image (the 1B decode of 128 images at 384 px: 18.3 GiB per device). The VQ encoder and
decoder therefore pin their activations with `shard_rows` (1.7 GiB).

The mesh is the one set by `jax.set_mesh(mesh)` around the call (train/sharding.mesh_context,
which the loops use). Without a mesh, or when the rows do not split evenly, `shard_rows` returns
its input unchanged.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec

BATCH_AXES = ("data", "fsdp")


def batch_shards() -> int:
    """How many row shards the current mesh's batch axes make (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return 1
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_rows(x: jax.Array) -> jax.Array:
    """x [rows, ...] constrained to rows over the batch axes; other dims unconstrained."""
    n = batch_shards()
    if n == 1 or x.ndim == 0 or x.shape[0] % n:
        return x
    spec = PartitionSpec(BATCH_AXES, *[PartitionSpec.UNCONSTRAINED] * (x.ndim - 1))
    return jax.lax.with_sharding_constraint(x, spec)
