"""The Pair-GRPO update step on the tiny Janus: log-prob alignment, accumulation, LoRA, devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pairuni_jax.models import configs, janus
from pairuni_jax.models import lora as lora_lib
from pairuni_jax.rl import grpo, pareto
from pairuni_jax.train import rl_step, sharding

pytestmark = pytest.mark.slow

CONFIG = configs.tiny()
P, G = 2, 4  # pairs, rollouts per item -> B = 8 rows per task


@pytest.fixture(scope="module")
def params():
    return janus.init_params(CONFIG, jax.random.key(0))


def make_batch(seed=0):
    """Rows in rl.rollout_batch's layout: row p * G + g is rollout g of pair p, so the G rows of
    a pair share their prompt (and image); responses, masks and rewards differ per row."""
    rng = np.random.default_rng(seed)
    b, v = P * G, CONFIG.text.vocab_size
    per_pair = lambda x: np.repeat(x, G, axis=0)  # noqa: E731  [P, ...] -> [P * G, ...]
    n_img = (CONFIG.vision.image_size // CONFIG.vision.patch_size) ** 2  # 16 placeholders
    tp_u, ta, tq = n_img + 4, 5, 6
    n_codes = 16
    prompt_mask_u = np.ones((P, tp_u), bool)
    prompt_mask_u[1, :2] = False  # left padding on one pair's prompt
    image_mask = np.zeros((P, tp_u), bool)
    image_mask[:, 3 : 3 + n_img] = True
    ids_u = rng.integers(0, 500, (P, tp_u))
    ids_u[image_mask] = CONFIG.image_token_id
    ans_mask = np.arange(ta)[None] < rng.integers(1, ta + 1, b)[:, None]  # right padding
    pair = {  # per row: pair 0 aligned, pair 1 retrieved with similarity 0.64
        "similarity": np.repeat(np.array([1.0, 0.64], np.float32), G),
        "aligned": np.repeat(np.array([True, False]), G),
    }
    prompt_mask_g = np.ones((P, tq), bool)
    prompt_mask_g[0, :3] = False
    return {
        "und": {
            "prompt_ids": per_pair(ids_u.astype(np.int32)),
            "prompt_mask": per_pair(prompt_mask_u),
            "image_mask": per_pair(image_mask),
            "pixels": per_pair(rng.uniform(-1, 1, (P, 16, 16, 3)).astype(np.float32)),
            "response_ids": rng.integers(0, v, (b, ta)).astype(np.int32),
            "response_mask": ans_mask,
            "rewards": rng.integers(0, 2, b).astype(np.float32),
            **pair,
        },
        "gen": {
            "prompt_ids": per_pair(rng.integers(0, 500, (P, tq)).astype(np.int32)),
            "prompt_mask": per_pair(prompt_mask_g),
            "response_ids": rng.integers(0, CONFIG.vq.codebook_size, (b, n_codes)).astype(np.int32),
            "response_mask": np.ones((b, n_codes), bool),
            "rewards": rng.uniform(0, 1, b).astype(np.float32),
            **pair,
        },
    }


@pytest.mark.parametrize("rows_per_prompt", [1, G])
def test_response_log_probs_match_a_full_sequence_forward(params, rows_per_prompt):
    """Each row scored on its own, and each prompt run once for its G rows (a KV cache repeated
    over them): both equal the whole sequence through janus.py."""
    batch = make_batch()
    lp = jax.jit(rl_step.log_probs, static_argnums=(1, 3, 4))
    got = lp(params, CONFIG, batch, None, rows_per_prompt)
    und, gen = batch["und"], batch["gen"]
    # Reference: the whole sequence through janus.py's public functions, then shift by one.
    feats = janus.image_features(params, CONFIG, und["pixels"])
    prompt = janus.embed_prompt(params, CONFIG, und["prompt_ids"], feats, und["image_mask"])
    embeds = jnp.concatenate([prompt, janus.embed_tokens(params, CONFIG, und["response_ids"])], 1)
    mask = np.concatenate([und["prompt_mask"], und["response_mask"]], 1)
    h, _ = janus.forward(params, CONFIG, embeds, mask)
    ids = np.concatenate([und["prompt_ids"], und["response_ids"]], 1)
    full = grpo.next_token_log_probs(janus.text_logits(params, CONFIG, h), ids)
    ta = und["response_ids"].shape[1]
    np.testing.assert_allclose(got["und"], full[:, -ta:], rtol=1e-5, atol=1e-5)
    codes = janus.image_token_embeds(params, CONFIG, gen["response_ids"])
    embeds = jnp.concatenate([janus.embed_tokens(params, CONFIG, gen["prompt_ids"]), codes], 1)
    mask = np.concatenate([gen["prompt_mask"], gen["response_mask"]], 1)
    h, _ = janus.forward(params, CONFIG, embeds, mask)
    logits = janus.image_logits(params, CONFIG, h)[:, gen["prompt_ids"].shape[1] - 1 : -1]
    want = grpo.token_log_probs(logits, gen["response_ids"])
    np.testing.assert_allclose(got["gen"], want, rtol=1e-5, atol=1e-5)
    # Guided scoring: softmax(u + w (c - u)), u from the unconditional prompt rows.
    uncond_ids = np.where(np.arange(gen["prompt_ids"].shape[1]) == 0, gen["prompt_ids"], 7)
    guided_batch = {
        **batch,
        "gen": {**gen, "uncond_prompt_ids": uncond_ids, "uncond_prompt_mask": gen["prompt_mask"]},
    }
    guided = lp(params, CONFIG, guided_batch, 5.0, rows_per_prompt)
    embeds = jnp.concatenate([janus.embed_tokens(params, CONFIG, uncond_ids), codes], 1)
    h, _ = janus.forward(params, CONFIG, embeds, mask)
    u = janus.image_logits(params, CONFIG, h)[:, gen["prompt_ids"].shape[1] - 1 : -1]
    want = grpo.token_log_probs(u + 5.0 * (logits - u), gen["response_ids"])
    np.testing.assert_allclose(guided["gen"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(guided["und"], got["und"], rtol=1e-6)


def _run(params, cfg, batch, tx=None, steps=1):
    tx = tx or optax.sgd(1e-2)
    params = jax.tree.map(jnp.copy, params)  # the step donates its state
    state = rl_step.init_state(params, tx, lora=cfg.lora, rng=jax.random.key(1))
    cfg = dataclasses.replace(cfg, group_size=G)
    fn = rl_step.make_update_fn(CONFIG, cfg, tx)
    metrics = None
    for _ in range(steps):
        state, metrics = fn(state, batch)
    return state, metrics


SUM = rl_step.UpdateConfig(combiner=pareto.CombinerConfig(mode="sum", objective_stats=False))


@pytest.fixture(scope="module")
def sum_step(params):
    """One full-fine-tuning 'sum' step on one device: (batch, new state, metrics)."""
    batch = make_batch(1)
    state, metrics = _run(params, SUM, batch)
    return batch, state, metrics


def test_sum_step_accumulation_and_old_logp(params, sum_step):
    batch, state1, m1 = sum_step
    cfg = SUM
    assert int(state1.step) == 1 and np.isfinite(float(m1["loss"]))
    assert float(m1["grad_norm"]) > 0 and float(m1["und/clip_fraction"]) == 0.0
    # On-policy: old_logp given explicitly == old_logp absent.
    old = jax.jit(rl_step.log_probs, static_argnums=1)(params, CONFIG, batch)
    with_old = {
        **batch,
        "und": {**batch["und"], "old_logp": old["und"]},
        "gen": {**batch["gen"], "old_logp": old["gen"]},
    }
    cfg2 = dataclasses.replace(cfg, num_micro_batches=2)
    state2, m2 = _run(params, cfg2, with_old)
    for a, b in zip(
        jax.tree.leaves(state2.trainable), jax.tree.leaves(state1.trainable), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-4, atol=1e-6)
    # (One micro-batch shares each prompt over G = 4 rows, two over 2: the log-prob test above
    # checks both sharing and none against the full-sequence forward.)
    # Frozen parts (vision encoder, VQ) are not in the trainable partition.
    assert state1.trainable["vision_model"] is None or not jax.tree.leaves(
        state1.trainable["vision_model"]
    )


def test_rows_per_prompt_follows_the_micro_batch_split():
    # Micro-batch j holds rows j, j + M, ...: a group's rows in it are G / M consecutive rows.
    cfg = rl_step.UpdateConfig(group_size=8)
    got = {m: dataclasses.replace(cfg, num_micro_batches=m).rows_per_prompt for m in (1, 2, 3, 8)}
    assert got == {1: 8, 2: 4, 3: 1, 8: 1}
    assert dataclasses.replace(cfg, shared_prompts=False).rows_per_prompt == 1
    batch = grpo.split_micro_batches({"row": jnp.arange(16)}, 2)["row"]  # P = 2, G = 8
    np.testing.assert_array_equal(batch[1] // 8, np.repeat([0, 1], 4))  # runs of G / M = 4


def test_pareto_step_with_lora_keeps_base_frozen(params):
    batch = make_batch(2)
    cfg = rl_step.UpdateConfig(
        grpo=grpo.GRPOConfig(beta=0.04),  # the KL reference is the frozen base
        combiner=pareto.CombinerConfig(mode="pareto", groups=(r"layers_(\d+)/",)),
        lora=lora_lib.LoraConfig(rank=2, alpha=4.0),
    )
    state, m = _run(params, cfg, batch, tx=optax.adam(1e-2), steps=2)
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(float(jnp.abs(ab["b"]).max()) > 0 for ab in state.trainable.values())
    w = float(m["gen/weight"]) + float(m["und/weight"])
    assert abs(w - 1.0) < 1e-5 and -1 <= float(m["grad_cosine"]) <= 1
    assert all(np.isfinite(float(v)) for v in jax.tree.leaves(m))
    assert float(m["und/clip_fraction"]) >= 0 and float(m["gen/approx_kl"]) >= 0
    assert float(m["und/ref_kl"]) > 0  # second step: the adapters have moved off the base
    # Task-by-task gradients == one shared forward with a vmapped vjp over the joint loss.
    joint, mj = _run(
        params, dataclasses.replace(cfg, per_task_grads=False), batch, tx=optax.adam(1e-2), steps=2
    )
    for a, b in zip(
        jax.tree.leaves(joint.trainable), jax.tree.leaves(state.trainable), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mj["und/weight"], m["und/weight"], rtol=1e-4, atol=1e-6)


def test_eight_device_fsdp_step_equals_one_device(params, sum_step):
    batch, want, wm = sum_step
    tx = optax.sgd(1e-2)
    mesh = sharding.make_mesh(2, 4, 1)
    state = rl_step.init_state(jax.tree.map(jnp.copy, params), tx)
    shardings = sharding.param_shardings(state, sharding.JANUS_RULES, mesh)
    state = jax.device_put(state, shardings)
    fn = rl_step.make_update_fn(CONFIG, dataclasses.replace(SUM, group_size=G), tx, shardings)
    got, gm = fn(state, sharding.shard_batch(batch, mesh))
    q = got.trainable["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(got.trainable), jax.tree.leaves(want.trainable), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gm["loss"], wm["loss"], rtol=1e-4, atol=1e-6)


def test_one_task_batch_trains_that_task_only(params):
    """An und-only batch updates exactly as a two-task batch whose gen rewards are all equal
    (zero gen advantages, so no gen gradient); gen-only under the Pareto combiner gives the
    present task all the weight."""
    batch = make_batch(3)
    flat_gen = {**batch, "gen": {**batch["gen"], "rewards": np.ones(P * G, np.float32)}}
    both, mb = _run(params, SUM, flat_gen)
    und_only, mu = _run(params, SUM, {"und": batch["und"]})
    for a, b in zip(
        jax.tree.leaves(und_only.trainable), jax.tree.leaves(both.trainable), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mu["loss"], mb["loss"], rtol=1e-5, atol=1e-7)
    assert "gen/loss" not in mu and "gen/reward_mean" not in mu and "und/loss" in mu
    pareto_cfg = rl_step.UpdateConfig(combiner=pareto.CombinerConfig(mode="pareto"))
    gen_only, mg = _run(params, pareto_cfg, {"gen": batch["gen"]})
    assert float(mg["gen/weight"]) == 1.0 and "und/loss" not in mg
    assert float(mg["grad_norm"]) > 0 and float(mg["skipped"]) == 0.0
    with pytest.raises(ValueError, match="none of the tasks"):
        _run(params, SUM, {})
