"""The jitted Pair-GRPO update step on Janus-Pro: (state, rollout batch) -> (state, metrics).

Rollout batch layout: every leaf is row-aligned [B, ...] with B = P * G (P pairs, G rollouts per
item; row p * G + g of a task is rollout g of pair p), so any batch shards over the data axes.
  und: prompt_ids [B, Tp] (left-padded chat prompt with the image placeholders),
       prompt_mask [B, Tp], image_mask [B, Tp] (placeholder positions), pixels [B, S, S, 3],
       response_ids [B, Ta] (sampled answer, right-padded), response_mask [B, Ta]
  gen: prompt_ids [B, Tq] (left-padded, ends with <begin_of_image>), prompt_mask [B, Tq],
       response_ids [B, N] (sampled image codes), response_mask [B, N]
  both: rewards [B], similarity [B] and aligned [B] (bool) of the row's pair
  A batch may hold one task only (an understanding-only or generation-only run): the absent
  objective has loss 0, no gradient and no weight in the combiner, and no metrics.
  optional per task: old_logp [B, T*] (teacher-forced before the first update of this rollout
       batch; absent = on-policy, the ratio is 1 and the current log-probs stand in, which saves a
       forward pass when mu = 1), ref_logp [B, T*] (beta > 0; with LoRA it defaults to the frozen
       base weights' log-probs, computed in the step).
Log-probs are scored for the response tokens only: logits are computed at the response positions,
never over the whole prompt (a [B, T, 102400] fp32 tensor would dominate memory). Image tokens are
scored under gen_head on the conditional prompt by default, as the open Janus-Pro GRPO trainer
does; UpdateConfig.image_cfg_scale = w scores the guided distribution they were sampled from
instead (batch['gen'] then also carries uncond_prompt_ids / uncond_prompt_mask).

Trainable parameters: LoRA adapters over frozen base weights (the base also serves as the KL
reference), or a full fine-tuning partition (vision encoder and VQ frozen by default). Objectives
are L_und and L_gen, combined by pareto.combine ('sum' or 'pareto'); gradient clipping and the
optimizer (optax) come after the combination.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from pairuni_jax.models import janus
from pairuni_jax.models import lora as lora_lib
from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.rl import grpo, pareto

TASKS = ("gen", "und")  # objective order in the combiner: index 0 = gen, 1 = und


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """Everything the update step needs besides the model config and the optimizer."""

    grpo: grpo.GRPOConfig = grpo.GRPOConfig()
    combiner: pareto.CombinerConfig = pareto.CombinerConfig()
    group_size: int = 8  # G: rollouts per item (8 for 1B, 4 for 7B in the paper)
    num_micro_batches: int = 1
    lora: lora_lib.LoraConfig | None = None  # None = full fine-tuning of `trainable` leaves
    image_cfg_scale: float | None = None  # None: score image tokens on the conditional prompt
    # Per-objective gradients task by task (each over its own rows); False: pareto.objective_grads
    # over the joint loss with combiner.grad_method ('vjp': one shared forward, vmapped vjp).
    per_task_grads: bool = True
    # Rows p * G .. p * G + G - 1 of a task hold one prompt (rl.rollout_batch's layout): each
    # prompt then runs through the decoder once and its keys/values serve the G responses, instead
    # of G copies of it (an understanding prompt with an image is ~600 tokens, its answer a few).
    # False: every row is scored on its own (any batch layout).
    shared_prompts: bool = True

    @property
    def rows_per_prompt(self) -> int:
        """Consecutive rows of one micro-batch that share a prompt (1: each row has its own).

        Micro-batch j holds rows j, j + M, ... (grpo.split_micro_batches): when M divides G, a
        group's rows in it are G / M consecutive rows; otherwise every row is scored on its own.
        """
        g, m = self.group_size, self.num_micro_batches
        return g // m if self.shared_prompts and g % m == 0 else 1


@flax.struct.dataclass
class TrainState:
    """step; trainable leaves (LoRA adapters or the trainable partition); frozen leaves (base
    weights with LoRA, else the frozen partition); optimizer state over `trainable` only."""

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any


def make_optimizer(
    learning_rate: float | optax.Schedule = 1e-6,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    b2: float = 0.999,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping of the (already combined) gradient."""
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(learning_rate, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


def init_state(
    params: Any,
    tx: optax.GradientTransformation,
    *,
    lora: lora_lib.LoraConfig | None = None,
    rng: jax.Array | None = None,
    trainable_mask: Any = None,
) -> TrainState:
    """A fresh state: LoRA adapters over `params` (lora given), or a trainable/frozen partition
    (trainable_mask, default lora.trainable_mask(params): vision encoder and VQ frozen)."""
    if lora is not None:
        adapters = lora_lib.init(params, lora, jax.random.key(0) if rng is None else rng)
        trainable, frozen = adapters, params
    else:
        mask = lora_lib.trainable_mask(params) if trainable_mask is None else trainable_mask
        trainable, frozen = lora_lib.partition(params, mask)
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))


