"""Supervised warm start on both tasks: answer tokens (understanding) and image tokens (generation).

The two objectives are the text-token and image-token cross-entropies, combined by the same
combiner as RL (`pareto.combined_gradient`: 'sum', or 'pareto' min-norm: the Pareto LoRA setting).
Both are token means over their task's batch; they come back separately in the metrics.

Classifier-free guidance samples from uncond + w * (cond - uncond). With `cfg_dropout` > 0 that
share of the generation examples in each batch is trained on its unconditional prompt (BOS, pads,
<begin_of_image>: the rollout's row), so the unconditional branch learns the image distribution,
as in CFG-trained image models (LlamaGen drops 10% of its conditions). Off by default: on the
Shapes world it made the guided images of the SFT policy fuller but the RL gains smaller (README).

Data are held in memory as padded numpy arrays (`SFTData`); the batch of step s is drawn with
numpy's generator seeded by (seed, s), so a resumed run sees exactly the batches of an
uninterrupted one. Batches use the update step's layout (`rl_step`): per task prompt_ids,
prompt_mask, response_ids, response_mask (+ image_mask, pixels for understanding).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pairuni_jax.models import lora as lora_lib
from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.processing import JanusProcessor, pad_left
from pairuni_jax.rl import pareto
from pairuni_jax.train import rl_step, sharding
from pairuni_jax.train.checkpoint import Checkpointer
from pairuni_jax.train.metrics import MetricsWriter, Progress

TASKS = rl_step.TASKS  # ("gen", "und"): objective order in the combiner


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 1500
    batch_size: int = 32  # items per task per step
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    cfg_dropout: float = 0.0  # share of generation examples trained on the unconditional prompt
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    combiner: pareto.CombinerConfig = pareto.CombinerConfig()
    lora: lora_lib.LoraConfig | None = None  # None: full fine-tuning of `trainable` leaves
    trainable: tuple[str, ...] = (r".*",)
    frozen: tuple[str, ...] = (r"^vqmodel/",)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500

    def __post_init__(self):
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"SFTConfig.cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclasses.dataclass
class SFTData:
    """Padded examples of both tasks (numpy). Understanding: prompts with the image placeholders
    expanded, left-padded; answers right-padded. Generation: prompts left-padded; image codes."""

    und_ids: np.ndarray  # int32 [Nu, Lu]
    und_mask: np.ndarray  # bool [Nu, Lu]
    und_pixels: np.ndarray  # float32 [Nu, S, S, 3] in [-1, 1]
    und_answer_ids: np.ndarray  # int32 [Nu, Ta]
    und_answer_mask: np.ndarray  # bool [Nu, Ta]
    gen_ids: np.ndarray  # int32 [Ng, Lg]
    gen_mask: np.ndarray  # bool [Ng, Lg]
    gen_codes: np.ndarray  # int32 [Ng, N]
    gen_uncond_ids: np.ndarray  # int32 [Ng, Lg]: the unconditional prompts (gen_mask applies)
    image_placeholder_id: int

    def batch(self, rng: np.random.Generator, size: int, cfg_dropout: float = 0.0) -> dict:
        """A random batch in the update step's layout; a `cfg_dropout` share of the generation
        rows (each independently) carry their unconditional prompt."""
        u = rng.integers(0, len(self.und_ids), size)
        g = rng.integers(0, len(self.gen_ids), size)
        ids = self.und_ids[u]
        gen_ids = self.gen_ids[g]
        if cfg_dropout > 0:  # no draw at 0: the batches of runs without dropout stay as they were
            drop = rng.random(size) < cfg_dropout  # [B]
            gen_ids = np.where(drop[:, None], self.gen_uncond_ids[g], gen_ids)
        return {
            "und": {
                "prompt_ids": ids,
                "prompt_mask": self.und_mask[u],
                "image_mask": ids == self.image_placeholder_id,
                "pixels": self.und_pixels[u],
                "response_ids": self.und_answer_ids[u],
                "response_mask": self.und_answer_mask[u],
            },
            "gen": {
                "prompt_ids": gen_ids,
                "prompt_mask": self.gen_mask[g],
                "response_ids": self.gen_codes[g],
                "response_mask": np.ones(self.gen_codes[g].shape, bool),
            },
        }


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists: (ids int32 [B, L], mask bool [B, L])."""
    ids, mask = pad_left([list(s)[::-1] for s in seqs], pad_id)
    return ids[:, ::-1].copy(), mask[:, ::-1].copy()


