"""The Pair-GRPO loop: batches of pairs -> rollouts -> rewards -> `mu` jitted updates.

One step, for a batch of P pairs (REFERENCE.md §2):
  1. rollout: G_u answers per question (lm_head) and G_g CFG images per prompt (gen_head), with
     the current policy; images decoded by the VQ;
  2. rewards: multiple-choice accuracy (+ optional format) and the generation reward registry;
  3. advantages per task and prompt, times the pair weight (inside the update step);
  4. `mu` updates on the clipped objective, both tasks' gradients combined by sum or min-norm.
`RLConfig.tasks` trains one task only (the ablations): the other task's rollout and reward are
skipped and the update sees a one-task batch.

The state (trainable params, optimizer, step), the rng and the data position are checkpointed, so a
resumed run repeats exactly the steps an uninterrupted one would have taken (the step's rng is
fold_in(seed key, step); the pipeline's position is part of the checkpoint). A non-finite update is
skipped inside the jitted step and counted; `max_nonfinite` in a row stop the run with its last
good checkpoint intact. SIGTERM saves a checkpoint at the next step boundary and stops.

Devices: with a mesh (argument, or `RLConfig.mesh_shape`), the state is placed by sharding.py's
regex rules (FSDP, optional tensor parallelism) and every batch is split over ('data', 'fsdp').
Multi-host: each process feeds its own data shard (the pipeline's process_index/count), the global
arrays are built from the processes' local rows, each process scores its own rows' rollouts on its
host, and only scalars cross hosts; checkpoints are written collectively, metrics by process 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pairuni_jax import rollout
from pairuni_jax.models import lora as lora_lib
from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.processing import JanusProcessor
from pairuni_jax.rl import pareto
from pairuni_jax.rl.grpo import GRPOConfig
from pairuni_jax.rl.rewards import understanding_rewards
from pairuni_jax.train import rl_step, sharding
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
    # (data, fsdp, tensor) sizes of the device mesh (one may be -1: the rest of the devices);
    # None: no mesh (one device), unless train_rl is given one.
    mesh_shape: tuple[int, int, int] | None = None

    def __post_init__(self):
        if not self.tasks or len(set(self.tasks)) != len(self.tasks) or not set(self.tasks) <= {
            "und", "gen"}:
            raise ValueError(f"RLConfig.tasks={self.tasks!r}: a non-empty subset of ('und', 'gen')")


def combiner_from(c) -> pareto.CombinerConfig:
    """CombinerConfig from a config's `combiner` section (mode, normalization, groups)."""
    return pareto.CombinerConfig(mode=c.mode, normalization=c.normalization,
                                 groups=tuple(c.groups))


def rl_config_from(r, seed: int, *, frozen: tuple[str, ...] = lora_lib.JANUS_FROZEN,
                   lora: lora_lib.LoraConfig | None = None) -> RLConfig:
    """RLConfig from a config's `rl` section (configs/shapes.py and configs/pairug.py).

    Fields a section leaves out (weight_decay, format_weight, keep, adv_eps, std_ddof) take
    RLConfig's and GRPOConfig's defaults.
    """
    advantages = {k: r[k] for k in ("adv_eps", "std_ddof") if k in r}
    grpo_cfg = GRPOConfig(eps_low=r.eps_low, eps_high=r.eps_high, beta=r.beta,
                          pair_weighting=r.pair_weighting, aggregation=r.aggregation,
                          **advantages)
    update = rl_step.UpdateConfig(grpo=grpo_cfg, combiner=combiner_from(r.combiner),
                                  group_size=r.group_size, num_micro_batches=r.num_micro_batches,
                                  lora=lora)
    optional = {k: r[k] for k in ("weight_decay", "format_weight", "keep") if k in r}
    return RLConfig(
        steps=r.steps, temperature=r.temperature, guidance=r.guidance,
        max_new_tokens=r.max_new_tokens, mu=r.mu, learning_rate=r.learning_rate,
        warmup_steps=r.warmup_steps, max_grad_norm=r.max_grad_norm, update=update,
        trainable=(r".*",), frozen=frozen, seed=seed, log_every=r.log_every,
        checkpoint_every=r.checkpoint_every, eval_every=r.eval_every, **optional)


