"""Pretraining the Shapes policy's vision encoder: name the colour and the shape under each patch.

Janus-Pro's SigLIP encoder arrives pretrained; the tiny policy's starts from random weights and
SFT alone teaches it little (the SFT policy reads colours, hardly shapes: README). This stage
trains the encoder (`vision_model`, SigLIP architecture) on the world's training images with two
linear heads over its patch features: each patch's share of pixels per colour (background
included) and per shape, as soft-label cross-entropies. Only training scenes are used, so the
held-out split's colour-shape combinations stay unseen. The heads are dropped; SFT starts from
the encoder (`ShapesJob.sft`). Off in the default config (`vision.steps = 0`, README).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pairuni_jax.data.shapes_render import COLORS, SHAPES, Scene, object_map
from pairuni_jax.models.configs import SigLIPConfig
from pairuni_jax.models.siglip import SigLIPVisionModel

Params = dict


@dataclasses.dataclass(frozen=True)
class VisionPretrainConfig:
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0
    log_every: int = 100


def patch_targets(scene: Scene, image_size: int, patch_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (row-major, as the encoder's features), the share of its pixels of each colour
    and of each shape, index 0 = background: ([N, 1 + len(COLORS)], [N, 1 + len(SHAPES)])."""
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch {patch_size}")
    index = object_map(scene, image_size) + 1  # [S, S]: 0 = background, 1 + object index
    colour = np.array([0] + [1 + COLORS.index(o.color) for o in scene])[index]  # [S, S]
    shape = np.array([0] + [1 + SHAPES.index(o.shape) for o in scene])[index]
    g = image_size // patch_size

    def shares(classes: np.ndarray, k: int) -> np.ndarray:
        onehot = np.eye(k, dtype=np.float32)[classes]  # [S, S, k]
        return onehot.reshape(g, patch_size, g, patch_size, k).mean((1, 3)).reshape(g * g, k)

    return shares(colour, 1 + len(COLORS)), shares(shape, 1 + len(SHAPES))


def pretrain_vision(params: Params, config: SigLIPConfig, pixels: np.ndarray,
                    colour_targets: np.ndarray, shape_targets: np.ndarray,
                    cfg: VisionPretrainConfig, log: Callable[[str], None] = print
                    ) -> tuple[Params, dict[str, float]]:
    """Train `vision_model` params on images (float32 [B, S, S, 3] in [-1, 1], as the processor
    makes them) and their `patch_targets` ([B, N, 7], [B, N, 4]); returns the params and the last
    step's losses (nats per patch)."""
    if not len(pixels) == len(colour_targets) == len(shape_targets):
        raise ValueError(f"{len(pixels)} images for {len(colour_targets)} colour and "
                         f"{len(shape_targets)} shape targets")
    model = SigLIPVisionModel(config)
    gen = np.random.default_rng(cfg.seed)
    width = config.width
    heads = {name: jnp.asarray(gen.normal(0.0, width ** -0.5, (width, t.shape[-1])), jnp.float32)
             for name, t in (("colour", colour_targets), ("shape", shape_targets))}
    state = {"vision_model": params, "heads": heads}
    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1)))

    def losses(state, pixels, colour, shape):
        feats = model.apply({"params": state["vision_model"]}, pixels)  # [B, N, width]

        def xent(head, target):
            return -(target * jax.nn.log_softmax(feats @ head)).sum(-1).mean()

        return jnp.stack([xent(state["heads"]["colour"], colour),
                          xent(state["heads"]["shape"], shape)])

    @jax.jit
    def step(state, opt_state, pixels, colour, shape):
        def total(s):
            parts = losses(s, pixels, colour, shape)  # [2]: colour, shape
            return parts.sum(), parts

        (_, parts), grads = jax.value_and_grad(total, has_aux=True)(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, parts

    opt_state = optimizer.init(state)
    start, last = time.time(), np.zeros(2)
    for i in range(cfg.steps):
        idx = gen.integers(0, len(pixels), cfg.batch_size)
        state, opt_state, last = step(state, opt_state, pixels[idx], colour_targets[idx],
                                      shape_targets[idx])
        if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps:
            last = np.asarray(last)
            log(f"[vision] step {i + 1}/{cfg.steps} colour {last[0]:.3f} shape {last[1]:.3f} "
                f"nats/patch ({time.time() - start:.0f} s)")
    last = np.asarray(last)
    return state["vision_model"], {"colour_loss": float(last[0]), "shape_loss": float(last[1])}
