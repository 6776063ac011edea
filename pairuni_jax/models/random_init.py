"""Random params drawn with numpy from an abstract param tree: no model compile, no eager ops.

Flax's `Module.init` runs every initializer op by op (or compiles them all under jit), which for a
conv net of 60 kernels costs 10-25 s of compilation on a CPU; drawing from `jax.eval_shape`'s tree
with numpy costs milliseconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Params = dict


def random_params(shapes: Params, rng: jax.Array | int = 0) -> Params:
    """Leaves of `shapes` (jax.ShapeDtypeStruct, Flax names) drawn by name with numpy.

    Kernels normal(0, 1/fan_in) (fan_in: all dims but the last), norm scales 1, biases 0,
    position embeddings normal(0, 0.02), a VQ codebook (`quantize/embedding`, K rows)
    uniform(-1/K, 1/K), other embedding tables normal(0, 1). rng: a jax key or an int seed.
    """
    if not isinstance(rng, int):
        rng = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    gen = np.random.default_rng(rng)

    def draw(path, leaf):
        name = path[-1].key
        shape, dtype = leaf.shape, leaf.dtype
        if name == "scale":
            x = np.ones(shape)
        elif name == "bias":
            x = np.zeros(shape)
        elif name == "kernel":
            x = gen.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name == "position_embedding":
            x = gen.normal(0.0, 0.02, shape)
        elif len(path) > 1 and path[-2].key == "quantize":
            x = gen.uniform(-1.0 / shape[0], 1.0 / shape[0], shape)
        else:  # token / image-token embedding tables
            x = gen.normal(0.0, 1.0, shape)
        return jnp.asarray(x.astype(np.float32), dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