@functools.lru_cache(maxsize=8)
def _optimizer(learning_rate: float, warmup_steps: int, weight_decay: float,
               max_grad_norm: float) -> optax.GradientTransformation:
    lr = learning_rate
    if warmup_steps:
        lr = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return rl_step.make_optimizer(lr, weight_decay, max_grad_norm)


def make_optimizer(cfg: RLConfig) -> optax.GradientTransformation:
    """AdamW (+ warmup, clipping) from the config; equal settings give the same object, so the
    jitted update below is compiled once per process for runs that share them (ablations)."""
    return _optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.weight_decay, cfg.max_grad_norm)


@functools.lru_cache(maxsize=8)
def _update_fn(model_config: JanusConfig, update: rl_step.UpdateConfig,
               tx: optax.GradientTransformation, shardings: tuple | None):
    """The jitted update, shared by every loop with the same settings and state shardings
    (`shardings`: (treedef, leaves) of the state's NamedShardings, hashable; None: unsharded)."""
    tree = None if shardings is None else jax.tree.unflatten(*shardings)
    return rl_step.make_update_fn(model_config, update, tx, tree)


@functools.lru_cache(maxsize=8)
def _log_probs_fn(model_config: JanusConfig, update: rl_step.UpdateConfig):
    """The jitted teacher-forced pass for old log-probs, over the whole rollout batch."""
    whole = dataclasses.replace(update, num_micro_batches=1)
    return jax.jit(functools.partial(rl_step.log_probs, config=model_config,
                                     cfg_scale=update.image_cfg_scale,
                                     rows_per_prompt=whole.rows_per_prompt))


def policy_params(state: rl_step.TrainState, update: rl_step.UpdateConfig):
    """The full params the policy samples with (LoRA merged, or the partitions joined)."""
    if update.lora is not None:
        return lora_lib.merge(state.frozen, state.trainable, update.lora)
    return lora_lib.combine(state.trainable, state.frozen)


def rollout_batch(batch: dict, text: rollout.TextRollout | None,
                  images: rollout.ImageRollout | None, und_rewards: np.ndarray | None,
                  gen_rewards: np.ndarray | None, placeholder_id: int) -> dict:
    """The update step's layout (rl_step): every leaf [P * G, ...], row p * G + g of a task is
    rollout g of pair p. Rewards [P, G]. A task whose rollout is None is left out (one-task runs).
    """
    out = {}
    p, g = (text if text is not None else images).tokens.shape[:2]
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
    return out


def global_mean(local: np.ndarray) -> float:
    """The mean over every process's rows of a host-side array (one small all-gather when there
    are several processes)."""
    total = np.array([np.sum(local, dtype=np.float64), np.size(local)], np.float64)
    if jax.process_count() > 1:
        total = np.asarray(multihost_utils.process_allgather(total)).sum(0)
    return float(total[0] / max(total[1], 1.0))


def any_process(flag: bool) -> bool:
    """True when `flag` is set on any process (every process gets the same answer)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.array(flag))).any())


ROLLOUT_KEYS = ("und_ids", "und_mask", "pixel_values", "gen_ids", "gen_mask")
# The pipeline's left-padded [P, L] arrays, by prompt kind, with their fill (None: the pad id).
LEFT_PADDED = {
    "und": (("und_ids", None), ("und_mask", False), ("und_image_mask", False)),
    "gen": (("gen_ids", None), ("gen_mask", False), ("gen_uncond_ids", None)),
}


def left_pad(batch: dict, lengths: dict[str, int], pad_id: int) -> dict:
    """`batch` with its prompts left-padded to `lengths` ({'und': Lu, 'gen': Lg}); extra
    positions are masked, so the model's outputs do not change."""
    out = dict(batch)
    for kind, keys in LEFT_PADDED.items():
        for key, fill in keys:
            if key not in batch:
                continue
            x = np.asarray(batch[key])  # [P, L]
            extra = lengths[kind] - x.shape[1]
            if extra < 0:
                raise ValueError(f"{key} has length {x.shape[1]} > {lengths[kind]}")
            if extra:
                pad = np.full((x.shape[0], extra), pad_id if fill is None else fill, x.dtype)
                out[key] = np.concatenate([pad, x], axis=1)
    return out


