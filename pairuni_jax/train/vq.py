"""Fit a tiny VQ (Janus's VQ-16 architecture, fewer levels) on Shapes world images.

    python -m pairuni_jax.train.vq --workdir /tmp/vq

Losses as in LlamaGen's VQ with an L2-normalised codebook (the original Janus quantizer): z and
the codebook rows are L2-normalised, the code is the nearest row, and
    loss = |x - D(z_q)| + ||x - D(z_q)||^2 + ||z_q - sg(z)||^2 + beta ||sg(z_q) - z||^2,
with the straight-through estimator z_q = z + sg(z_q - z). No perceptual or GAN loss: the images
are flat colours on a plain background; the L1 term keeps edges sharp.

Two things make the fit converge in a few hundred steps instead of thousands: the first
`autoencoder_fraction` of the steps train the encoder and decoder with the quantizer bypassed
(the decoder sees the L2-normalised z itself), then the codebook is initialised by spherical
k-means on the encoder's latents of training images, so the VQ phase starts from codes that
already tile the latents the decoder has learned to read. Codes that no batch has picked for a
while are re-seeded from the current batch's latents, so the codebook stays in use.

Training images are train-split scenes only; the checker is then run on reconstructions of
ground-truth generation images (`checker_accuracy`). The fit resumes from its Orbax checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pairuni_jax.data.shapes import generation_item, sample_random_scene
from pairuni_jax.data.shapes_eval import geneval_accuracy
from pairuni_jax.data.shapes_render import DEFAULT_WORLD, WorldConfig, render
from pairuni_jax.models.configs import VQConfig
from pairuni_jax.models.vq import VQModel, init_params, l2_normalize, nearest_code
from pairuni_jax.train.checkpoint import Checkpointer
from pairuni_jax.train.stages import settings_diff

SHAPES_CODEBOOK_SIZE = 1024  # the embedded world's image tokens (Janus: 16384)


def shapes_vq_config(image_size: int = 32, codebook_size: int = SHAPES_CODEBOOK_SIZE) -> VQConfig:
    """The embedded world's VQ: 3 levels (4x down), so 32 px -> an 8 x 8 grid of 64 tokens.

    16 channels at the two finer levels, 32 at the coarsest: the full-resolution convolutions
    dominate the fit's cost, and flat-colour scenes need no more to pass the checker.
    """
    return VQConfig(image_size=image_size, codebook_size=codebook_size, codebook_dim=8, ch=16,
                    ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32, num_groups=8)


@dataclasses.dataclass(frozen=True)
class VQTrainConfig:
    steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    beta: float = 0.25  # commitment weight
    num_images: int = 4096  # rendered train-split scenes the fit samples from
    restart_after: int = 50  # steps without use before a code is re-seeded
    autoencoder_fraction: float = 0.25  # leading share of the steps with the quantizer bypassed
    kmeans_images: int = 256  # images whose latents (x grid^2 each) the codebook k-means uses
    kmeans_iterations: int = 20
    crop_size: int = 0  # > 0: train on random crops of this side (grid-aligned); 0: whole images
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 400


DEFAULT_TRAIN = VQTrainConfig()


def training_images(num: int, world: WorldConfig = DEFAULT_WORLD, seed: int = 0) -> np.ndarray:
    """uint8 [num, S, S, 3]: half prompt scenes of every category, half random scenes (train)."""
    images = []
    for i in range(num):
        if i % 2 == 0:
            scene = generation_item(seed, i // 2, "train", world).scene
        else:
            rng = np.random.default_rng([seed, 7, i])
            scene = sample_random_scene(rng, world)
        images.append(render(scene, world.image_size))
    return np.stack(images)


def check_crop_size(size: int, side: int, align: int, field: str = "VQTrainConfig.crop_size"):
    """Raise naming `field` unless size is 0 (whole images) or a multiple of align in (0, side]."""
    if size != 0 and (size % align or not 0 < size <= side):
        raise ValueError(f"{field} {size}: need a multiple of {align} in (0, {side}], or 0")


def random_crops(images: np.ndarray, size: int, align: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A random size x size crop of each image [B, S, S, 3] at offsets that are multiples of
    `align` (so crops keep the token grid's phase); size 0 or S: the images themselves."""
    side = images.shape[1]
    check_crop_size(size, side, align)
    if size in (0, side):
        return images
    n = len(images)
    top, left = (align * rng.integers(0, (side - size) // align + 1, (2, n)))  # [2, B]
    rows = top[:, None] + np.arange(size)  # [B, size]
    cols = left[:, None] + np.arange(size)
    return images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def to_model_pixels(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [..., 3] -> float32 in [-1, 1]."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def to_uint8(pixels: jax.Array) -> np.ndarray:
    """Decoder output in about [-1, 1] -> uint8, as the original does: clip((x + 1) / 2 * 255)."""
    return np.asarray(jnp.clip((pixels + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def vq_losses(model: VQModel, params, pixels: jax.Array, beta: float,
              quantize: jax.Array | float = 1.0):
    """pixels [B, H, W, 3] in [-1, 1] -> (total loss, (metrics, codes [B, h, w], z)).

    `quantize` 1 is the VQ; 0 bypasses the quantizer (the decoder reads the normalised z and the
    codebook and commitment terms are off): the autoencoder phase. A traced scalar, so both
    phases share one compiled step.
    """
    z = l2_normalize(model.apply(params, pixels, method=VQModel.encode_latents))  # [B, h, w, d]
    table = model.apply(params, method=VQModel.codebook)  # [K, d], normalised rows
    codes = nearest_code(jax.lax.stop_gradient(z), jax.lax.stop_gradient(table))
    zq = table[codes]
    codebook_loss = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(z)))
    commit_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - z))
    zq_st = z + quantize * jax.lax.stop_gradient(zq - z)
    recon = model.apply(params, zq_st, method=VQModel.decode_latents)
    recon_loss = jnp.mean(jnp.abs(recon - pixels)) + jnp.mean(jnp.square(recon - pixels))
    total = recon_loss + quantize * (codebook_loss + beta * commit_loss)
    metrics = {"loss": total, "recon": recon_loss, "codebook": codebook_loss,
               "commit": commit_loss}
    return total, (metrics, codes, z)


def make_train_step(model: VQModel, optimizer: optax.GradientTransformation, train: VQTrainConfig):
    """Jitted step: (params, opt_state, last_used [K], step, pixels, key) -> updated + metrics.

    Steps before `autoencoder_steps(train)` bypass the quantizer and restart no codes.
    """
    vq_from = autoencoder_steps(train)

    @jax.jit
    def step_fn(params, opt_state, last_used, step, pixels, key):
        quantize = (step >= vq_from).astype(jnp.float32)
        grad_fn = jax.value_and_grad(
            functools.partial(vq_losses, model, beta=train.beta, quantize=quantize),
            has_aux=True)
        (_, (metrics, codes, z)), grads = grad_fn(params, pixels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Dead-code restarts: codes unused for `restart_after` steps take a random current latent.
        k = last_used.shape[0]
        used = jnp.zeros(k, bool).at[codes.reshape(-1)].set(True)
        last_used = jnp.where(used, step, last_used)
        dead = ((step - last_used) > train.restart_after) & (quantize > 0)
        flat_z = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))  # [B*h*w, d]
        picks = flat_z[jax.random.randint(key, (k,), 0, flat_z.shape[0])]
        table = params["params"]["quantize"]["embedding"]
        params["params"]["quantize"]["embedding"] = jnp.where(dead[:, None], picks, table)
        last_used = jnp.where(dead, step, last_used)
        metrics = dict(metrics, codes_used=used.sum(), restarted=dead.sum())
        return params, opt_state, last_used, metrics

    return step_fn


def autoencoder_steps(train: VQTrainConfig) -> int:
    """Steps of the autoencoder phase; the codebook is initialised by k-means at this step."""
    return int(train.steps * train.autoencoder_fraction)


def spherical_kmeans(points: jax.Array, k: int, iterations: int, key: jax.Array) -> jax.Array:
    """Unit-norm centroids [k, d] of unit vectors points [N, d], cosine k-means.

    Starts from k random points (distinct when N >= k); an empty cluster keeps its previous
    centroid (with N < k some codes start as duplicates; the dead-code restarts move them).
    """
    n = points.shape[0]
    centroids = points[jax.random.choice(key, n, (k,), replace=n < k)]

    def body(_, c):
        assign = jax.nn.one_hot(nearest_code(points, c), k, dtype=points.dtype)  # [N, k]
        sums = assign.T @ points  # [k, d]
        counts = assign.sum(0)[:, None]
        return jnp.where(counts > 0, l2_normalize(sums), c)

    return jax.lax.fori_loop(0, iterations, body, centroids)


def kmeans_codebook(model: VQModel, params, images: np.ndarray, train: VQTrainConfig,
                    key: jax.Array) -> jax.Array:
    """Codebook [K, d]: spherical k-means over the normalised latents of `kmeans_images` images."""
    n = min(train.kmeans_images, len(images))
    encode = jax.jit(lambda p, x: l2_normalize(
        model.apply(p, to_model_pixels(x), method=VQModel.encode_latents)))
    dim = model.config.codebook_dim
    latents = jnp.concatenate([encode(params, images[i:min(i + 256, n)]).reshape(-1, dim)
                               for i in range(0, n, 256)])  # [n * h * w, d]
    return jax.jit(spherical_kmeans, static_argnums=(1, 2))(
        latents, model.config.codebook_size, train.kmeans_iterations, key)


def make_optimizer(train: VQTrainConfig) -> optax.GradientTransformation:
    """Adam with linear warmup and cosine decay to 5% of the peak rate."""
    if not 0 <= train.warmup_steps < train.steps:
        raise ValueError(f"VQTrainConfig: warmup_steps ({train.warmup_steps}) must be in "
                         f"[0, steps) with steps = {train.steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, train.warmup_steps,
                                                  train.steps, train.learning_rate * 0.05)
    return optax.adam(schedule)


@functools.lru_cache(maxsize=8)
def _cached_step(model: VQModel, train: VQTrainConfig):
    """One compiled step per (model, training config), shared by fits in the same process."""
    optimizer = make_optimizer(train)
    return optimizer, make_train_step(model, optimizer, train)


def reconstruct(model: VQModel, params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Encode then decode uint8 images [N, S, S, 3] -> uint8 [N, S, S, 3]."""

    @jax.jit
    def fn(x):
        return model.apply(params, to_model_pixels(x))

    out = [to_uint8(fn(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def checker_accuracy(model: VQModel, params, world: WorldConfig = DEFAULT_WORLD,
                     per_category: int = 50, split: str = "train",
                     seed: int = 1234) -> dict[str, float]:
    """GenEval-style accuracy of the checker on VQ reconstructions of ground-truth images."""
    items = [generation_item(seed, i, split, world) for i in range(6 * per_category)]
    images = np.stack([render(it.scene, world.image_size) for it in items])
    return geneval_accuracy(reconstruct(model, params, images), [it.prompt for it in items],
                            world)


def fit_vq(workdir: str, *, world: WorldConfig = DEFAULT_WORLD, vq: VQConfig | None = None,
           train: VQTrainConfig = DEFAULT_TRAIN, stop_after: int | None = None,
           log=print) -> tuple[VQModel, dict]:
    """Fit (or resume, or just load if finished) the VQ under `workdir`; returns (model, params).

    `stop_after` ends the run early at that step, with a checkpoint (a time-boxed or interrupted
    run); calling again resumes exactly where it stopped. Calling it on a fit made with other
    settings (say the default 3000 steps on a finished 2000-step fit) is refused rather than
    training that fit on.
    """
    vq = vq or shapes_vq_config(world.image_size)
    if vq.image_size != world.image_size:
        raise ValueError(f"VQ image_size {vq.image_size} != world image_size {world.image_size}")
    model = VQModel(config=vq)
    images = training_images(train.num_images, world, train.seed)
    key = jax.random.PRNGKey(train.seed)
    params = init_params(vq, train.seed)
    optimizer, step_fn = _cached_step(model, train)
    state = {"params": params, "opt_state": optimizer.init(params),
             "last_used": jnp.zeros(vq.codebook_size, jnp.int32), "step": jnp.int32(0)}
    settings = fit_settings(vq, train)
    with Checkpointer(os.path.join(workdir, "checkpoints"), keep=2) as ckpt:
        if ckpt.latest_step() is not None:
            check_settings(workdir, ckpt.meta().get("settings"), settings)
            state, _ = ckpt.restore(state)
            log(f"vq: resumed at step {int(state['step'])}")
        t0, start = time.perf_counter(), int(state["step"])
        end = train.steps if stop_after is None else min(stop_after, train.steps)
        for step in range(start, end):
            if step == autoencoder_steps(train) and step > 0:
                state = _start_quantizing(model, state, images, train, key, log)
            rng = np.random.default_rng([train.seed, step])  # data order is a function of step
            batch = to_model_pixels(random_crops(
                images[rng.integers(0, len(images), train.batch_size)], train.crop_size,
                vq.downsample, rng))
            params, opt_state, last_used, metrics = step_fn(
                state["params"], state["opt_state"], state["last_used"], jnp.int32(step), batch,
                jax.random.fold_in(key, step))
            state = {"params": params, "opt_state": opt_state, "last_used": last_used,
                     "step": jnp.int32(step + 1)}
            if (step + 1) % train.log_every == 0 or step + 1 == train.steps:
                m = {k: float(v) for k, v in metrics.items()}
                rate = (step + 1 - start) / (time.perf_counter() - t0)
                log(f"vq step {step + 1}/{train.steps}: recon {m['recon']:.4f} codebook "
                    f"{m['codebook']:.4f} commit {m['commit']:.4f} codes used "
                    f"{int(m['codes_used'])} restarted {int(m['restarted'])} ({rate:.1f} steps/s)")
            if (step + 1) % train.checkpoint_every == 0 or step + 1 == end:
                ckpt.save(step + 1, state, {"settings": settings})
    return model, state["params"]


def fit_settings(vq: VQConfig, train: VQTrainConfig) -> dict:
    """What a fit's result depends on (JSON): the architecture and the training settings (their
    logging and checkpoint periods are bookkeeping: `check_settings` ignores them)."""
    return json.loads(json.dumps({"vq": dataclasses.asdict(vq),
                                  "train": dataclasses.asdict(train)}))


def check_settings(workdir: str, before: dict | None, now: dict) -> None:
    """Raise if the fit in `workdir` was made with other settings (fits saved before settings
    were recorded are not checked)."""
    diff = [] if before is None else settings_diff(before, now)
    if diff:
        raise ValueError(f"{workdir}: the VQ there was fitted with other settings "
                         f"({'; '.join(diff)}); pass the settings it was fitted with to resume "
                         "or load it, or use another workdir")


def _start_quantizing(model: VQModel, state: dict, images: np.ndarray, train: VQTrainConfig,
                      key: jax.Array, log) -> dict:
    """End of the autoencoder phase: k-means codebook, every code counted as just used."""
    t0 = time.perf_counter()
    params = state["params"]
    table = kmeans_codebook(model, params, images, train, jax.random.split(key)[1])
    params = jax.tree.map(lambda x: x, params)  # a new tree; the old one may be checkpointed
    params["params"]["quantize"]["embedding"] = table
    log(f"vq: codebook from k-means on encoder latents at step {int(state['step'])} "
        f"({time.perf_counter() - t0:.1f} s)")
    return dict(state, params=params, last_used=jnp.full_like(state["last_used"], state["step"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fit the Shapes world's tiny VQ.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=VQTrainConfig.steps)
    parser.add_argument("--batch_size", type=int, default=VQTrainConfig.batch_size)
    parser.add_argument("--image_size", type=int, default=DEFAULT_WORLD.image_size)
    parser.add_argument("--codebook_size", type=int, default=SHAPES_CODEBOOK_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning_rate", type=float, default=VQTrainConfig.learning_rate)
    parser.add_argument("--crop_size", type=int, default=VQTrainConfig.crop_size,
                        help="train on random crops of this side (0: whole images)")
    args = parser.parse_args(argv)
    world = WorldConfig(image_size=args.image_size)
    train = VQTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                          learning_rate=args.learning_rate, crop_size=args.crop_size,
                          log_every=50)
    t0 = time.perf_counter()
    model, params = fit_vq(args.workdir, world=world, train=train,
                           vq=shapes_vq_config(args.image_size, args.codebook_size))
    print(f"fit in {time.perf_counter() - t0:.0f} s")
    for split in ("train", "heldout"):
        acc = checker_accuracy(model, params, world, split=split)
        print(f"checker accuracy on VQ reconstructions ({split}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
