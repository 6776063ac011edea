"""The Pair-GRPO loop: batches of pairs -> rollouts -> rewards -> `mu` jitted updates.

One step, for a batch of P pairs (REFERENCE.md §2):
  1. rollout: G_u answers per question (lm_head) and G_g CFG images per prompt (gen_head), with
     the current policy; images decoded by the VQ;
  2. rewards: multiple-choice accuracy (+ optional format) and the generation reward registry;
  3. advantages per task and prompt, times the pair weight (inside the update step);
  4. `mu` updates on the clipped objective, both tasks' gradients combined by sum or min-norm.
The state (trainable params, optimizer, step), the rng and the data position are checkpointed, so a
resumed run repeats exactly the steps an uninterrupted one would have taken (the step's rng is
fold_in(seed key, step); the pipeline's position is part of the checkpoint). A non-finite update is
skipped inside the jitted step and counted; `max_nonfinite` in a row stop the run with its last
good checkpoint intact. SIGTERM saves a checkpoint at the next step boundary and stops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import optax

from pairuni_jax import rollout
from pairuni_jax.models import lora as lora_lib
from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.processing import JanusProcessor
from pairuni_jax.rl.rewards import understanding_rewards
from pairuni_jax.train import rl_step
from pairuni_jax.train.checkpoint import Checkpointer, PreemptionGuard
from pairuni_jax.train.metrics import MetricsWriter, Progress


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint: the stage is not finished; rerun to resume."""