def common_lengths(batch: dict) -> dict[str, int]:
    """The prompt lengths every process's batch is padded to: hosts bucket their own batches, but
    a global array needs one shape (one small all-gather when there are several processes)."""
    local = np.array([batch["und_ids"].shape[1], batch["gen_ids"].shape[1]], np.int64)
    if jax.process_count() > 1:
        local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).max(0)
    return {"und": int(local[0]), "gen": int(local[1])}


class PairGRPO:
    """The loop's pieces: rollout, rewards, update (compiled once per process and settings)."""

    def __init__(self, model_config: JanusConfig, processor: JanusProcessor, cfg: RLConfig,
                 generation_reward: Callable[[np.ndarray, Sequence[str]], np.ndarray],
                 mesh: Mesh | None = None, rules: Sequence[sharding.Rule] = sharding.JANUS_RULES):
        self.model_config, self.processor, self.cfg = model_config, processor, cfg
        self.generation_reward = generation_reward
        self.mesh, self.rules = mesh, tuple(rules)
        self.tx = make_optimizer(cfg)
        self.update = None  # set by init_state, which knows the state's shardings
        self.ref_params = None  # the KL reference of full fine-tuning, set by init_state
        self.old_log_probs = _log_probs_fn(model_config, cfg.update)
        self.sampling = rollout.Sampling(temperature=cfg.temperature)

    def init_state(self, params) -> rl_step.TrainState:
        """A fresh state (placed on the mesh under `rules`), and the update step compiled for it.
        The state may share buffers with `params`, which the donating update then consumes.
        With a mesh, the params go straight to their shards and the optimizer state is created
        sharded, so no device ever holds a whole copy."""
        mask = lora_lib.trainable_mask(params, self.cfg.trainable, self.cfg.frozen)

        def make(p):
            return rl_step.init_state(p, self.tx, lora=self.cfg.update.lora,
                                      rng=jax.random.key(self.cfg.seed), trainable_mask=mask)

        # beta > 0 needs reference log-probs. With LoRA the frozen base is the reference; full
        # fine-tuning keeps a copy of the starting params (one more copy of the weights).
        keep_reference = self.cfg.update.grpo.beta > 0 and self.cfg.update.lora is None
        key = None
        if self.mesh is None:
            if keep_reference:
                self.ref_params = sharding.on_first_device(jax.tree.map(jnp.copy, params))
            state = sharding.on_first_device(make(params))
        else:
            params = sharding.shard_params(params, self.rules, self.mesh)
            if keep_reference:
                self.ref_params = jax.jit(
                    lambda t: jax.tree.map(jnp.copy, t),
                    out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)
            shardings = sharding.state_shardings(jax.eval_shape(make, params), self.rules,
                                                 self.mesh, roots=params.keys())
            state = jax.jit(make, out_shardings=shardings, donate_argnums=0)(params)
            leaves, treedef = jax.tree.flatten(shardings)
            key = (treedef, tuple(leaves))
        self.update = _update_fn(self.model_config, self.cfg.update, self.tx, key)
        return state

    def to_devices(self, tree):
        """This process's rows [P_local, ...] -> arrays the jitted programs take (global arrays
        sharded over the batch axes with a mesh; host arrays as they are without one)."""
        return tree if self.mesh is None else sharding.shard_batch(tree, self.mesh)

    def to_host(self, tree):
        """Device arrays with rows on the leading axis -> numpy, this process's rows only."""
        if self.mesh is None:
            return jax.device_get(tree)
        return jax.tree.map(lambda x: sharding.local_rows(x, self.mesh), tree)

    def rollouts(self, params, batch: dict, key: jax.Array):
        """(text rollouts or None, image rollouts or None) on the host, this process's rows, for
        the trained tasks."""
        c, p = self.cfg, self.processor
        k_text, k_image = jax.random.split(key)
        x = self.to_devices({k: batch[k] for k in ROLLOUT_KEYS})
        text = images = None
        with sharding.mesh_context(self.mesh):
            if "und" in c.tasks:
                text = rollout.generate_text(
                    params, self.model_config, x["und_ids"], x["und_mask"], k_text,
                    x["pixel_values"], num_samples=c.update.group_size,
                    max_new_tokens=c.max_new_tokens,
                    sampling=self.sampling, eos_id=p.eos_id, pad_id=p.pad_id,
                    image_token_id=p.image_placeholder_id)
            if "gen" in c.tasks:
                images = rollout.generate_images(
                    params, self.model_config, x["gen_ids"], x["gen_mask"], k_image,
                    c.guidance, num_samples=c.update.group_size, sampling=self.sampling,
                    bos_id=p.bos_id, boi_id=p.image_start_id, pad_id=p.pad_id)
        if text is not None:
            tokens, mask = self.to_host((text.tokens, text.mask))
            text = text.replace(tokens=tokens, mask=mask, sample_logprobs=None,
                                model_logprobs=None)
        if images is not None:
            tokens, pixels = self.to_host((images.tokens, images.pixels))
            images = images.replace(tokens=tokens, pixels=pixels, sample_logprobs=None,
                                    model_logprobs=None)
        return text, images

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
        """One Pair-GRPO step on this process's `batch` (P_local pairs) -> (state, metrics,
        this process's rollout images or None, their rewards or None)."""
        t0 = time.perf_counter()
        if jax.process_count() > 1:
            batch = left_pad(batch, common_lengths(batch), self.processor.pad_id)
        params = policy_params(state, self.cfg.update)
        text, images = self.rollouts(params, batch, key)
        t1 = time.perf_counter()
        und_r = und_acc = gen_r = None
        if text is not None:
            und_r, und_acc = self.understanding_rewards(batch, text)
        if images is not None:
            gen_r = self.image_rewards(batch, images)
        t2 = time.perf_counter()
        rb = rollout_batch(batch, text, images, und_r, gen_r, self.processor.image_placeholder_id)
        if "gen" in rb and self.cfg.update.image_cfg_scale is not None:
            p = self.processor  # guided scoring needs the prompts the rollout's CFG branch saw
            rb["gen"]["uncond_prompt_ids"] = np.asarray(rollout.unconditional_ids(
                rb["gen"]["prompt_ids"], p.bos_id, p.image_start_id, p.pad_id))
            rb["gen"]["uncond_prompt_mask"] = rb["gen"]["prompt_mask"]
        rb = self.to_devices(rb)
        with sharding.mesh_context(self.mesh):
            if self.cfg.mu > 1:
                old = self.old_log_probs(params, batch=rb)
                for task in rb:
                    rb[task]["old_logp"] = old[task]
            if self.ref_params is not None:
                ref = self.old_log_probs(self.ref_params, batch=rb)
                for task in rb:
                    rb[task]["ref_logp"] = ref[task]
            del params
            for _ in range(self.cfg.mu):
                state, metrics = self.update(state, rb)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t3 = time.perf_counter()
        tokens = 0
        if text is not None:
            tokens += int(text.mask.sum())
            metrics["und/accuracy"] = global_mean(und_acc)
            metrics["und/answer_length"] = global_mean(text.mask.sum(-1))
        if images is not None:
            tokens += int(np.prod(images.tokens.shape))
        metrics.update({
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2,
            "rollout_tokens_per_s": tokens * jax.process_count() / max(t1 - t0, 1e-9),
        })
        return state, metrics, None if images is None else images.pixels, gen_r