# ---------------------------------------------------------------- teacher-forced log-probs


def _apply(params: Any, config: JanusConfig, method: Callable, *args: Any) -> Any:
    # A direct Module.apply (not janus.py's jitted wrappers) so a LoRA interceptor sees every Dense.
    return janus.Janus(config).apply({"params": params}, *args, method=method)


def _response_logits(params, config, prompt_embeds, prompt_mask, response_embeds, batch, head,
                     rows_per_prompt=1):
    """Logits at the positions that predict the response tokens: [B, Tr, V] fp32.

    prompt_embeds [B / s, Tp, D] and prompt_mask [B / s, Tp] hold one prompt per run of
    s = rows_per_prompt consecutive rows. s = 1: one forward over each row's whole sequence.
    s > 1: the prompts run through the decoder once, into a KV cache whose rows are repeated s
    times, and the responses [B, Tr] run on top of it, as the rollout's decode does: the same
    logits for about 1 / s of the prompts' cost; autodiff sums the s responses' gradients
    through the repeated cache.
    """
    tp, tr = prompt_embeds.shape[1], response_embeds.shape[1]
    response_embeds = response_embeds.astype(prompt_embeds.dtype)
    response_mask = batch["response_mask"].astype(bool)
    prompt_mask = prompt_mask.astype(bool)
    forward = janus.Janus.forward
    if rows_per_prompt == 1:
        embeds = jnp.concatenate([prompt_embeds, response_embeds], axis=1)
        mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
        hidden, _ = _apply(params, config, forward, embeds, mask, None)  # [B, Tp+Tr, D]
        hidden = hidden[:, tp - 1 : tp - 1 + tr]  # the positions that predict response tokens
    else:
        cache = janus.init_cache(config, prompt_embeds.shape[0], tp + tr)
        prompt_hidden, cache = _apply(params, config, forward, prompt_embeds, prompt_mask, cache)
        cache = cache.repeat_rows(rows_per_prompt)  # [B, Tp+Tr, kvH, Dh] per layer
        hidden, _ = _apply(params, config, forward, response_embeds, response_mask, cache)
        last = jnp.repeat(prompt_hidden[:, -1:], rows_per_prompt, axis=0)  # predicts token 0
        hidden = jnp.concatenate([last, hidden[:, :-1]], axis=1)  # [B, Tr, D]
    return _apply(params, config, head, hidden)


def _response_log_probs(params, config, prompt_embeds, prompt_mask, response_embeds, batch, head,
                        rows_per_prompt=1):
    """Log-probs of the response tokens given the prompt: [B, Tr] fp32."""
    logits = _response_logits(
        params, config, prompt_embeds, prompt_mask, response_embeds, batch, head, rows_per_prompt
    )
    return grpo.token_log_probs(logits, batch["response_ids"])


def _prompts(x: jax.Array, rows_per_prompt: int) -> jax.Array:
    """[B, ...] -> [B / s, ...]: the first row of each run of s rows that share a prompt."""
    return x if rows_per_prompt == 1 else x[::rows_per_prompt]


def und_log_probs(
    params: Any, config: JanusConfig, und: dict[str, jax.Array], rows_per_prompt: int = 1
) -> jax.Array:
    """Answer-token log-probs [B, Ta] under lm_head; image features replace the placeholders.
    rows_per_prompt s: runs of s consecutive rows share their prompt and image (encoded once)."""
    s = rows_per_prompt
    feats = _apply(params, config, janus.Janus.image_features, _prompts(und["pixels"], s))
    ids = _prompts(und["prompt_ids"], s)
    text = _apply(params, config, janus.Janus.embed_tokens, ids)  # [B / s, Tp, D]
    prompt = janus.place_image_features(text, feats, _prompts(und["image_mask"], s))
    answer = _apply(params, config, janus.Janus.embed_tokens, und["response_ids"])
    return _response_log_probs(
        params, config, prompt, _prompts(und["prompt_mask"], s), answer, und,
        janus.Janus.text_logits, s,
    )