class NonFiniteUpdates(RuntimeError):
    """Too many non-finite updates in a row; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class RLConfig:
    steps: int = 1200
    temperature: float = 1.0
    guidance: float = 5.0
    max_new_tokens: int = 16
    mu: int = 1  # updates per rollout batch
    learning_rate: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    update: rl_step.UpdateConfig = rl_step.UpdateConfig()
    trainable: tuple[str, ...] = (r".*",)  # full fine-tuning: leaves that train
    frozen: tuple[str, ...] = lora_lib.JANUS_FROZEN
    format_weight: float = 0.0
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50
    keep: int = 3
    eval_every: int = 0  # 0: only at the start and the end
    max_nonfinite: int = 5
    # The tasks trained: both (Pair-GRPO), or ("und",) / ("gen",) for a one-task run, which
    # skips the other task's rollout and reward.
    tasks: tuple[str, ...] = ("und", "gen")

    def __post_init__(self):
        if not self.tasks or len(set(self.tasks)) != len(self.tasks) or not set(self.tasks) <= {
            "und", "gen"}:
            raise ValueError(f"RLConfig.tasks={self.tasks!r}: a non-empty subset of ('und', 'gen')")


def make_optimizer(cfg: RLConfig) -> optax.GradientTransformation:
    lr = cfg.learning_rate
    if cfg.warmup_steps:
        lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return rl_step.make_optimizer(lr, cfg.weight_decay, cfg.max_grad_norm)


def policy_params(state: rl_step.TrainState, update: rl_step.UpdateConfig):
    """The full params the policy samples with (LoRA merged, or the partitions joined)."""
    if update.lora is not None:
        return lora_lib.merge(state.frozen, state.trainable, update.lora)
    return lora_lib.combine(state.trainable, state.frozen)


def rollout_batch(batch: dict, text: rollout.TextRollout | None,
                  images: rollout.ImageRollout | None, und_rewards: np.ndarray | None,
                  gen_rewards: np.ndarray | None, placeholder_id: int,
                  guided: bool = False) -> dict:
    """The update step's layout (rl_step): every leaf [P * G, ...], row p * G + g of a task is
    rollout g of pair p. Rewards [P, G]. A task whose rollout is None is left out (one-task runs);
    `guided` adds the unconditional prompts that guided image scoring needs."""
    out = {}
    rollouts = text if text is not None else images
    p, g = rollouts.tokens.shape[:2]
    rows = lambda x: np.repeat(np.asarray(x), g, axis=0)  # noqa: E731  [P, ...] -> [P * G, ...]
    pair = {"similarity": rows(batch["similarity"]), "aligned": rows(batch["pair_type"] == 0)}
    if text is not None:
        und_ids = rows(batch["und_ids"])  # [P * G, Lu]
        n_text = text.tokens.shape[-1]
        out["und"] = {
            "prompt_ids": und_ids,
            "prompt_mask": rows(batch["und_mask"]),
            "image_mask": und_ids == placeholder_id,
            "pixels": rows(batch["pixel_values"]),
            "response_ids": np.asarray(text.tokens).reshape(p * g, n_text),
            "response_mask": np.asarray(text.mask).reshape(p * g, n_text),
            "rewards": np.asarray(und_rewards, np.float32).reshape(p * g),
            **pair,
        }
    if images is not None:
        n_image = images.tokens.shape[-1]
        out["gen"] = {
            "prompt_ids": rows(batch["gen_ids"]),  # [P * G, Lg]
            "prompt_mask": rows(batch["gen_mask"]),
            "response_ids": np.asarray(images.tokens).reshape(p * g, n_image),
            "response_mask": np.ones((p * g, n_image), bool),
            "rewards": np.asarray(gen_rewards, np.float32).reshape(p * g),
            **pair,
        }
        if guided:
            out["gen"]["uncond_prompt_ids"] = rows(batch["gen_uncond_ids"])
            out["gen"]["uncond_prompt_mask"] = rows(batch["gen_mask"])
    return out


class PairGRPO:
    """The loop's pieces, jitted once: rollout, rewards, update; `train` runs them."""

    def __init__(self, model_config: JanusConfig, processor: JanusProcessor, cfg: RLConfig,
                 generation_reward: Callable[[np.ndarray, Sequence[str]], np.ndarray]):
        self.model_config, self.processor, self.cfg = model_config, processor, cfg
        self.generation_reward = generation_reward
        self.tx = make_optimizer(cfg)
        self.update = rl_step.make_update_fn(model_config, cfg.update, self.tx)
        self.old_log_probs = jax.jit(functools.partial(
            rl_step.log_probs, config=model_config, cfg_scale=cfg.update.image_cfg_scale))
        self.sampling = rollout.Sampling(temperature=cfg.temperature)

    def init_state(self, params) -> rl_step.TrainState:
        mask = lora_lib.trainable_mask(params, self.cfg.trainable, self.cfg.frozen)
        return rl_step.init_state(params, self.tx, lora=self.cfg.update.lora,
                                  rng=jax.random.key(self.cfg.seed), trainable_mask=mask)

    def rollouts(self, params, batch: dict, key: jax.Array):
        """(text rollouts or None, image rollouts or None) on the host, for the trained tasks."""
        c, p = self.cfg, self.processor
        k_text, k_image = jax.random.split(key)
        text = images = None
        if "und" in c.tasks:
            text = rollout.generate_text(
                params, self.model_config, batch["und_ids"], batch["und_mask"], k_text,
                batch["pixel_values"], num_samples=c.update.group_size,
                max_new_tokens=c.max_new_tokens,
                sampling=self.sampling, eos_id=p.eos_id, pad_id=p.pad_id,
                image_token_id=p.image_placeholder_id)
        if "gen" in c.tasks:
            images = rollout.generate_images(
                params, self.model_config, batch["gen_ids"], batch["gen_mask"], k_image,
                c.guidance, num_samples=c.update.group_size, sampling=self.sampling,
                bos_id=p.bos_id, boi_id=p.image_start_id, pad_id=p.pad_id)
        return jax.device_get(text), jax.device_get(images)

    def understanding_rewards(self, batch: dict, text) -> tuple[np.ndarray, np.ndarray]:
        """(reward, accuracy), both [P, G], of the sampled answers."""
        p, (n_pairs, g, _) = self.processor, text.tokens.shape
        outputs = [p.decode(t[m]) for t, m in zip(text.tokens.reshape(n_pairs * g, -1),
                                                   text.mask.reshape(n_pairs * g, -1),
                                                   strict=True)]
        und = understanding_rewards(
            outputs, np.repeat(batch["und_answer"], g).tolist(),
            format_weight=self.cfg.format_weight,
            num_options=np.repeat(batch["und_num_options"], g).tolist())
        return und["reward"].reshape(n_pairs, g), und["accuracy"].reshape(n_pairs, g)

    def image_rewards(self, batch: dict, images) -> np.ndarray:
        """[P, G] rewards of the sampled images for their prompts."""
        gen, _ = self.generation_reward(images.pixels, list(batch["gen_prompt"]))
        return np.asarray(gen).reshape(images.tokens.shape[:2])

    def step(self, state: rl_step.TrainState, batch: dict, key: jax.Array):
        """One Pair-GRPO step -> (state, metrics, rollout images or None, their rewards or None)."""
        t0 = time.perf_counter()
        params = policy_params(state, self.cfg.update)
        text, images = self.rollouts(params, batch, key)
        t1 = time.perf_counter()
        und_r = und_acc = gen_r = None
        if text is not None:
            und_r, und_acc = self.understanding_rewards(batch, text)
        if images is not None:
            gen_r = self.image_rewards(batch, images)
        t2 = time.perf_counter()
        rb = rollout_batch(batch, text, images, und_r, gen_r, self.processor.image_placeholder_id,
                           guided=self.cfg.update.image_cfg_scale is not None)
        if self.cfg.mu > 1:
            old = self.old_log_probs(params, batch=rb)
            for task in rb:
                rb[task]["old_logp"] = old[task]
        del params
        for _ in range(self.cfg.mu):
            state, metrics = self.update(state, rb)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t3 = time.perf_counter()
        tokens = 0
        if text is not None:
            tokens += int(text.mask.sum())
            metrics["und/accuracy"] = float(und_acc.mean())
            metrics["und/answer_length"] = float(text.mask.sum(-1).mean())
        if images is not None:
            tokens += int(np.prod(images.tokens.shape))
        metrics.update({
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2,
            "rollout_tokens_per_s": tokens / max(t1 - t0, 1e-9),
        })
        return (state, metrics, None if images is None else images.pixels, gen_r)


