"""The Pair-GRPO loop end to end on a tiny world: exact resume, SIGTERM, non-finite updates,
one-task runs and a sharded mesh. Every run shares the loop's compiled programs (one process)."""

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rl_tiny

from pairuni_jax.models.partitioning import batch_shards
from pairuni_jax.train import rl as rl_lib
from pairuni_jax.train import sharding
from pairuni_jax.train.checkpoint import Checkpointer
from pairuni_jax.train.metrics import read_jsonl

pytestmark = pytest.mark.slow

# Per-step metrics that measure wall time: everything else must repeat bitwise.
TIMING = ("time/", "rollout_tokens_per_s")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    world = str(tmp_path_factory.mktemp("world"))
    pairs = rl_tiny.write_tiny_world(world)
    proc = rl_tiny.processor(world)
    config = rl_tiny.model_config(len(proc.tokenizer))
    return {"pairs": pairs, "proc": proc, "config": config, "params": rl_tiny.init_params(config)}


def train(tiny, workdir, reward=None, mesh=None, **overrides):
    """One train_rl call on the tiny setup -> (final params, summary, reward)."""
    reward = reward or rl_tiny.BrightnessReward()
    cfg = rl_tiny.rl_config(**overrides)
    pipe = rl_tiny.pipeline(tiny["pairs"], tiny["proc"], pairs_per_batch=2)
    params, summary = rl_lib.train_rl(
        tiny["params"],
        tiny["config"],
        tiny["proc"],
        pipe,
        reward,
        cfg,
        str(workdir),
        mesh=mesh,
        log=lambda s: None,
    )
    return jax.device_get(params), summary, reward


def step_metrics(workdir):
    """{step: train metrics without the timings} from a run's metrics.jsonl."""
    out = {}
    for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "train/loss" in r:
            out[r["step"]] = {
                k: v for k, v in r.items() if not any(k.startswith("train/" + t) for t in TIMING)
            }
    return out