def gen_log_probs(
    params: Any,
    config: JanusConfig,
    gen: dict[str, jax.Array],
    cfg_scale: float | None = None,
    rows_per_prompt: int = 1,
) -> jax.Array:
    """Image-token log-probs [B, N] under gen_head.

    cfg_scale None (default): the conditional prompt's distribution. A number w: the guided
    distribution softmax(u + w (c - u)) the tokens were sampled from, which needs the
    unconditional prompts (gen['uncond_prompt_ids'] / ['uncond_prompt_mask'], [B, Tq]) and costs
    a second forward pass. rows_per_prompt: as for `und_log_probs`.
    """
    s = rows_per_prompt
    codes = _apply(params, config, janus.Janus.image_token_embeds, gen["response_ids"])

    def logits(ids, mask):
        prompt = _apply(params, config, janus.Janus.embed_tokens, _prompts(ids, s))
        return _response_logits(params, config, prompt, _prompts(mask, s), codes, gen,
                                janus.Janus.image_logits, s)

    cond = logits(gen["prompt_ids"], gen["prompt_mask"])  # [B, N, K]
    if cfg_scale is None:
        return grpo.token_log_probs(cond, gen["response_ids"])
    if "uncond_prompt_ids" not in gen:
        raise ValueError(
            "guided image log-probs need gen['uncond_prompt_ids'] and ['uncond_prompt_mask']"
        )
    uncond = logits(gen["uncond_prompt_ids"], gen["uncond_prompt_mask"])
    return grpo.token_log_probs(grpo.guided_logits(cond, uncond, cfg_scale), gen["response_ids"])


def log_probs(
    params: Any,
    config: JanusConfig,
    batch: dict[str, Any],
    cfg_scale: float | None = None,
    rows_per_prompt: int = 1,
) -> dict[str, jax.Array]:
    """The response log-probs of every task in `batch` ('und' and/or 'gen'): use it for old_logp
    before the first update, or ref_logp. cfg_scale: see `gen_log_probs`; rows_per_prompt: runs
    of that many consecutive rows share their prompt (G for rl.rollout_batch's layout)."""
    out = {}
    if "und" in batch:
        out["und"] = und_log_probs(params, config, batch["und"], rows_per_prompt)
    if "gen" in batch:
        out["gen"] = gen_log_probs(params, config, batch["gen"], cfg_scale, rows_per_prompt)
    return out


# ---------------------------------------------------------------- the step


def _model_params(state_trainable, frozen, cfg: UpdateConfig):
    if cfg.lora is not None:
        return frozen
    return lora_lib.combine(state_trainable, frozen)


def task_log_probs(
    params: Any, config: JanusConfig, task: str, rows: dict[str, jax.Array], cfg: UpdateConfig
) -> jax.Array:
    """One task's response log-probs ('und' or 'gen'); runs only that task's forward pass."""
    if task == "und":
        return und_log_probs(params, config, rows, cfg.rows_per_prompt)
    return gen_log_probs(params, config, rows, cfg.image_cfg_scale, cfg.rows_per_prompt)


def policy_log_probs(trainable, frozen, config, cfg, task, rows):
    """One task's response log-probs under the policy (trainable + frozen, or LoRA on the base)."""
    params = _model_params(trainable, frozen, cfg)
    if cfg.lora is None:
        return task_log_probs(params, config, task, rows, cfg)
    # One task's forward may not touch every adapter (e.g. one on gen_head), so no usage check.
    with lora_lib.intercept(trainable, cfg.lora, require_all=False):
        return task_log_probs(params, config, task, rows, cfg)


def _stats(x: jax.Array) -> dict[str, jax.Array]:
    return {"mean": jnp.mean(x), "std": jnp.std(x), "min": jnp.min(x), "max": jnp.max(x)}


