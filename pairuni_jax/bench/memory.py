"""Memory plan: per-device memory of the compiled update and rollout steps of Janus-Pro 1B / 7B.

`python -m pairuni_jax.bench memory [--models 7b,1b] [--steps ...] [--devices 16] [--mesh 1,16,1]`

Nothing is allocated: the params, optimizer state and batches are abstract (jax.eval_shape /
ShapeDtypeStruct carrying their NamedSharding), and each step is lowered and compiled for a mesh
of forced CPU devices with the FSDP rules of train/sharding.py. XLA's memory analysis of the
compiled program then gives, per device: arguments (the param / optimizer shard and the batch
shard), outputs, temporaries (activations, gradients, gathered weights), and the peak
arguments + outputs - aliased (donated) + temporaries.

The batch is the paper's (configs/pairug.py): P = 16 pairs per step, G = 4 rollouts per item for
7B and 8 for 1B, 576 image tokens, 512-token answers; understanding prompts hold the 576 image
features plus a 128-token text prompt. Full fine-tuning stores float32 weights (the recipe's
master weights) and computes in bfloat16; LoRA's frozen base is bfloat16. Steps:
- update_full / update_lora: the Pair-GRPO update (rl_step.make_update_fn) with AdamW, full
  fine-tuning (vision encoder and VQ frozen) or LoRA rank 16 on every LLM projection, in
  micro-batches of one row per device;
- rollout_text: G answers per understanding prompt (prefill with the image, KV-cache decode);
- rollout_image: G CFG images of 576 tokens per generation prompt;
- vq_decode: the VQ decoder turning the P * G image-token grids into 384 x 384 pixels.

By default each step is compiled at 2 and 4 decoder layers and the memory extrapolated linearly
to the full depth (24 for 1B, 30 for 7B): every per-layer quantity (weights, gradients, moments,
saved activations, KV cache) is linear in depth, and a full-depth 7B compile takes long on a CPU.
`--layers ''` compiles the full depth instead.

The forced device count has to be set before jax starts, so each setting is measured in a child
process (`XLA_FLAGS=--xla_force_host_platform_device_count=N`), which also keeps one setting's
compile memory from adding to the next. The figures are those of XLA's CPU backend, which runs
bfloat16 matrix products through float32 copies of their operands (gathered weight matrices
included); a TPU compile keeps them in bfloat16 and fuses more, so read the figures as an upper
bound of the TPU program's, not as an exact TPU number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from pairuni_jax.bench.common import Record

MODELS = ("1b", "7b")
STEPS = ("update_full", "update_lora", "rollout_text", "rollout_image", "vq_decode")
GROUP = {"1b": 8, "7b": 4}  # the paper's G
GIB = 2**30
# HBM per chip (GiB): the TPU generations a run is planned for.
HBM_GIB = {"v5e": 16, "v4": 32, "v6e": 32, "v5p": 95}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="1b,7b", help=f"comma list of {MODELS}")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    parser.add_argument("--devices", type=int, default=16, help="forced CPU devices in the mesh")
    parser.add_argument(
        "--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1: the rest)"
    )
    parser.add_argument("--pairs", type=int, default=16, help="P: pairs (prompts) per step")
    parser.add_argument("--group", type=int, default=0, help="G (0: 4 for 7B, 8 for 1B)")
    parser.add_argument("--micro-batches", type=int, default=0,
                        help="update micro-batches (0: one row per device per micro-batch)")
    parser.add_argument("--text-prompt", type=int, default=128,
                        help="understanding prompt tokens besides the 576 image placeholders")
    parser.add_argument("--answer", type=int, default=512,
                        help="answer tokens (configs/pairug.py rl.max_new_tokens)")
    parser.add_argument("--gen-prompt", type=int, default=64, help="generation prompt tokens")
    parser.add_argument("--param-dtype", default="float32", choices=("bfloat16", "float32"),
                        help="stored weights of full fine-tuning and the rollouts (LoRA's "
                             "frozen base is bfloat16); compute is bfloat16")
    parser.add_argument(
        "--layers", default="2,4",
        help="LLM depths to compile, then extrapolate linearly to the full depth ('' = compile "
             "the full depth: exact, but a 30-layer 7B compile takes long on CPU)")
    parser.add_argument("--no-constrain", action="store_true",
                        help="lower outside the mesh context, without the VQ's row constraints "
                             "on activations (what they save)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per setting")
    parser.add_argument("--child", help=argparse.SUPPRESS)


# ---------------------------------------------------------------- parent: one child per setting


def _child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _setting(args: argparse.Namespace, model: str, step: str) -> dict[str, Any]:
    return dict(
        model=model, step=step, devices=args.devices, mesh=args.mesh, pairs=args.pairs,
        group=args.group or GROUP[model], micro_batches=args.micro_batches,
        text_prompt=args.text_prompt, answer=args.answer, gen_prompt=args.gen_prompt,
        param_dtype="bfloat16" if step == "update_lora" else args.param_dtype,
        dtype="bfloat16", constrain=not args.no_constrain,
    )


def _measure_in_child(setting: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pairuni_jax.bench.memory", "--child", json.dumps(setting)]
    try:
        out = subprocess.run(cmd, env=_child_env(setting["devices"]), capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**setting, "error": f"compile took longer than {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {**setting, "error": f"exit {out.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def smallest_slices(peak_gib: float) -> str:
    """Which TPU generations hold `peak_gib` per chip (with 10% headroom), e.g. 'v4 v6e v5p'."""
    fits = [name for name, hbm in sorted(HBM_GIB.items(), key=lambda kv: kv[1])
            if peak_gib * 1.1 <= hbm]
    return " ".join(fits) if fits else "none"


def _records(result: dict[str, Any]) -> list[Record]:
    name = f"{result['model']}/{result['step']}"
    if "error" in result:
        return [Record(name, float("nan"), None, "GiB", note=result["error"])]
    m = result["memory"]
    mesh = "x".join(str(n) for n in result["mesh_shape"].values())
    how = (f"extrapolated from {result['extrapolated_from']} layers"
           if "extrapolated_from" in result else f"{result['layers']} layers")
    where = f"mesh {mesh} (data x fsdp x tensor), {how}"
    recs = [Record(f"{name}/{k}", m[k] / GIB, None, "GiB/device") for k in
            ("arguments", "outputs", "temps")]
    recs.append(Record(f"{name}/peak", m["peak"] / GIB, None, "GiB/device",
                       note=f"{where}; fits per chip: {smallest_slices(m['peak'] / GIB)}"))
    return recs


def extrapolate(results: list[dict[str, Any]], layers: int) -> dict[str, Any]:
    """Memory at `layers` LLM layers from compiles at two smaller depths, linear in depth.

    Every per-layer quantity (weights, gradients, optimizer moments, saved activations, KV
    cache) grows linearly with the number of identical decoder layers; the rest (vision tower,
    VQ, heads, embeddings) does not depend on it.
    """
    (a, b) = sorted(results, key=lambda r: r["layers"])[:2]
    la, lb = a["layers"], b["layers"]
    memory = {k: round(a["memory"][k] + (b["memory"][k] - a["memory"][k]) * (layers - la)
                       / (lb - la)) for k in a["memory"]}
    return {**b, "layers": layers, "memory": memory, "extrapolated_from": [la, lb],
            "compile_s": a["compile_s"] + b["compile_s"], "measured": [a, b]}


def full_depth(model: str) -> int:
    from pairuni_jax.models import configs

    return {"1b": configs.janus_pro_1b, "7b": configs.janus_pro_7b}[model]().text.num_layers


def run(args: argparse.Namespace) -> list[Record]:
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    depths = [int(x) for x in args.layers.split(",") if x.strip()]
    for value, known, flag in ((models, MODELS, "--models"), (steps, STEPS, "--steps")):
        bad = sorted(set(value) - set(known))
        if bad:
            raise SystemExit(f"{flag}: unknown {bad}; known: {list(known)}")
    if depths and len(depths) != 2:
        raise SystemExit(f"--layers {args.layers!r}: give two depths (or '' for the full depth)")
    records, results = [], []
    for model in models:
        for step in steps:
            t0 = time.perf_counter()
            parts = [_measure_in_child({**_setting(args, model, step), "layers": n}, args.timeout)
                     for n in (depths or [full_depth(model)])]
            failed = [p for p in parts if "error" in p]
            result = failed[0] if failed else (
                extrapolate(parts, full_depth(model)) if depths else parts[0])
            print(f"{model}/{step}: {time.perf_counter() - t0:.0f} s wall"
                  + (f" ({result['error']})" if failed else ""), flush=True)
            records += _records(result)
            results.append(result)
    if args.json:  # the full results (every component, mesh, timings) next to the records
        with open(args.json.removesuffix(".json") + "_details.json", "w") as f:
            json.dump(results, f, indent=1)
    return records


# ---------------------------------------------------------------- child: lower and compile


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temps": m.temp_size_in_bytes,
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temps"]
    return out


def _abstract(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _update_batch(config, rows: int, s: dict[str, Any], sharding) -> dict[str, Any]:
    """Abstract rl_step batch: und [B, Tp] prompts with the image, gen [B, Tq] + N codes."""
    import jax.numpy as jnp

    tp = config.vision.num_tokens + s["text_prompt"]
    tq, n, ta = s["gen_prompt"], config.vq.num_tokens, s["answer"]
    size = config.vision.image_size
    a = lambda shape, dtype: _abstract((rows, *shape), dtype, sharding)  # noqa: E731
    pair = {"rewards": a((), jnp.float32), "similarity": a((), jnp.float32),
            "aligned": a((), jnp.bool_)}
    return {
        "und": {"prompt_ids": a((tp,), jnp.int32), "prompt_mask": a((tp,), jnp.bool_),
                "image_mask": a((tp,), jnp.bool_), "pixels": a((size, size, 3), jnp.float32),
                "response_ids": a((ta,), jnp.int32), "response_mask": a((ta,), jnp.bool_),
                **pair},
        "gen": {"prompt_ids": a((tq,), jnp.int32), "prompt_mask": a((tq,), jnp.bool_),
                "response_ids": a((n,), jnp.int32), "response_mask": a((n,), jnp.bool_), **pair},
    }


def _state_shardings(state, mesh):
    """FSDP shardings of a TrainState: params by the Janus rules; optimizer moments like the
    leaves they track (their paths end in the same param path under an optax prefix)."""
    from pairuni_jax.train import sharding

    # Rules anchored at the params root also match under a prefix (trainable/..., opt_state/...).
    rules = [(p.replace("^", "(^|/)", 1) if p.startswith("^") else p, spec)
             for p, spec in sharding.JANUS_RULES]
    return sharding.param_shardings(state, rules, mesh)


def _lower_update(config, mesh, s: dict[str, Any], lora: bool):
    import jax

    from pairuni_jax.models import janus
    from pairuni_jax.models.lora import LoraConfig
    from pairuni_jax.train import rl_step, sharding

    params = janus.param_shapes(config)
    tx = rl_step.make_optimizer()
    lora_cfg = LoraConfig() if lora else None
    state = jax.eval_shape(lambda p: rl_step.init_state(p, tx, lora=lora_cfg), params)
    shardings = _state_shardings(state, mesh)
    state = jax.tree.map(lambda x, sh: _abstract(x.shape, x.dtype, sh), state, shardings)
    rows = s["pairs"] * s["group"]
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = s["micro_batches"] or max(1, rows // shards)
    cfg = rl_step.UpdateConfig(group_size=s["group"], num_micro_batches=micro, lora=lora_cfg)
    batch = _update_batch(config, rows, s, sharding.batch_sharding(mesh))
    fn = rl_step.make_update_fn(config, cfg, tx, shardings)
    return fn.lower(state, batch), {"rows": rows, "micro_batches": micro}


def _policy_params(config, mesh):
    import jax

    from pairuni_jax.models import janus
    from pairuni_jax.train import sharding

    params = janus.param_shapes(config)
    shardings = sharding.param_shardings(params, sharding.JANUS_RULES, mesh)
    return jax.tree.map(lambda x, sh: _abstract(x.shape, x.dtype, sh), params, shardings)


def _lower_rollout(config, mesh, s: dict[str, Any], step: str):
    import jax
    import jax.numpy as jnp

    from pairuni_jax import rollout
    from pairuni_jax.train import sharding

    params = _policy_params(config, mesh)
    rows = sharding.batch_sharding(mesh)
    p, g = s["pairs"], s["group"]
    key = jax.eval_shape(lambda: jax.random.key(0))
    ids = {"bos_id": 100000, "pad_id": 100002}
    if step == "rollout_text":
        tp = config.vision.num_tokens + s["text_prompt"]
        size = config.vision.image_size
        lowered = rollout.generate_text.lower(
            params, config, _abstract((p, tp), jnp.int32, rows),
            _abstract((p, tp), jnp.bool_, rows), key,
            _abstract((p, size, size, 3), jnp.float32, rows),
            num_samples=g, max_new_tokens=s["answer"], sampling=rollout.Sampling(),
            eos_id=100001, pad_id=ids["pad_id"], image_token_id=config.image_token_id)
        return lowered, {"prompts": p, "rows": p * g}
    if step == "rollout_image":
        tq = s["gen_prompt"]
        lowered = rollout.generate_image_tokens.lower(
            params, config, _abstract((p, tq), jnp.int32, rows),
            _abstract((p, tq), jnp.bool_, rows), key, 5.0, num_samples=g,
            sampling=rollout.Sampling(), boi_id=100003, **ids)
        return lowered, {"prompts": p, "rows": 2 * p * g}
    tokens = _abstract((p * g, config.vq.num_tokens), jnp.int32, rows)
    return rollout.decode_pixels.lower(params, config, tokens), {"images": p * g}


def measure(s: dict[str, Any]) -> dict[str, Any]:
    """Lower and compile one setting on the forced CPU mesh; its per-device memory in bytes."""
    import jax

    from pairuni_jax.models import configs
    from pairuni_jax.train import sharding

    if jax.device_count() < s["devices"]:
        raise RuntimeError(f"{jax.device_count()} devices, the setting needs {s['devices']}: "
                           "set XLA_FLAGS=--xla_force_host_platform_device_count before jax starts")
    preset = {"1b": configs.janus_pro_1b, "7b": configs.janus_pro_7b}[s["model"]]
    config = preset(dtype=s["dtype"], param_dtype=s["param_dtype"])
    if s.get("layers"):
        config = config.replace(text=dataclasses.replace(config.text, num_layers=s["layers"]))
    sizes = [int(x) for x in s["mesh"].split(",")]
    mesh = sharding.make_mesh(*sizes, devices=jax.devices()[: s["devices"]])
    t0 = time.perf_counter()
    # Lowered under the mesh, as the loops call the steps: the VQ pins its activations' rows to
    # the batch axes (models/partitioning.py); --no-constrain shows what that saves.
    on_mesh = s.get("constrain", True)
    with sharding.mesh_context(mesh if on_mesh else None):
        if s["step"].startswith("update"):
            lowered, info = _lower_update(config, mesh, s, lora=s["step"] == "update_lora")
        else:
            lowered, info = _lower_rollout(config, mesh, s, s["step"])
        t1 = time.perf_counter()
        compiled = lowered.compile()
    t2 = time.perf_counter()
    return {**s, **info, "mesh_shape": dict(mesh.shape), "lower_s": t1 - t0,
            "compile_s": t2 - t1, "memory": _memory(compiled)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_args(parser)
    print(json.dumps(measure(json.loads(parser.parse_args().child))))