def data_skip_counts(pipeline) -> dict[str, float]:
    """Records the pipeline's source dropped while reading (on_error='skip'), by reason, as
    'data/skipped' (total) and 'data/skipped/<reason>'; empty when the source reports none."""
    skipped = getattr(getattr(pipeline.source, "read", None), "skipped", None)
    if skipped is None:
        return {}
    out = {"data/skipped": float(sum(skipped.values()))}
    out.update({f"data/skipped/{reason}": float(n) for reason, n in sorted(skipped.items())})
    return out


def train_rl(params, model_config: JanusConfig, processor: JanusProcessor, pipeline,
             generation_reward, cfg: RLConfig, workdir: str, *,
             evaluate: Callable | None = None, log: Callable[[str], None] = print):
    """Run (or resume) Pair-GRPO under `workdir`; returns (final params, summary metrics)."""
    loop = PairGRPO(model_config, processor, cfg, generation_reward)
    state = loop.init_state(params)
    del params
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    base_key = jax.random.key(cfg.seed)
    summary: dict[str, float] = {}
    skip_counts = data_skip_counts(pipeline)
    if skip_counts.get("data/skipped"):
        log(f"rl: the data source skipped {int(skip_counts['data/skipped'])} records: "
            + ", ".join(f"{k.rsplit('/', 1)[-1]}={int(v)}" for k, v in skip_counts.items()
                        if k != "data/skipped"))
    with Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep) as ckpt, \
            PreemptionGuard() as guard:
        meta = {}
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            log(f"rl: resumed at step {int(state.step)}")
        data = pipeline.iterator(meta.get("data"))
        nonfinite_run = int(meta.get("nonfinite_run", 0))
        start = int(state.step)
        progress = Progress(cfg.steps, "rl", first_step=start)

        def run_eval(step):
            if evaluate is None:
                return
            metrics, images, captions = evaluate(policy_params(state, cfg.update), step)
            writer.scalars(step, metrics, prefix="eval/")
            writer.images(step, "eval_samples", images, captions)
            summary.update({f"eval/{k}": v for k, v in metrics.items()})
            log(f"rl eval at step {step}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.endswith("overall")))

        def save(step):
            ckpt.save(step, state, {"data": data.state(), "nonfinite_run": nonfinite_run})

        if start == 0:
            run_eval(0)
        for step in range(start, cfg.steps):
            batch = next(data)
            state, metrics, pixels, gen_r = loop.step(state, batch, jax.random.fold_in(base_key,
                                                                                       step))
            done = step + 1
            metrics.update(skip_counts)
            skipped = metrics.get("skipped", 0.0) > 0
            nonfinite_run = nonfinite_run + 1 if skipped else 0
            if nonfinite_run >= cfg.max_nonfinite:
                raise NonFiniteUpdates(
                    f"{nonfinite_run} non-finite updates in a row at step {done}; the last good "
                    f"checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is intact")
            if done % cfg.log_every == 0 or done == cfg.steps:
                writer.scalars(done, metrics, prefix="train/")
                progress.report(done, {k: metrics[k] for k in
                                       ("und/reward_mean", "gen/reward_mean") if k in metrics})
                summary.update({f"train/{k}": v for k, v in metrics.items()
                                if math.isfinite(v)})
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                run_eval(done)
            if cfg.eval_every and done % cfg.eval_every == 0 and pixels is not None:
                n = min(16, pixels.shape[0] * pixels.shape[1])
                caps = [f"{r:.2f}" for r in gen_r.reshape(-1)[:n]]
                writer.images(done, "rollout_samples", pixels.reshape(-1, *pixels.shape[2:])[:n],
                              caps)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save(done)
            if guard.requested:
                save(done)
                ckpt.wait()
                log(f"rl: SIGTERM: saved step {done}, stopping")
                raise Preempted(f"stopped by SIGTERM after step {done}")
        if start < cfg.steps or not summary:
            run_eval(cfg.steps)
    writer.close()
    return policy_params(state, cfg.update), summary