def update_step(
    state: TrainState,
    batch: dict[str, Any],
    *,
    config: JanusConfig,
    cfg: UpdateConfig,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Pair-GRPO update (jit it with `make_update_fn`)."""
    g = cfg.grpo
    present_tasks = tuple(t for t in TASKS if t in batch)  # a run may train one task only
    if not present_tasks:
        raise ValueError(f"the update batch has none of the tasks {TASKS}: keys {sorted(batch)}")
    per_row = ("rewards", "similarity", "aligned")
    rows, adv, pair_w = {}, {}, {}
    for t in present_tasks:
        r = batch[t]["rewards"]
        if r.shape[0] % cfg.group_size:
            raise ValueError(
                f"batch[{t!r}]['rewards'] has {r.shape[0]} rows, not a multiple of "
                f"UpdateConfig.group_size={cfg.group_size}"
            )
        a = grpo.group_advantages(r.reshape(-1, cfg.group_size), eps=g.adv_eps, ddof=g.std_ddof)
        pair_w[t] = grpo.pair_weights(
            batch[t]["similarity"], batch[t]["aligned"], g.pair_weighting
        )  # [B]
        adv[t] = a.reshape(-1) * pair_w[t]  # weighted after normalisation
        rows[t] = {k: v for k, v in batch[t].items() if k not in per_row}
        rows[t]["advantages"] = adv[t]
    weights = grpo.loss_weights(
        {t: batch[t]["response_mask"] for t in present_tasks}, g.aggregation
    )
    for t in present_tasks:
        rows[t]["loss_weights"] = weights[t]

    def task_loss_fn(trainable, rows_t, t):
        lp = policy_log_probs(trainable, state.frozen, config, cfg, t, rows_t)
        ref = rows_t.get("ref_logp")
        if g.beta > 0 and cfg.lora is not None and ref is None:
            # LoRA: the reference policy is the frozen base, no second copy of the weights.
            ref = jax.lax.stop_gradient(task_log_probs(state.frozen, config, t, rows_t, cfg))
        tb = grpo.TaskBatch(
            old_logp=rows_t.get("old_logp", jax.lax.stop_gradient(lp)),
            advantages=rows_t["advantages"],
            weights=rows_t["loss_weights"],
            mask=rows_t["response_mask"],
            ref_logp=ref,
        )
        return grpo.task_loss(lp, tb, g)  # (L_t, metric sums)

    # The combiner always sees both objectives (index 0 gen, 1 und); an absent task has loss 0,
    # a zero gradient and present = False, so it gets no weight.
    def losses_fn(trainable, mb):
        out = {t: task_loss_fn(trainable, mb[t], t) for t in present_tasks}
        losses = [out[t][0] if t in out else jnp.zeros((), jnp.float32) for t in TASKS]
        return jnp.stack(losses), {t: out[t][1] for t in present_tasks}

    comb = cfg.combiner
    direct_sum = comb.mode == "sum" and not comb.objective_stats

    def micro(mb):
        if direct_sum:

            def total(p):
                losses, metrics = losses_fn(p, mb)
                return jnp.sum(losses), (losses, metrics)

            (_, (losses, metrics)), grads = jax.value_and_grad(total, has_aux=True)(state.trainable)
            return losses, grads, metrics
        if cfg.per_task_grads:
            # The tasks' rows are disjoint: each gradient needs only its own task's forward and
            # backward, so per-objective gradients cost what the summed gradient costs.
            vg = jax.value_and_grad(task_loss_fn, has_aux=True)
            out = {t: vg(state.trainable, mb[t], t) for t in present_tasks}
            zero_grads = jax.tree.map(jnp.zeros_like, state.trainable)
            losses = jnp.stack(
                [out[t][0][0] if t in out else jnp.zeros((), jnp.float32) for t in TASKS]
            )
            grads = [out[t][1] if t in out else zero_grads for t in TASKS]
            grads_k = jax.tree.map(lambda *x: jnp.stack(x), *grads)
            return losses, grads_k, {t: out[t][0][1] for t in present_tasks}
        return pareto.objective_grads(
            losses_fn, state.trainable, mb, method=comb.grad_method, has_aux=True
        )

    losses, grads, sums = grpo.accumulate(micro, rows, cfg.num_micro_batches)
    present = jnp.stack([sums[t]["tokens"] > 0 if t in sums else jnp.array(False) for t in TASKS])
    if direct_sum:
        info = {"losses": losses, "weights": present.astype(jnp.float32)[None]}
    else:
        grads, info = pareto.combine(grads, losses, comb, present)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    # A non-finite loss or gradient skips the update (params and optimizer state stay as they
    # were); the loop counts skips and stops after too many in a row.
    finite = jnp.isfinite(jnp.sum(losses)) & jnp.isfinite(optax.global_norm(grads))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    trainable, opt_state = keep(trainable, state.trainable), keep(opt_state, state.opt_state)

    metrics = {
        "skipped": 1.0 - finite.astype(jnp.float32),
        "loss": jnp.sum(losses),
        "update_norm": optax.global_norm(updates),
        "grad_norm": optax.global_norm(grads),
    }
    metrics.update(grpo.finalize_metrics(sums))
    for i, t in enumerate(TASKS):
        if t not in present_tasks:
            continue
        metrics[f"{t}/loss"] = losses[i]
        metrics[f"{t}/weight"] = jnp.mean(info["weights"][:, i])
        for name, value in _stats(batch[t]["rewards"]).items():
            metrics[f"{t}/reward_{name}"] = value
        metrics[f"{t}/adv_abs_mean"] = jnp.mean(jnp.abs(adv[t]))
        if "grad_norms" in info:
            metrics[f"{t}/grad_norm"] = info["grad_norms"][i]
    if "cosine" in info:
        metrics["grad_cosine"] = info["cosine"]
    metrics["pair_weight_mean"] = jnp.mean(pair_w[present_tasks[-1]])  # und when present
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics


def make_update_fn(
    config: JanusConfig,
    cfg: UpdateConfig,
    tx: optax.GradientTransformation,
    state_shardings: Any = None,
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """jit(update_step) with the state donated; out state keeps `state_shardings` (e.g. FSDP from
    sharding.param_shardings(state, rules, mesh)); the batch arrives sharded over the data axes."""
    step = lambda state, batch: update_step(state, batch, config=config, cfg=cfg, tx=tx)  # noqa: E731
    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None))