def build_sft_data(
    processor: JanusProcessor,
    und_items: Sequence[tuple[np.ndarray, str, str]],
    gen_items: Sequence[tuple[str, np.ndarray]],
) -> SFTData:
    """und_items: (image uint8 [H, W, 3], question, answer); gen_items: (prompt, codes [N])."""
    und_ids, und_mask = pad_left([processor.understanding_ids(q) for _, q, _ in und_items],
                                 processor.pad_id)
    answers, answer_mask = right_pad([processor.answer_ids(a) for _, _, a in und_items],
                                     processor.pad_id)
    pixels = np.stack([processor.preprocess_image(im) for im, _, _ in und_items])
    prompts = [processor.generation_ids(p) for p, _ in gen_items]
    gen_ids, gen_mask = pad_left(prompts, processor.pad_id)
    uncond_ids, _ = pad_left([processor.unconditional_ids(x) for x in prompts], processor.pad_id)
    codes = np.stack([np.asarray(c, np.int32).reshape(-1) for _, c in gen_items])
    return SFTData(und_ids, und_mask, pixels, answers, answer_mask, gen_ids, gen_mask, codes,
                   uncond_ids, processor.image_placeholder_id)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over mask (0 when the mask is empty)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_losses(trainable, frozen, model_config: JanusConfig, cfg: SFTConfig, batch) -> jax.Array:
    """Token-mean cross-entropies [2] in TASKS order (gen, und)."""
    update_cfg = rl_step.UpdateConfig(lora=cfg.lora, shared_prompts=False)  # rows: own prompts
    return jnp.stack([
        masked_mean(-rl_step.policy_log_probs(trainable, frozen, model_config, update_cfg, t,
                                              batch[t]), batch[t]["response_mask"])
        for t in TASKS])


def sft_step(state: rl_step.TrainState, batch, *, model_config: JanusConfig, cfg: SFTConfig,
             tx: optax.GradientTransformation):
    """One combined-gradient step; returns (state, metrics)."""
    loss_fn = functools.partial(sft_losses, frozen=state.frozen, model_config=model_config,
                                cfg=cfg)
    grads, info, _ = pareto.combined_gradient(
        lambda p, b: loss_fn(p, batch=b), state.trainable, batch, config=cfg.combiner)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": jnp.sum(info["losses"]), "grad_norm": optax.global_norm(grads)}
    for i, t in enumerate(TASKS):
        metrics[f"{t}/loss"] = info["losses"][i]
        metrics[f"{t}/weight"] = jnp.mean(info["weights"][:, i])
        if "grad_norms" in info:
            metrics[f"{t}/grad_norm"] = info["grad_norms"][i]
    if "cosine" in info:
        metrics["grad_cosine"] = info["cosine"]
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def make_optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
        cfg.learning_rate * 0.05)
    return rl_step.make_optimizer(schedule, cfg.weight_decay, cfg.max_grad_norm)


def init_sft_state(params, cfg: SFTConfig, tx: optax.GradientTransformation, rng: jax.Array):
    mask = lora_lib.trainable_mask(params, cfg.trainable, cfg.frozen)
    return rl_step.init_state(params, tx, lora=cfg.lora, rng=rng, trainable_mask=mask)


def train_sft(
    params,
    model_config: JanusConfig,
    data: SFTData,
    cfg: SFTConfig,
    workdir: str,
    *,
    evaluate: Callable | None = None,
    eval_every: int = 0,
    log: Callable[[str], None] = print,
):
    """Train (or resume) under `workdir`; returns the final params (LoRA merged) and metrics.

    `evaluate(params, step) -> (metrics, images uint8 [n, H, W, 3], captions)` runs at the start,
    every `eval_every` steps and at the end; metrics are logged with the prefix "eval/".
    """
    tx = make_optimizer(cfg)
    state = sharding.on_first_device(init_sft_state(params, cfg, tx, jax.random.key(cfg.seed)))
    step_fn = jax.jit(functools.partial(sft_step, model_config=model_config, cfg=cfg, tx=tx),
                      donate_argnums=0)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    final: dict[str, float] = {}
    with Checkpointer(os.path.join(workdir, "checkpoints"), keep=2) as ckpt:
        if ckpt.latest_step() is not None:
            state, _ = ckpt.restore(state)
            log(f"sft: resumed at step {int(state.step)}")
        start = int(state.step)
        progress = Progress(cfg.steps, "sft", first_step=start)

        def run_eval(step):
            if evaluate is not None:
                result, images, captions = evaluate(merged_params(state, cfg), step)
                writer.scalars(step, result, prefix="eval/")
                writer.images(step, "eval_samples", images, captions)
                final.update({f"eval/{k}": v for k, v in result.items()})
                log(f"sft eval at step {step}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in sorted(result.items()) if k.endswith("overall")))

        if start == 0:
            run_eval(0)
        t0 = time.perf_counter()
        for step in range(start, cfg.steps):
            batch = data.batch(np.random.default_rng([cfg.seed, step]), cfg.batch_size,
                               cfg.cfg_dropout)
            state, metrics = step_fn(state, batch)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                m = {k: float(v) for k, v in metrics.items()}
                m["steps_per_s"] = (done - start) / (time.perf_counter() - t0)
                writer.scalars(done, m, prefix="train/")
                progress.report(done, {k: m[k] for k in ("gen/loss", "und/loss")})
                final.update({f"train/{k}": v for k, v in m.items()})
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                ckpt.save(done, state)
            if evaluate is not None and eval_every and done % eval_every == 0 and done != cfg.steps:
                run_eval(done)
        if start < cfg.steps or not final:
            run_eval(cfg.steps)
    writer.close()
    return merged_params(state, cfg), final


def merged_params(state: rl_step.TrainState, cfg: SFTConfig):
    """Full model params from a state: LoRA merged into the base, or the two partitions joined."""
    if cfg.lora is not None:
        return lora_lib.merge(state.frozen, state.trainable, cfg.lora)
    return lora_lib.combine(state.trainable, state.frozen)
