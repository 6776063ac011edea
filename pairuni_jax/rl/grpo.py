"""The Pair-GRPO objective (PairUni): advantages, pair weights, clipped surrogate, KL, aggregation.

Everything here is model-agnostic: it sees log-probs, rewards and masks, never the model. The model
glue (teacher-forced forward passes of Janus) lives in the update step.

Conventions
- Sequences of one task form a batch [N, T] with a float mask (1 = a scored token, 0 = padding or
  prompt). Advantages are per sequence [N] and broadcast over its tokens.
- The loss is a weighted SUM over tokens, with per-token weights computed ONCE from the full batch
  (`loss_weights`). A micro-batch's loss is the same weighted sum over its rows, so the sum over
  micro-batches equals the full batch's loss exactly, whatever the aggregation mode: gradient
  accumulation is normalised by global counts, never a mean of means.
- Metrics are returned as additive sums plus token counts (`finalize_metrics` divides), for the same
  reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

PAIR_WEIGHTINGS = ("sqrt", "linear", "none")
AGGREGATIONS = ("token_mean", "seq_mean", "task_sum")
STD_DDOFS = (0, 1)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of the Pair-GRPO loss.

    eps_low / eps_high: clip range of the ratio, [1 - eps_low, 1 + eps_high].
    beta: coefficient of the k3 KL to the reference policy; 0 (the paper) needs no reference.
    adv_eps: added to the group std, A = (r - mean) / (std + adv_eps) (1e-4 as in T2I-R1).
    std_ddof: 1 = unbiased std (torch's default, used by T2I-R1), 0 = population std.
    pair_weighting: weight of retrieved pairs: 'sqrt' (sqrt(s_p), the paper's default), 'linear'
      (s_p) or 'none' (1). Aligned pairs always weigh 1.
    aggregation: 'token_mean' (every scored token of both tasks weighs the same),
      'seq_mean' (mean over each sequence's tokens, then over all sequences of both tasks),
      'task_sum' (the paper: per task, sequence mean then mean over that task's sequences; the
      objective is L_und + L_gen).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    adv_eps: float = 1e-4
    std_ddof: int = 1
    pair_weighting: str = "sqrt"
    aggregation: str = "task_sum"

    def __post_init__(self):
        if self.pair_weighting not in PAIR_WEIGHTINGS:
            raise ValueError(
                f"GRPOConfig.pair_weighting={self.pair_weighting!r}: expected one of "
                f"{PAIR_WEIGHTINGS}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"GRPOConfig.aggregation={self.aggregation!r}: expected one of {AGGREGATIONS}"
            )
        if self.std_ddof not in STD_DDOFS:
            raise ValueError(f"GRPOConfig.std_ddof={self.std_ddof!r}: expected 0 or 1")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(
                f"GRPOConfig.eps_low/eps_high must be >= 0, got {self.eps_low}, {self.eps_high}"
            )
        if self.beta < 0 or self.adv_eps < 0:
            raise ValueError(f"GRPOConfig.beta={self.beta}, adv_eps={self.adv_eps}: must be >= 0")


# ---------------------------------------------------------------- advantages and pair weights


def group_advantages(rewards: Array, *, eps: float = 1e-4, ddof: int = 1) -> Array:
    """Group-normalised advantages (r - mean) / (std + eps) over the last axis.

    rewards: [..., G], one group of G rollouts of the same task and prompt per row. A group whose
    rewards are all equal (including G = 1) gets exactly zero advantage, never NaN.
    """
    r = rewards.astype(jnp.float32)  # [..., G]
    g = r.shape[-1]
    mean = jnp.mean(r, axis=-1, keepdims=True)
    centred = r - mean
    var = jnp.sum(centred**2, axis=-1, keepdims=True) / max(g - ddof, 1)
    std = jnp.sqrt(var)
    constant = jnp.all(r == r[..., :1], axis=-1, keepdims=True)
    adv = centred / (std + eps)
    return jnp.where(constant, 0.0, adv)


def pair_weights(similarity: Array, aligned: Array, mode: str = "sqrt") -> Array:
    """w_p per pair [P]: 1 for aligned pairs; sqrt(s_p), s_p or 1 for retrieved ones.

    Similarities are clipped at 0 (a cosine below zero would never pass the retrieval threshold; the
    clip only keeps sqrt finite).
    """
    if mode not in PAIR_WEIGHTINGS:
        raise ValueError(f"pair weighting {mode!r}: expected one of {PAIR_WEIGHTINGS}")
    s = jnp.clip(similarity.astype(jnp.float32), 0.0, None)  # [P]
    if mode == "sqrt":
        retrieved = jnp.sqrt(s)
    elif mode == "linear":
        retrieved = s
    else:
        retrieved = jnp.ones_like(s)
    return jnp.where(aligned, 1.0, retrieved)


def pair_advantages(
    rewards: Mapping[str, Array], weights: Array, cfg: GRPOConfig
) -> dict[str, Array]:
    """Advantages of every task's sequences, flattened to [P * G], times the pair weight.

    rewards: task name -> [P, G] (row p = the G rollouts of pair p's item of that task).
    weights: [P] pair weights, applied AFTER group normalisation to every task.
    """
    out = {}
    for task, r in rewards.items():
        if r.ndim != 2 or r.shape[0] != weights.shape[0]:
            raise ValueError(
                f"rewards[{task!r}] has shape {r.shape}; expected [P, G] with P = "
                f"{weights.shape[0]} (the number of pair weights)"
            )
        adv = group_advantages(r, eps=cfg.adv_eps, ddof=cfg.std_ddof)  # [P, G]
        out[task] = (weights[:, None] * adv).reshape(-1)  # [P * G]
    return out


# ---------------------------------------------------------------- log-probs by teacher forcing


def token_log_probs(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[target], in fp32. logits [..., V], targets [...] -> [...].

    The target logit is picked by a masked sum over the vocabulary rather than a gather: its
    gradient is then an elementwise select that fuses with the softmax's, instead of a scatter.
    """
    logits = logits.astype(jnp.float32)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    hit = vocab == targets[..., None].astype(jnp.int32)  # [..., V]
    picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return picked - jax.nn.logsumexp(logits, axis=-1)


def next_token_log_probs(logits: Array, input_ids: Array) -> Array:
    """Teacher forcing: position t's logits score token t + 1. [B, T, V], [B, T] -> [B, T - 1]."""
    return token_log_probs(logits[:, :-1], input_ids[:, 1:])


def guided_logits(cond: Array, uncond: Array, scale: float) -> Array:
    """Classifier-free guidance u + w (c - u), as in Janus image sampling.

    Image-token log-probs are by default taken from the conditional logits alone (as the open
    Janus-Pro GRPO trainer does: the sampled tokens are scored by the policy the prompt defines).
    Scoring the guided distribution instead (pass `guided_logits(c, u, w)` to `token_log_probs`)
    matches the sampling distribution exactly but costs the unconditional forward in every update.
    """
    cond = cond.astype(jnp.float32)
    uncond = uncond.astype(jnp.float32)
    return uncond + scale * (cond - uncond)


# ---------------------------------------------------------------- per-token losses


def clipped_surrogate(
    logp: Array, old_logp: Array, advantages: Array, eps_low: float, eps_high: float
) -> tuple[Array, Array, Array]:
    """PPO clipped surrogate per token, -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A).

    One formula for every sign of A, no sign-dependent branch: for A > 0 the gradient stops once
    rho > 1 + eps_high, for A < 0 once rho < 1 - eps_low; the other side is never clipped.
    logp, old_logp: [N, T]; advantages: [N] or [N, T].
    Returns (loss [N, T], is_clipped [N, T] (the clipped term is the active one), log_ratio [N, T]).
    """
    adv = advantages.astype(jnp.float32)
    if adv.ndim == logp.ndim - 1:
        adv = adv[..., None]
    log_ratio = logp.astype(jnp.float32) - jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -jnp.minimum(unclipped, clipped)
    return loss, clipped < unclipped, log_ratio


def k3_kl(logp: Array, ref_logp: Array) -> Array:
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    return jnp.exp(d) - d - 1.0


# ---------------------------------------------------------------- aggregation


def loss_weights(masks: Mapping[str, Array], mode: str) -> dict[str, Array]:
    """Per-token weights [N, T] per task whose weighted sum is the aggregated loss.

    Compute them ONCE on the full (global) batch, then split them with the batch into micro-batches.
    Sequences with no scored token take no part in any count.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation {mode!r}: expected one of {AGGREGATIONS}")
    masks = {t: m.astype(jnp.float32) for t, m in masks.items()}
    lengths = {t: jnp.sum(m, axis=-1, keepdims=True) for t, m in masks.items()}  # [N, 1]
    per_seq = {t: m / jnp.maximum(lengths[t], 1.0) for t, m in masks.items()}  # rows sum to 1
    num_seqs = {t: jnp.sum(lengths[t] > 0) for t in masks}
    if mode == "token_mean":
        total = sum(jnp.sum(m) for m in masks.values())
        return {t: m / jnp.maximum(total, 1.0) for t, m in masks.items()}
    if mode == "seq_mean":
        total = sum(num_seqs.values())
        return {t: w / jnp.maximum(total, 1) for t, w in per_seq.items()}
    return {t: w / jnp.maximum(num_seqs[t], 1) for t, w in per_seq.items()}  # task_sum


@dataclasses.dataclass(frozen=True)
class TaskBatch:
    """What the loss needs about one task's sequences, besides the current log-probs.

    old_logp: [N, T] log-probs of the sampled tokens under the policy that generated them
      (teacher-forced before the first update of the rollout batch).
    advantages: [N] pair-weighted group advantages.
    weights: [N, T] from `loss_weights` (zero where mask is zero).
    mask: [N, T] 1 on scored tokens.
    ref_logp: [N, T] reference log-probs, or None when beta = 0.
    """

    old_logp: Array
    advantages: Array
    weights: Array
    mask: Array
    ref_logp: Array | None = None


jax.tree_util.register_dataclass(
    TaskBatch,
    data_fields=["old_logp", "advantages", "weights", "mask", "ref_logp"],
    meta_fields=[],
)


def task_loss(logp: Array, batch: TaskBatch, cfg: GRPOConfig) -> tuple[Array, dict[str, Array]]:
    """One task's aggregated loss (scalar) and additive metric sums.

    Metric sums (divide by `tokens` with `finalize_metrics`): clipped (tokens where the clip is
    active), approx_kl (k3 of the new policy against the old one, Schulman's estimator),
    ref_kl (k3 against the reference, when beta > 0).
    """
    loss_tok, is_clipped, log_ratio = clipped_surrogate(
        logp, batch.old_logp, batch.advantages, cfg.eps_low, cfg.eps_high
    )  # [N, T]
    mask = batch.mask.astype(jnp.float32)
    metrics = {
        "tokens": jnp.sum(mask),
        "clipped": jnp.sum(mask * is_clipped),
        "approx_kl": jnp.sum(mask * jax.lax.stop_gradient(jnp.expm1(log_ratio) - log_ratio)),
    }
    if cfg.beta > 0:
        if batch.ref_logp is None:
            raise ValueError("GRPOConfig.beta > 0 needs TaskBatch.ref_logp (reference log-probs)")
        kl = k3_kl(logp, batch.ref_logp)
        loss_tok = loss_tok + cfg.beta * kl
        metrics["ref_kl"] = jnp.sum(mask * jax.lax.stop_gradient(kl))
    loss = jnp.sum(batch.weights.astype(jnp.float32) * loss_tok)
    return loss, metrics


def pair_grpo_loss(
    logps: Mapping[str, Array], batches: Mapping[str, TaskBatch], cfg: GRPOConfig
) -> tuple[dict[str, Array], dict[str, dict[str, Array]]]:
    """The Pair-GRPO loss of every task and their sum.

    logps / batches: task name (e.g. 'und', 'gen') -> [N, T] current log-probs / its TaskBatch.
    Returns ({task: L_task, ..., 'total': sum of tasks}, {task: additive metric sums}).
    """
    if set(logps) != set(batches):
        raise ValueError(
            f"tasks differ: log-probs for {sorted(logps)}, batches for {sorted(batches)}"
        )
    losses, metrics = {}, {}
    for task in sorted(batches):
        if logps[task].shape != batches[task].mask.shape:
            raise ValueError(
                f"task {task!r}: log-probs {logps[task].shape} vs mask {batches[task].mask.shape}"
            )
        losses[task], metrics[task] = task_loss(logps[task], batches[task], cfg)
    losses["total"] = sum(losses[t] for t in sorted(batches))
    return losses, metrics


def finalize_metrics(sums: Mapping[str, Mapping[str, Array]]) -> dict[str, Array]:
    """Turn per-task additive sums into flat means: '{task}/clip_fraction', '{task}/approx_kl'..."""
    out = {}
    for task, m in sums.items():
        n = jnp.maximum(m["tokens"], 1.0)
        out[f"{task}/tokens"] = m["tokens"]
        out[f"{task}/clip_fraction"] = m["clipped"] / n
        out[f"{task}/approx_kl"] = m["approx_kl"] / n
        if "ref_kl" in m:
            out[f"{task}/ref_kl"] = m["ref_kl"] / n
    return out


# ---------------------------------------------------------------- micro-batching


def split_micro_batches(batch: Any, num_micro_batches: int) -> Any:
    """[B, ...] leaves -> [M, B / M, ...]; micro-batch j holds rows j, j + M, j + 2M, ...

    The strided split keeps every micro-batch spread over all data shards of a sharded batch.
    """
    m = num_micro_batches

    def split(path, x):
        if x.shape[0] % m:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has leading size {x.shape[0]}, not "
                f"divisible by num_micro_batches={m}"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map_with_path(split, batch)


def accumulate(fn: Callable[[Any], Any], batch: Any, num_micro_batches: int = 1) -> Any:
    """Sum of `fn(micro_batch)` over micro-batches (lax.scan; one micro-batch = one call).

    `fn` must return a pytree of additive quantities (weighted-sum losses, their gradients, metric
    sums): with weights from `loss_weights` on the full batch, the result equals `fn(batch)`.
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    if num_micro_batches == 1:
        return fn(batch)
    micro = split_micro_batches(batch, num_micro_batches)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))

    def step(carry, mb):
        return jax.tree_util.tree_map(jnp.add, carry, fn(mb)), None

    total, _ = jax.lax.scan(step, zeros, micro)
    return total
