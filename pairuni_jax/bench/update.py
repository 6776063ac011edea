"""Update step: our jitted Pair-GRPO step vs the same loss in PyTorch eager on transformers' Janus.

`python -m pairuni_jax.bench update [--preset small|tiny] [--repeats N]`

Same weights (ours saved with checkpoints.save_hf, loaded by transformers), same batch, fp32, CPU:
- the batch has GRPO's layout: the G rollouts of a pair are G rows with the same prompt;
- reference: forward + backward of the Pair-GRPO loss on both tasks in torch eager (vision encoder
  and VQ frozen, as in our full fine-tuning default), every row's whole sequence; ours: the same
  loss's gradient with respect to the same trainable leaves, jitted, both the same way (each
  row's own prompt: the kernels compared) and with each prompt run once for its G rows
  (UpdateConfig.shared_prompts, the default: what the algorithm saves); and the whole update
  step in 'sum' mode (forward + backward + AdamW + metrics), which does strictly more work;
- 'pareto' vs 'sum' step time and the solver's share of the step; per-objective gradients task by
  task (the default: each over its own rows) vs one shared forward of the joint loss + vmapped vjp;
- model FLOPs utilisation: XLA's flop count of the step over its time, against the fp32
  matrix-multiply peak measured in the same run;
- peak memory of the compiled step in both modes (XLA memory analysis: arguments + temporaries).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from pairuni_jax import checkpoints
from pairuni_jax.bench.common import Record, time_fn
from pairuni_jax.models import configs, janus
from pairuni_jax.models import lora as lora_lib
from pairuni_jax.models.configs import LlamaConfig, SigLIPConfig, VQConfig
from pairuni_jax.rl import grpo, pareto
from pairuni_jax.train import rl_step

PRESETS = {
    # A CPU-sized Janus: 4 layers of width 512 and 64 image tokens per side.
    "small": dict(
        model=dict(
            text=LlamaConfig(
                vocab_size=8192,
                hidden_size=512,
                intermediate_size=1408,
                num_layers=4,
                num_heads=8,
                num_kv_heads=8,
                head_dim=64,
                max_position_embeddings=512,
            ),
            vision=SigLIPConfig(
                image_size=64, patch_size=8, width=256, depth=2, num_heads=4, mlp_dim=1024
            ),
            vq=VQConfig(
                image_size=64,
                codebook_size=1024,
                codebook_dim=8,
                ch=32,
                ch_mult=(1, 1, 2, 2),
                num_res_blocks=1,
                z_channels=32,
            ),
            gen_head_dim=512,
            image_token_id=8191,
        ),
        pairs=2,
        group=4,
        text_prompt=16,
        answer=32,
        gen_prompt=24,
    ),
    "tiny": dict(model={}, pairs=2, group=2, text_prompt=4, answer=5, gen_prompt=6),
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=5)


def make_batch(config, p: int, g: int, text_prompt: int, answer: int, gen_prompt: int, seed=0):
    """A rollout batch in rl_step's layout: row i * G + j is rollout j of pair i, so the G rows of
    a pair share their prompt and image (random tokens, ragged answers, some left padding)."""
    rng = np.random.default_rng(seed)
    b, v = p * g, config.text.vocab_size
    per_pair = lambda x: np.repeat(x, g, axis=0)  # noqa: E731  [P, ...] -> [P * G, ...]
    n_img = (config.vision.image_size // config.vision.patch_size) ** 2
    tp = n_img + text_prompt
    image_mask = np.zeros((p, tp), bool)
    image_mask[:, 2 : 2 + n_img] = True
    ids = rng.integers(0, v - 1, (p, tp))
    ids[image_mask] = config.image_token_id
    prompt_mask = np.ones((p, tp), bool)
    prompt_mask[::2, :1] = False
    gen_mask = np.ones((p, gen_prompt), bool)
    gen_mask[1::2, :2] = False
    s = config.vision.image_size
    pair = {  # per row (repeated over the pair's G rollouts); even pairs aligned
        "similarity": np.repeat(rng.uniform(0.6, 1, p).astype(np.float32), g),
        "aligned": np.repeat(np.arange(p) % 2 == 0, g),
    }
    return {
        "und": {
            "prompt_ids": per_pair(ids.astype(np.int32)),
            "prompt_mask": per_pair(prompt_mask),
            "image_mask": per_pair(image_mask),
            "pixels": per_pair(rng.uniform(-1, 1, (p, s, s, 3)).astype(np.float32)),
            "response_ids": rng.integers(0, v, (b, answer)).astype(np.int32),
            "response_mask": np.arange(answer)[None]
            < rng.integers(answer // 2, answer + 1, b)[:, None],
            "rewards": rng.integers(0, 2, b).astype(np.float32),
            **pair,
        },
        "gen": {
            "prompt_ids": per_pair(rng.integers(0, v - 1, (p, gen_prompt)).astype(np.int32)),
            "prompt_mask": per_pair(gen_mask),
            "response_ids": rng.integers(
                0, config.vq.codebook_size, (b, config.vq.num_tokens)
            ).astype(np.int32),
            "response_mask": np.ones((b, config.vq.num_tokens), bool),
            "rewards": rng.uniform(0, 1, b).astype(np.float32),
            **pair,
        },
    }


# ---------------------------------------------------------------- the PyTorch reference


def advantages_and_weights(batch, cfg: grpo.GRPOConfig, group_size: int):
    """Per-task pair-weighted advantages [B] and per-token loss weights, shared by both losses."""
    adv = {}
    for t in ("und", "gen"):
        d = batch[t]
        a = grpo.group_advantages(
            jnp.asarray(d["rewards"]).reshape(-1, group_size), eps=cfg.adv_eps
        )
        w = grpo.pair_weights(
            jnp.asarray(d["similarity"]), jnp.asarray(d["aligned"]), cfg.pair_weighting
        )
        adv[t] = a.reshape(-1) * w
    weights = grpo.loss_weights(
        {t: jnp.asarray(batch[t]["response_mask"]) for t in ("und", "gen")}, cfg.aggregation
    )
    return adv, weights


def torch_loss_fn(model, batch, cfg: grpo.GRPOConfig, group_size: int):
    """The Pair-GRPO loss (on-policy ratio, task_sum aggregation) in torch eager on HF Janus."""
    import torch

    adv, weights = advantages_and_weights(batch, cfg, group_size)
    T = {
        t: {k: torch.from_numpy(np.asarray(v)) for k, v in batch[t].items()} for t in ("und", "gen")
    }
    A = {t: torch.tensor(np.asarray(adv[t])) for t in adv}
    W = {t: torch.tensor(np.asarray(weights[t])) for t in weights}
    m = model.model

    def response_logp(prompt_e, prompt_mask, resp_e, d, head):
        tp, tr = prompt_e.shape[1], resp_e.shape[1]
        mask = torch.cat([prompt_mask, d["response_mask"]], 1).long()
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        h = m.language_model(
            inputs_embeds=torch.cat([prompt_e, resp_e], 1), attention_mask=mask, position_ids=pos
        ).last_hidden_state
        logits = head(h[:, tp - 1 : tp - 1 + tr]).float()
        return torch.log_softmax(logits, -1).gather(-1, d["response_ids"].long()[..., None])[..., 0]

    def task_loss(logp, t):
        ratio = torch.exp(logp - logp.detach())
        a = A[t][:, None]
        surr = -torch.minimum(ratio * a, ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * a)
        return (W[t] * surr).sum()

    def loss():
        u = T["und"]
        feats = m.get_image_features(u["pixels"].permute(0, 3, 1, 2)).pooler_output
        e = m.get_input_embeddings()(u["prompt_ids"].long())
        e = e.masked_scatter(u["image_mask"][..., None], feats.to(e.dtype))
        ans = m.get_input_embeddings()(u["response_ids"].long())
        lu = response_logp(e, u["prompt_mask"], ans, u, model.lm_head)
        gd = T["gen"]
        ge = m.get_input_embeddings()(gd["prompt_ids"].long())
        codes = model.prepare_embeddings_for_image_generation(gd["response_ids"].long())
        lg = response_logp(ge, gd["prompt_mask"], codes, gd, m.generation_head)
        return task_loss(lu, "und") + task_loss(lg, "gen"), lu, lg

    return loss


def jax_grad_fn(config, batch, cfg: grpo.GRPOConfig, group_size: int, frozen,
                rows_per_prompt: int = 1):
    """`torch_loss_fn`'s loss in JAX: the jitted gradient w.r.t. the trainable leaves
    (rows_per_prompt: see rl_step.log_probs)."""
    adv, weights = advantages_and_weights(batch, cfg, group_size)

    def loss(trainable, batch):
        params = lora_lib.combine(trainable, frozen)
        lps = rl_step.log_probs(params, config, batch, rows_per_prompt=rows_per_prompt)
        total = 0.0
        for t, lp in lps.items():
            mask = batch[t]["response_mask"]
            tb = grpo.TaskBatch(jax.lax.stop_gradient(lp), adv[t], weights[t], mask)
            total = total + grpo.task_loss(lp, tb, cfg)[0]
        return total

    return jax.jit(jax.grad(loss))


# ---------------------------------------------------------------- helpers


def measured_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul FLOP/s on this machine (the MFU denominator)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t = time_fn(lambda: f(a).block_until_ready(), repeats=repeats)
    return 2 * n**3 / t


def _compiled(fn, state, batch):
    return fn.lower(state, batch).compile()


def _memory_mb(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (
        m.argument_size_in_bytes
        + m.temp_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    ) / 2**20


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def run(args) -> list[Record]:
    import torch
    from transformers import JanusForConditionalGeneration

    torch.set_num_threads(os.cpu_count() or 1)
    preset = PRESETS[args.preset]
    config = configs.tiny(**preset["model"])
    params = janus.init_params(config, jax.random.key(0))
    batch = make_batch(
        config,
        preset["pairs"],
        preset["group"],
        preset["text_prompt"],
        preset["answer"],
        preset["gen_prompt"],
    )
    gcfg = grpo.GRPOConfig()
    records = []

    with tempfile.TemporaryDirectory() as d:
        checkpoints.save_hf(config, params, d)
        model = JanusForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    model.train(False)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("model.vision_model", "model.vqmodel")))
    torch_loss = torch_loss_fn(model, batch, gcfg, preset["group"])

    def torch_step():
        loss, _, _ = torch_loss()
        loss.backward()
        model.zero_grad(set_to_none=True)

    # Same loss value on both sides (a check that the comparison is like for like).
    with torch.no_grad():
        t_loss, t_lu, t_lg = torch_loss()
    ours_lp = jax.jit(rl_step.log_probs, static_argnums=(1, 3, 4))(
        params, config, batch, None, preset["group"]
    )
    lp_err = max(
        float(np.max(np.abs(np.asarray(ours_lp["und"]) - t_lu.numpy()))),
        float(np.max(np.abs(np.asarray(ours_lp["gen"]) - t_lg.numpy()))),
    )

    tx = rl_step.make_optimizer(1e-6)
    fns, compiled, states = {}, {}, {}
    modes = {
        "sum": pareto.CombinerConfig(mode="sum", objective_stats=False),
        "pareto": pareto.CombinerConfig(mode="pareto"),
        "pareto_vjp": pareto.CombinerConfig(mode="pareto", grad_method="vjp"),
    }
    for mode, comb in modes.items():
        cfg = rl_step.UpdateConfig(
            grpo=gcfg,
            combiner=comb,
            group_size=preset["group"],
            per_task_grads=mode != "pareto_vjp",
        )
        fns[mode] = rl_step.make_update_fn(config, cfg, tx)
        states[mode] = rl_step.init_state(jax.tree.map(jnp.copy, params), tx)
        t0 = time.perf_counter()
        compiled[mode] = _compiled(fns[mode], states[mode], batch)
        records.append(Record(f"compile {mode} step", time.perf_counter() - t0, None, "s"))

    trainable, frozen = lora_lib.partition(params, lora_lib.trainable_mask(params))
    jbatch = jax.tree.map(jnp.asarray, batch)
    for name, rows_per_prompt in (("grads", preset["group"]), ("grads_rows", 1)):
        grad_fn = jax_grad_fn(config, batch, gcfg, preset["group"], frozen, rows_per_prompt)
        compiled[name] = grad_fn.lower(trainable, jbatch).compile()

    def ours(mode):
        if mode.startswith("grads"):
            return lambda: jax.block_until_ready(compiled[mode](trainable, jbatch))

        def go():
            states[mode], m = compiled[mode](states[mode], batch)
            jax.block_until_ready(m)

        return go

    # Interleave the measurements so background load hits all of them alike.
    # The matmul peak is measured in the same loop, so a shared machine's load hits it alike.
    times = {k: [] for k in ("torch", "grads", "grads_rows", *modes)}
    peaks = []
    for _ in range(args.repeats):
        for k in times:
            fn = torch_step if k == "torch" else ours(k)
            times[k].append(time_fn(fn, repeats=1, warmup=0 if times[k] else 1))
        peaks.append(measured_peak_flops(repeats=3))
    med = {k: float(np.median(v)) for k, v in times.items()}
    t_torch, t_sum, t_par = med["torch"], med["sum"], med["pareto"]

    # The solver alone, on gradients shaped like the step's.
    state = states["pareto"]
    grads_k = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x + 0.1]), state.trainable)
    combine = jax.jit(
        lambda g, losses: pareto.combine(g, losses, pareto.CombinerConfig(mode="pareto"))
    )
    losses = jnp.array([1.0, 2.0])
    t_solver = time_fn(
        lambda: jax.block_until_ready(combine(grads_k, losses)), repeats=args.repeats
    )

    peak = float(np.max(peaks))  # the best observed rate: a conservative MFU
    flops = _flops(compiled["sum"])
    tokens = sum(int(np.sum(batch[t]["response_mask"])) for t in ("und", "gen"))
    t_grads, t_rows = med["grads"], med["grads_rows"]
    records += [
        Record(
            "loss fwd+bwd, both tasks (gradients only), each row's own prompt",
            t_rows * 1e3,
            t_torch * 1e3,
            "ms",
            note="the reference's computation; ratio < 1 = ours faster",
        ),
        Record("speed-up vs torch eager (gradients only, each row's own prompt)",
               t_torch / t_rows, None, "x"),
        Record(
            "loss fwd+bwd, both tasks (gradients only), one prompt per group",
            t_grads * 1e3,
            t_torch * 1e3,
            "ms",
            note="the default; ratio < 1 = ours faster",
        ),
        Record("speed-up vs torch eager (gradients only)", t_torch / t_grads, None, "x"),
        Record(
            "FLOPs of the gradient, one prompt per group",
            _flops(compiled["grads"]) / 1e9,
            _flops(compiled["grads_rows"]) / 1e9,
            "GFLOP",
            note=f"reference = each row's own prompt (G = {preset['group']})",
        ),
        Record(
            "loss fwd+bwd, both tasks (ours: full step)",
            t_sum * 1e3,
            t_torch * 1e3,
            "ms",
            note="+ AdamW, clipping, metrics; ratio < 1 = ours faster",
        ),
        Record("speed-up vs torch eager (full step)", t_torch / t_sum, None, "x"),
        Record("pareto step", t_par * 1e3, t_sum * 1e3, "ms", note="reference = sum step"),
        Record(
            "pareto step, joint loss: one forward + vmapped vjp",
            med["pareto_vjp"] * 1e3,
            t_par * 1e3,
            "ms",
            note="reference = task-by-task gradients (default)",
        ),
        Record("solver (combine) share of pareto step", t_solver / t_par * 100, None, "%"),
        Record("step FLOPs (XLA)", flops / 1e9, None, "GFLOP"),
        Record("measured fp32 matmul peak", peak / 1e9, None, "GFLOP/s"),
        Record("MFU of sum step", flops / t_sum / peak * 100, None, "%"),
        Record(
            "scored tokens/s (sum step)",
            tokens / t_sum,
            tokens / t_torch,
            "tok/s",
            note="ratio > 1 = ours faster",
        ),
        Record("peak memory sum step", _memory_mb(compiled["sum"]), None, "MiB"),
        Record(
            "peak memory pareto step",
            _memory_mb(compiled["pareto"]),
            _memory_mb(compiled["sum"]),
            "MiB",
        ),
        Record("max |logp ours - torch|", lp_err, None, "nats", note="same weights, same batch"),
    ]
    return records
