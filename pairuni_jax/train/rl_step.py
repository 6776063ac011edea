"""The jitted Pair-GRPO update step on Janus-Pro: (state, rollout batch) -> (state, metrics).

Rollout batch layout: every leaf is row-aligned [B, ...] with B = P * G (P pairs, G rollouts per
item; row p * G + g of a task is rollout g of pair p), so any batch shards over the data axes.
  und: prompt_ids [B, Tp] (left-padded chat prompt with the image placeholders),
       prompt_mask [B, Tp], image_mask [B, Tp] (placeholder positions), pixels [B, S, S, 3],
       response_ids [B, Ta] (sampled answer, right-padded), response_mask [B, Ta]
  gen: prompt_ids [B, Tq] (left-padded, ends with <begin_of_image>), prompt_mask [B, Tq],
       response_ids [B, N] (sampled image codes), response_mask [B, N]
  both: rewards [B], similarity [B] and aligned [B] (bool) of the row's pair
  optional per task: old_logp [B, T*] (teacher-forced before the first update of this rollout
       batch; absent = on-policy, the ratio is 1 and the current log-probs stand in, which saves a
       forward pass when mu = 1), ref_logp [B, T*] (beta > 0; with LoRA it defaults to the frozen
       base weights' log-probs, computed in the step).
Log-probs are scored for the response tokens only: logits are computed at the response positions,
never over the whole prompt (a [B, T, 102400] fp32 tensor would dominate memory). Image tokens are
scored under gen_head on the conditional prompt (see grpo.guided_logits for the alternative).

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


def _response_log_probs(params, config, prompt_embeds, prompt_mask, response_embeds, batch, head):
    """Log-probs of the response tokens given the prompt: [B, Tr] fp32."""
    tp, tr = prompt_embeds.shape[1], response_embeds.shape[1]
    embeds = jnp.concatenate([prompt_embeds, response_embeds.astype(prompt_embeds.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask, batch["response_mask"]], axis=1).astype(bool)
    hidden, _ = _apply(params, config, janus.Janus.forward, embeds, mask, None)  # [B, Tp+Tr, D]
    hidden = hidden[:, tp - 1 : tp - 1 + tr]  # the positions that predict response tokens
    logits = _apply(params, config, head, hidden)  # [B, Tr, V] fp32
    return grpo.token_log_probs(logits, batch["response_ids"])


def und_log_probs(params: Any, config: JanusConfig, und: dict[str, jax.Array]) -> jax.Array:
    """Answer-token log-probs [B, Ta] under lm_head; image features replace the placeholders."""
    feats = _apply(params, config, janus.Janus.image_features, und["pixels"])  # [B, M, D]
    ids = und["prompt_ids"]
    text = _apply(params, config, janus.Janus.embed_tokens, ids)  # [B, Tp, D]
    slot = jnp.clip(jnp.cumsum(und["image_mask"], axis=1) - 1, 0, feats.shape[1] - 1)  # [B, Tp]
    placed = jnp.take_along_axis(feats.astype(text.dtype), slot[..., None], axis=1)
    prompt = jnp.where(und["image_mask"][..., None], placed, text)
    answer = _apply(params, config, janus.Janus.embed_tokens, und["response_ids"])
    return _response_log_probs(
        params, config, prompt, und["prompt_mask"], answer, und, janus.Janus.text_logits
    )


def gen_log_probs(params: Any, config: JanusConfig, gen: dict[str, jax.Array]) -> jax.Array:
    """Image-token log-probs [B, N] under gen_head on the conditional prompt."""
    prompt = _apply(params, config, janus.Janus.embed_tokens, gen["prompt_ids"])
    codes = _apply(params, config, janus.Janus.image_token_embeds, gen["response_ids"])
    return _response_log_probs(
        params, config, prompt, gen["prompt_mask"], codes, gen, janus.Janus.image_logits
    )


def log_probs(params: Any, config: JanusConfig, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Both tasks' response log-probs (use it for old_logp before the first update, or ref_logp)."""
    return {
        "und": und_log_probs(params, config, batch["und"]),
        "gen": gen_log_probs(params, config, batch["gen"]),
    }