def restore(tiny, workdir, step=None):
    """The checkpointed state (params, optimizer state, step) of a run, and its meta."""
    loop = rl_lib.PairGRPO(tiny["config"], tiny["proc"], rl_tiny.rl_config(), None)
    target = loop.init_state(jax.tree.map(jnp.asarray, tiny["params"]))
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        return ckpt.restore(target, step)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """4 steps in one go (checkpoints at 2 and 4): the reference the other runs must equal."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    params, summary, reward = train(tiny, workdir)
    return {"dir": str(workdir), "params": params, "summary": summary, "reward_calls": reward.calls}


def test_resume_is_bitwise_exact(tiny, uninterrupted, tmp_path):
    ref = uninterrupted
    metrics = step_metrics(ref["dir"])
    assert sorted(metrics) == [1, 2, 3, 4] and ref["reward_calls"] == 4
    assert metrics[1]["train/grad_norm"] > 0 and metrics[4]["train/skipped"] == 0
    # Parameters move: the run is not trivially equal to its start.
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref["params"], tiny["params"])
    assert max(jax.tree.leaves(moved)) > 0
    train(tiny, tmp_path, steps=2)  # stop after 2 steps (the final checkpoint) ...
    params, _, reward = train(tiny, tmp_path)  # ... and restart: 2 more from the checkpoint
    assert reward.calls == 2  # only the missing steps ran
    assert_trees_equal(params, ref["params"])
    (got, got_meta), (want, want_meta) = restore(tiny, tmp_path), restore(tiny, ref["dir"])
    assert int(got.step) == 4
    assert_trees_equal(got, want)  # trainable params, optimizer state, step
    assert got_meta == want_meta  # data position
    assert step_metrics(tmp_path) == metrics  # every step's metrics, bitwise


def test_sigterm_saves_at_the_step_boundary_and_a_rerun_resumes(tiny, uninterrupted, tmp_path):
    reward = rl_tiny.BrightnessReward()
    # A real SIGTERM, delivered while step 2's rewards are computed.
    reward.actions[1] = lambda: os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(rl_lib.Preempted, match="after step 2"):
        train(tiny, tmp_path, reward=reward, checkpoint_every=100)
    assert signal.getsignal(signal.SIGTERM) == before  # the loop's handler is gone
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2]  # saved at the boundary, not at checkpoint_every
    params, _, reward = train(tiny, tmp_path, checkpoint_every=100)
    assert reward.calls == 2
    assert_trees_equal(params, uninterrupted["params"])
    want = step_metrics(uninterrupted["dir"])
    assert step_metrics(tmp_path) == want


def test_nonfinite_rewards_skip_updates_then_stop_with_the_last_good_checkpoint(
    tiny, uninterrupted, tmp_path
):
    reward = rl_tiny.BrightnessReward()
    reward.nan_from = 2  # the reward model breaks at step 3
    with pytest.raises(rl_lib.NonFiniteUpdates, match="2 non-finite updates in a row at step 4"):
        train(tiny, tmp_path, reward=reward, checkpoint_every=1, max_nonfinite=2)
    metrics = step_metrics(tmp_path)
    assert [metrics[s]["train/skipped"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    assert metrics[3]["train/loss"] is None  # non-finite: null in the JSONL
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 3  # no checkpoint of the failing step
    # Step 3 was skipped: its checkpoint holds step 2's params and optimizer state, untouched.
    (got, meta), (want, _) = restore(tiny, tmp_path, 3), restore(tiny, uninterrupted["dir"], 2)
    assert int(got.step) == 3 and meta["nonfinite_run"] == 1
    assert_trees_equal(got.trainable, want.trainable)
    assert_trees_equal(got.opt_state, want.opt_state)


def test_understanding_only_run_skips_generation(tiny, tmp_path):
    _, summary, reward = train(tiny, tmp_path, steps=1, tasks=("und",))
    assert reward.calls == 0  # no image rollout, no image reward
    assert "train/und/loss" in summary and "train/und/accuracy" in summary
    assert not any(k.startswith("train/gen/") for k in summary)
    assert summary["train/data/skipped"] == 0.0
    with pytest.raises(ValueError, match="subset"):
        rl_tiny.rl_config(tasks=("und", "images"))


def test_sharded_mesh_run_matches_one_device(tiny, uninterrupted, tmp_path, monkeypatch):
    """FSDP + tensor parallelism over 4 devices: the same steps as the one-device run, within
    float32 reduction-order tolerance; the rollouts are called under the mesh, so the model's
    row constraints (models/partitioning.py) are in their programs."""
    shards_seen = []

    def under_mesh(fn):
        def spy(*args, **kwargs):
            shards_seen.append(batch_shards())
            return fn(*args, **kwargs)
        return spy

    for name in ("generate_text", "generate_images"):
        monkeypatch.setattr(rl_lib.rollout, name, under_mesh(getattr(rl_lib.rollout, name)))
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    params, _, _ = train(tiny, tmp_path, mesh=mesh, steps=2)
    assert len(shards_seen) >= 4 and set(shards_seen) == {2}  # 2 steps x 2 tasks; data x fsdp
    got, want = step_metrics(tmp_path), step_metrics(uninterrupted["dir"])
    for step in (1, 2):
        for key in ("train/grad_norm", "train/update_norm", "train/gen/reward_mean"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-4, atol=1e-6)
        # On-policy, the loss is -mean(advantage) ~ 0: only its rounding noise differs.
        np.testing.assert_allclose(got[step]["train/loss"], want[step]["train/loss"], atol=1e-4)
    (state, _), (ref, _) = restore(tiny, tmp_path, 2), restore(tiny, uninterrupted["dir"], 2)
    assert_trees_equal(params, rl_lib.policy_params(state, rl_tiny.rl_config().update))
    # Adam turns rounding-level gradients into full-size steps, so single elements can differ
    # by a step; the parameters as a whole must agree to a small fraction of what they moved.
    start = rl_lib.PairGRPO(tiny["config"], tiny["proc"], rl_tiny.rl_config(), None).init_state(
        tiny["params"]
    )
    norm = lambda tree: float(optax.global_norm(tree))  # noqa: E731
    moved = norm(jax.tree.map(lambda a, b: a - b, ref.trainable, start.trainable))
    diff = norm(jax.tree.map(lambda a, b: a - b, state.trainable, ref.trainable))
    assert moved > 0 and diff < 1e-2 * moved, (diff, moved)


def test_full_fine_tuning_with_beta_keeps_its_start_as_the_kl_reference(
    tiny, uninterrupted, tmp_path
):
    update = rl_tiny.rl_config().update
    with_kl = dataclasses.replace(update, grpo=dataclasses.replace(update.grpo, beta=0.5))
    train(tiny, tmp_path, update=with_kl)
    metrics, without = step_metrics(tmp_path), step_metrics(uninterrupted["dir"])
    # Step 1 samples from the reference itself: KL 0, and the KL term adds no gradient.
    for task in ("und", "gen"):
        assert metrics[1][f"train/{task}/ref_kl"] == pytest.approx(0.0, abs=1e-6)
        assert metrics[4][f"train/{task}/ref_kl"] > 1e-4  # the policy moved away from it
    assert metrics[1]["train/grad_norm"] == pytest.approx(without[1]["train/grad_norm"], rel=1e-4)
    assert metrics[3]["train/grad_norm"] != pytest.approx(without[3]["train/grad_norm"], rel=1e-3)
    # On a mesh the reference is a sharded copy: the same KL to it. (Only the images' KL: the
    # sampled answers of step 2 differ by rounding flips, and their rewards are all 0 here, so
    # nothing else would notice.)
    sharded = tmp_path / "sharded"
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    train(tiny, sharded, update=with_kl, mesh=mesh, steps=2)
    got = step_metrics(sharded)
    assert got[1]["train/und/ref_kl"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(got[2]["train/gen/ref_kl"], metrics[2]["train/gen/ref_kl"],
                               rtol=1e-3)