def data_skip_counts(pipeline) -> dict[str, float]:
    """Records the pipeline's source dropped while reading (on_error='skip'), by reason, as
    'data/skipped' (total) and 'data/skipped/<reason>'; empty when the source reports none."""
    skipped = getattr(getattr(pipeline.source, "read", None), "skipped", None)
    if skipped is None:
        return {}
    out = {"data/skipped": float(sum(skipped.values()))}
    out.update({f"data/skipped/{reason}": float(n) for reason, n in sorted(skipped.items())})
    return out


def resolve_mesh(cfg: RLConfig, mesh: Mesh | None) -> Mesh | None:
    """The mesh given, else one of `cfg.mesh_shape` over all devices, else None."""
    if mesh is not None or cfg.mesh_shape is None:
        return mesh
    return sharding.make_mesh(*cfg.mesh_shape)


def train_rl(params, model_config: JanusConfig, processor: JanusProcessor, pipeline,
             generation_reward, cfg: RLConfig, workdir: str, *,
             evaluate: Callable | None = None, log: Callable[[str], None] = print,
             mesh: Mesh | None = None,
             rules: Sequence[sharding.Rule] = sharding.JANUS_RULES):
    """Run (or resume) Pair-GRPO under `workdir`; returns (final params, summary metrics).

    `params` is consumed (the update donates its buffers). `pipeline` yields this process's
    batches (`pipeline.iterator(state)`); `generation_reward(pixels [P, G, H, W, 3] uint8,
    prompts [P]) -> ([P, G] or [P * G] rewards, info)`; `evaluate(params, step) -> (metrics,
    images, captions)`. `mesh` (or cfg.mesh_shape) shards the state by `rules` and the batches
    over ('data', 'fsdp'). Raises Preempted after a SIGTERM-triggered save, NonFiniteUpdates
    after `cfg.max_nonfinite` skipped updates in a row.
    """
    mesh = resolve_mesh(cfg, mesh)
    loop = PairGRPO(model_config, processor, cfg, generation_reward, mesh, rules)
    state = loop.init_state(params)
    del params
    main_process = jax.process_index() == 0
    writer = MetricsWriter(workdir, enabled=main_process)
    base_key = jax.random.key(cfg.seed)
    summary: dict[str, float] = {}
    skip_counts = data_skip_counts(pipeline)
    if skip_counts.get("data/skipped"):
        log(f"rl: the data source skipped {int(skip_counts['data/skipped'])} records: "
            + ", ".join(f"{k.rsplit('/', 1)[-1]}={int(v)}" for k, v in skip_counts.items()
                        if k != "data/skipped"))
    with Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep) as ckpt, \
            PreemptionGuard() as guard, writer:
        meta = {}
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            log(f"rl: resumed at step {int(state.step)}")
        data_state = meta.get("data")
        if data_state is not None:  # written by process 0; every process resumes its own shard
            data_state = dict(data_state, process_index=jax.process_index())
        data = pipeline.iterator(data_state)
        nonfinite_run = int(meta.get("nonfinite_run", 0))
        start = int(state.step)
        progress = Progress(cfg.steps, "rl", first_step=start)
        saved = ckpt.latest_step()

        def run_eval(step):
            if evaluate is None:
                return
            with sharding.mesh_context(mesh):
                metrics, images, captions = evaluate(policy_params(state, cfg.update), step)
            writer.scalars(step, metrics, prefix="eval/")
            writer.images(step, "eval_samples", images, captions)
            summary.update({f"eval/{k}": v for k, v in metrics.items()})
            log(f"rl eval at step {step}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.endswith("overall")))

        def save(step):
            nonlocal saved
            if saved != step:
                ckpt.save(step, state, {"data": data.state(), "nonfinite_run": nonfinite_run})
                saved = step

        if start == 0:
            run_eval(0)
        for step in range(start, cfg.steps):
            batch = next(data)
            state, metrics, pixels, gen_r = loop.step(state, batch,
                                                      jax.random.fold_in(base_key, step))
            done = step + 1
            metrics.update(skip_counts)
            nonfinite_run = nonfinite_run + 1 if metrics["skipped"] > 0 else 0
            if done % cfg.log_every == 0 or done == cfg.steps or nonfinite_run:
                writer.scalars(done, metrics, prefix="train/")
                if main_process:
                    progress.report(done, {k: metrics[k] for k in
                                           ("und/reward_mean", "gen/reward_mean") if k in metrics})
                summary.update({f"train/{k}": v for k, v in metrics.items()
                                if math.isfinite(v)})
            if nonfinite_run >= cfg.max_nonfinite:
                raise NonFiniteUpdates(
                    f"{nonfinite_run} non-finite updates in a row at step {done}; the last good "
                    f"checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is intact")
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                run_eval(done)
            if cfg.eval_every and done % cfg.eval_every == 0 and pixels is not None:
                n = min(16, pixels.shape[0] * pixels.shape[1])
                caps = [f"{r:.2f}" for r in gen_r.reshape(-1)[:n]]
                writer.images(done, "rollout_samples", pixels.reshape(-1, *pixels.shape[2:])[:n],
                              caps)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save(done)
            if done < cfg.steps and any_process(guard.requested):
                save(done)
                ckpt.wait()
                log(f"rl: SIGTERM: saved step {done}, stopping")
                raise Preempted(f"stopped by SIGTERM after step {done}")
        if start < cfg.steps or not summary:
            run_eval(cfg.steps)
    return policy_params(state, cfg.update), summary