# ---------------------------------------------------------------- the step


def _model_params(state_trainable, frozen, cfg: UpdateConfig):
    if cfg.lora is not None:
        return frozen
    return lora_lib.combine(state_trainable, frozen)


def _policy_log_probs(trainable, frozen, config, cfg, batch):
    params = _model_params(trainable, frozen, cfg)
    if cfg.lora is None:
        return log_probs(params, config, batch)
    with lora_lib.intercept(trainable, cfg.lora):
        return log_probs(params, config, batch)


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
    per_row = ("rewards", "similarity", "aligned")
    rows, adv, pair_w = {}, {}, {}
    for t in TASKS:
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
    weights = grpo.loss_weights({t: batch[t]["response_mask"] for t in TASKS}, g.aggregation)
    for t in TASKS:
        rows[t]["loss_weights"] = weights[t]

    def losses_fn(trainable, mb):
        lp = _policy_log_probs(trainable, state.frozen, config, cfg, mb)
        if g.beta > 0 and cfg.lora is not None and "ref_logp" not in mb["und"]:
            # LoRA: the reference policy is the frozen base, no second copy of the weights.
            ref = jax.lax.stop_gradient(log_probs(state.frozen, config, mb))
            mb = {**mb, **{t: {**mb[t], "ref_logp": ref[t]} for t in TASKS}}
        tbs = {
            t: grpo.TaskBatch(
                old_logp=mb[t].get("old_logp", jax.lax.stop_gradient(lp[t])),
                advantages=mb[t]["advantages"],
                weights=mb[t]["loss_weights"],
                mask=mb[t]["response_mask"],
                ref_logp=mb[t].get("ref_logp"),
            )
            for t in TASKS
        }
        losses, metrics = grpo.pair_grpo_loss(lp, tbs, g)
        return jnp.stack([losses[t] for t in TASKS]), metrics

    comb = cfg.combiner
    direct_sum = comb.mode == "sum" and not comb.objective_stats

    def micro(mb):
        if direct_sum:

            def total(p):
                losses, metrics = losses_fn(p, mb)
                return jnp.sum(losses), (losses, metrics)

            (_, (losses, metrics)), grads = jax.value_and_grad(total, has_aux=True)(state.trainable)
            return losses, grads, metrics
        losses, grads_k, metrics = pareto.objective_grads(
            losses_fn, state.trainable, mb, method=comb.grad_method, has_aux=True
        )
        return losses, grads_k, metrics

    losses, grads, sums = grpo.accumulate(micro, rows, cfg.num_micro_batches)
    present = jnp.stack([sums[t]["tokens"] > 0 for t in TASKS])
    if direct_sum:
        info = {"losses": losses, "weights": present.astype(jnp.float32)[None]}
    else:
        grads, info = pareto.combine(grads, losses, comb, present)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)

    metrics = {
        "loss": jnp.sum(losses),
        "update_norm": optax.global_norm(updates),
        "grad_norm": optax.global_norm(grads),
    }
    metrics.update(grpo.finalize_metrics(sums))
    for i, t in enumerate(TASKS):
        metrics[f"{t}/loss"] = losses[i]
        metrics[f"{t}/weight"] = jnp.mean(info["weights"][:, i])
        for name, value in _stats(batch[t]["rewards"]).items():
            metrics[f"{t}/reward_{name}"] = value
        metrics[f"{t}/adv_abs_mean"] = jnp.mean(jnp.abs(adv[t]))
        if "grad_norms" in info:
            metrics[f"{t}/grad_norm"] = info["grad_norms"][i]
    if "cosine" in info:
        metrics["grad_cosine"] = info["cosine"]
    metrics["pair_weight_mean"] = jnp.mean(pair_w["und"])
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
