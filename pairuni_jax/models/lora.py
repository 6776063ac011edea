"""LoRA for Dense kernels chosen by regex over parameter paths, and trainable-parameter masks.

LoRA params are a flat dict keyed by the kernel's path in the params tree (the 'params' collection,
e.g. 'language_model/layers_3/self_attn/q_proj/kernel') -> {'a': [in, r], 'b': [r, *out]}, with
B = 0 at init so the adapted model starts equal to the base. The delta is (alpha / r) * A @ B.

Two ways to run the adapted model, both pure:
- `intercept(lora, config, ...)`: a Flax method interceptor that adds (alpha / r) * drop(x) @ A @ B
  to every targeted nn.Dense call. Training uses this: no merged copy of the weights, no gradient
  with respect to the full kernels, and LoRA dropout on the adapter input. Use it around a direct
  `Module.apply` (not around an already-jitted wrapper, whose trace cache ignores interceptors).
- `merge(params, lora, config)`: W + (alpha / r) A @ B for export or for any code path.
With LoRA the frozen base `params` are also the KL reference: the reference forward is the same
apply without the interceptor, so no second copy of the model is held.

Full fine-tuning uses `trainable_mask` + `partition` (or `masked_optimizer`) so the optimizer only
holds state for trainable leaves; the vision encoder and the VQ are frozen by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pairuni_jax.rl.pareto import path_str

Array = jax.Array
LoraParams = dict[str, dict[str, Array]]

# Janus-Pro: attention and MLP projections of every LLM layer.
JANUS_LLM_TARGETS = (
    r"^language_model/layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$",
)
# Frozen in full fine-tuning unless the config says otherwise: understanding encoder and VQ.
JANUS_FROZEN = (r"^vision_model/", r"^vqmodel/")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (delta scale alpha / r), dropout on the adapter input, target path regexes."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = JANUS_LLM_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: no kernel would be adapted")
        for p in self.targets:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"LoraConfig.targets: bad regex {p!r}: {e}") from e

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def target_paths(params: Any, config: LoraConfig) -> list[str]:
    """Paths of the kernels LoRA adapts; raises if none match or a match is not a kernel."""
    found = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        s = path_str(path)
        if not _matches(s, config.targets):
            continue
        if leaf.ndim < 2:
            raise ValueError(
                f"LoRA target {s!r} has shape {leaf.shape}: only Dense kernels [in, ...out] can be "
                f"adapted; tighten LoraConfig.targets {config.targets}"
            )
        found.append(s)
    if not found:
        raise ValueError(f"no parameter path matches LoraConfig.targets {config.targets}")
    return found


def init(params: Any, config: LoraConfig, rng: Array, dtype=jnp.float32) -> LoraParams:
    """LoRA params for every targeted kernel: A ~ U(+-1/sqrt(in)) [in, r], B = 0 [r, *out]."""
    shapes = {path_str(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    lora = {}
    for path in target_paths(params, config):
        shape = shapes[path]
        fan_in = shape[0]
        key = jax.random.fold_in(rng, zlib.crc32(path.encode()))
        bound = 1.0 / fan_in**0.5
        lora[path] = {
            "a": jax.random.uniform(key, (fan_in, config.rank), dtype, -bound, bound),
            "b": jnp.zeros((config.rank, *shape[1:]), dtype),
        }
    return lora


def delta(ab: dict[str, Array], config: LoraConfig) -> Array:
    """(alpha / r) * A @ B, shaped like the kernel [in, *out], fp32."""
    a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
    return config.scale * jnp.tensordot(a, b, axes=1)


def merge(params: Any, lora: LoraParams, config: LoraConfig) -> Any:
    """Base params with every adapted kernel replaced by W + (alpha / r) A @ B (in W's dtype)."""
    missing = set(lora)

    def merge_leaf(path, w):
        s = path_str(path)
        if s not in lora:
            return w
        missing.discard(s)
        return (w.astype(jnp.float32) + delta(lora[s], config)).astype(w.dtype)

    merged = jax.tree_util.tree_map_with_path(merge_leaf, params)
    if missing:
        raise ValueError(f"LoRA params for paths not in the params tree: {sorted(missing)}")
    return merged


_DENSE = (nn.Dense, nn.DenseGeneral)


@contextlib.contextmanager
def intercept(
    lora: LoraParams,
    config: LoraConfig,
    *,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    require_all: bool = True,
) -> Iterator[None]:
    """Inside this context every targeted nn.Dense / DenseGeneral adds (alpha / r) drop(x) @ A @ B.

    A Dense at module path ('language_model', 'layers_0', 'self_attn', 'q_proj') is targeted when
    '<path>/kernel' is a key of `lora`. Dropout (rate config.dropout) applies to the adapter input
    only, when deterministic=False (needs dropout_rng; each layer folds its path into the key).
    With require_all (default), every LoRA entry must be used by the wrapped call (checked when
    the context exits), so a mismatch between paths and modules, or a call through an
    already-jitted wrapper, cannot silently train nothing; pass False for calls that
    legitimately touch only part of the model.
    """
    if not deterministic and config.dropout > 0 and dropout_rng is None:
        raise ValueError("LoRA dropout with deterministic=False needs dropout_rng")
    used: set[str] = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, _DENSE) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(module.path) + "/kernel"
        if path not in lora:
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.DenseGeneral) and (
            module.axis not in (-1, (-1,)) or module.batch_dims
        ):
            raise ValueError(f"LoRA on {path}: only DenseGeneral over the last input axis")
        used.add(path)
        y = next_fun(*args, **kwargs)
        x = args[0]
        if not deterministic and config.dropout > 0:
            key = jax.random.fold_in(dropout_rng, zlib.crc32(path.encode()))
            keep = jax.random.bernoulli(key, 1.0 - config.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(x.dtype)
        ab = lora[path]
        h = jnp.dot(x, ab["a"].astype(x.dtype))  # [..., r]
        extra = jnp.tensordot(h, ab["b"].astype(x.dtype), axes=1)  # [..., *out]
        return y + (config.scale * extra).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield
    unused = set(lora) - used
    if require_all and unused:
        raise ValueError(
            "LoRA params not used by any nn.Dense inside `intercept` (was the model called "
            f"through an already-jitted wrapper?): {sorted(unused)[:5]}"
            f"{' ...' if len(unused) > 5 else ''}"
        )


# ---------------------------------------------------------------- trainable masks (full tuning)


def trainable_mask(
    params: Any, trainable: Sequence[str] = (r".*",), frozen: Sequence[str] = JANUS_FROZEN
) -> Any:
    """Bool pytree: a leaf trains when its path matches a `trainable` regex and no `frozen` one."""

    def label(path, _):
        s = path_str(path)
        return _matches(s, trainable) and not _matches(s, frozen)

    return jax.tree_util.tree_map_with_path(label, params)


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen): the same tree twice, with None where a leaf belongs to the other part.

    None is an empty subtree to JAX and optax, so `jax.grad` and an optimizer over `trainable`
    see only the trainable leaves and hold no state for the frozen ones.
    """
    trainable = jax.tree.map(lambda x, m: x if m else None, params, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, params, mask)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `partition`."""
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def masked_optimizer(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """`tx` on trainable leaves, zero updates and no state on frozen ones (for the full tree)."""
    labels = jax.tree.map(lambda m: "trainable" if m else "frozen", mask)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
