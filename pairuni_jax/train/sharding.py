"""Device mesh and parameter / batch sharding (jit + NamedSharding, big_vision style rules).

Mesh axes are ('data', 'fsdp', 'tensor'). Batches are split over ('data', 'fsdp') on their leading
axis; parameters follow a list of (regex, spec) rules matched against their path
('language_model/layers_3/self_attn/q_proj/kernel'), first match wins. A spec is
- a PartitionSpec (or tuple) naming mesh axes per dimension, e.g. P('fsdp', 'tensor');
- 'fsdp': shard the largest dimension divisible by the fsdp axis size over 'fsdp' (replicate if
  none is divisible) -- the generic fully-sharded rule;
- 'replicate'.
Leaves no rule matches are replicated. An explicit spec that does not divide a dimension is an
error naming the parameter, never a silent replication.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pairuni_jax.models.partitioning import BATCH_AXES
from pairuni_jax.rl.pareto import path_str

AXES = ("data", "fsdp", "tensor")
Rule = tuple[str, Any]

# Janus-Pro: Megatron-style tensor parallelism inside LLM layers (column-parallel q/k/v/gate/up,
# row-parallel o/down), vocab-parallel embeddings and heads, FSDP over the other dimension; every
# other parameter is fully sharded by the generic rule. With tensor = 1 this is plain FSDP.
JANUS_RULES: tuple[Rule, ...] = (
    (r"self_attn/[qkv]_proj/kernel$", PartitionSpec("fsdp", "tensor")),
    (r"self_attn/o_proj/kernel$", PartitionSpec("tensor", "fsdp")),
    (r"mlp/(gate|up)_proj/kernel$", PartitionSpec("fsdp", "tensor")),
    (r"mlp/down_proj/kernel$", PartitionSpec("tensor", "fsdp")),
    (r"^language_model/embed_tokens/embedding$", PartitionSpec("tensor", "fsdp")),
    (r"^lm_head/kernel$", PartitionSpec("fsdp", "tensor")),
    (r".*", "fsdp"),
)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default all); one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by {known} (mesh {sizes})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} needs {math.prod(sizes)} "
            f"devices, have {len(devices)}"
        )
    # Auto axes: shardings propagate through jit from the inputs' NamedShardings.
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[n] for n in names)


def _auto_fsdp(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    n = mesh.shape["fsdp"]
    if n == 1:
        return PartitionSpec()
    candidates = [(d, i) for i, d in enumerate(shape) if d % n == 0]
    if not candidates:
        return PartitionSpec()
    _, dim = max(candidates)
    return PartitionSpec(*[("fsdp" if i == dim else None) for i in range(len(shape))])


def spec_for(path: str, shape: Sequence[int], rules: Sequence[Rule], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of one parameter under `rules` (first matching regex wins)."""
    for pattern, spec in rules:
        if not re.search(pattern, path):
            continue
        if spec == "replicate":
            return PartitionSpec()
        if spec == "fsdp":
            return _auto_fsdp(shape, mesh)
        spec = PartitionSpec(*spec) if not isinstance(spec, PartitionSpec) else spec
        if len(spec) > len(shape):
            raise ValueError(
                f"sharding rule {pattern!r} -> {spec} has more entries than the "
                f"{len(shape)} dims of {path} {tuple(shape)}"
            )
        for dim, axes in zip(shape, spec, strict=False):
            if dim % _axis_size(mesh, axes):
                raise ValueError(
                    f"sharding rule {pattern!r} -> {spec}: {path} {tuple(shape)} "
                    f"has a dim {dim} not divisible by mesh axes {axes} "
                    f"({_axis_size(mesh, axes)})"
                )
        return spec
    return PartitionSpec()


def param_specs(tree: Any, rules: Sequence[Rule], mesh: Mesh) -> Any:
    """PartitionSpec per leaf (leaves may be arrays or jax.ShapeDtypeStruct)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: spec_for(path_str(p), x.shape, rules, mesh), tree
    )


def param_shardings(tree: Any, rules: Sequence[Rule], mesh: Mesh) -> Any:
    """NamedSharding per leaf, for jit in/out_shardings and device_put."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(tree, rules, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def state_shardings(state: Any, rules: Sequence[Rule], mesh: Mesh, roots: Any) -> Any:
    """NamedSharding per leaf of a train state whose fields hold param-shaped trees (trainable and
    frozen params, optimizer moments under prefixes like 'opt_state/1/0/mu/').

    A leaf is placed by `rules` matched against its path from the first component that is a
    top-level param name (`roots`, e.g. 'language_model'), so every copy of a parameter (the
    parameter, Adam's mu and nu) gets the parameter's own sharding; other leaves (step, counts)
    are replicated.
    """
    roots = set(roots)

    def one(path, x):
        parts = path_str(path).split("/")
        for i, part in enumerate(parts):
            if part in roots:
                rel = "/".join(parts[i:])
                return NamedSharding(mesh, spec_for(rel, x.shape, rules, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, state)


def on_first_device(tree: Any) -> Any:
    """Every leaf committed to this process's first device: what a jitted step returns without a
    mesh. A loop whose first state were uncommitted (fresh or loaded host arrays) would compile
    its step, and every program that reads the params, twice: once for that placement, once for
    the committed arrays the step returns."""
    return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def shard_params(params: Any, rules: Sequence[Rule], mesh: Mesh) -> Any:
    """Place a param tree on the mesh under `rules`."""
    return jax.device_put(params, param_shardings(params, rules, mesh))


def mesh_context(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """`jax.set_mesh(mesh)` (nothing without a mesh) for the calls of the policy's programs: traced
    inside it, the VQ pins its activations' rows to the batch axes (models/partitioning.py)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'); other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turn this host's batch (numpy or jax leaves [B_local, ...]) into global sharded arrays.

    Multi-host: each process passes its own rows; the global batch is their concatenation.
    """
    sharding = batch_sharding(mesh)
    n_local = _axis_size(mesh, BATCH_AXES) // jax.process_count()

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % max(n_local, 1):
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} with shape {x.shape}: the "
                f"leading axis must be divisible by the {n_local} local batch shards"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, batch)


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a global array whose leading axis is the batch: numpy, in global
    order. With `shard_batch`'s layout these are the rows this process fed in, so a host can score
    its own rollouts without gathering anyone else's."""
    if x.is_fully_addressable:
        return np.asarray(x)
    x = jax.device_put(x, batch_sharding(mesh))  # one shard of rows per batch-axis position
    shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}  # replicas dedup
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
