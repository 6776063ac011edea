"""Checkpointing (Orbax), the preemption guard, and the metrics writer."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pairuni_jax.train.checkpoint import Checkpointer, PreemptionGuard
from pairuni_jax.train.metrics import MetricsWriter, Progress, image_grid, read_jsonl


def _state(seed):
    k = jax.random.key(seed)
    return {
        "params": {"w": jax.random.normal(k, (4, 3)), "b": jnp.zeros((3,), jnp.bfloat16) + seed},
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.key_data(k),
    }


def test_save_restore_keeps_values_dtypes_and_meta(tmp_path):
    with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step), {"data": {"epoch": 0, "position": step * 10}})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]  # keep=2
        restored, meta = ckpt.restore(_state(0))
    jax.tree.map(np.testing.assert_array_equal, restored, _state(3))
    assert restored["params"]["b"].dtype == jnp.bfloat16
    assert meta == {"data": {"epoch": 0, "position": 30}}


def test_restore_into_a_sharded_target(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    x = jax.device_put(jnp.arange(8.0), sharding)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, {"x": x})
        ckpt.wait()
        restored, meta = ckpt.restore({"x": x})
    assert restored["x"].sharding == sharding and meta == {}
    np.testing.assert_array_equal(restored["x"], np.arange(8.0))


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore({"x": jnp.zeros(2)})


def test_sigterm_sets_the_flag_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested
    assert signal.getsignal(signal.SIGTERM) == before


def test_metrics_writer_jsonl_tensorboard_and_images(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.scalars(1, {"loss": 0.5, "bad": float("nan")}, prefix="train/")
    writer.scalars(2, {"loss": 0.25})
    png = writer.images(2, "samples", np.zeros((3, 8, 8, 3), np.uint8), ["a", "b", "c"])
    writer.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [
        {"step": 1, "train/loss": 0.5, "train/bad": None},
        {"step": 2, "loss": 0.25},
    ]
    assert os.path.exists(png)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "off", enabled=False)
    writer.scalars(1, {"x": 1.0})
    writer.close()
    assert not os.path.exists(tmp_path / "off")


def test_image_grid_layout():
    images = np.full((5, 4, 6, 3), 200, np.uint8)
    grid = image_grid(images, ncols=2)
    assert grid.size == (2 * (8 + 2), 3 * (4 + 2))


def test_progress_line(capsys):
    line = Progress(10, "rl").report(0, {"reward": 0.5})
    assert line.startswith("[rl] step 0/10") and "reward=0.5" in line


def test_state_shardings_place_optimizer_moments_like_their_parameter():
    import optax

    from pairuni_jax.train import sharding

    mesh = sharding.make_mesh(2, 2, 2)
    params = {
        "language_model": {
            "embed_tokens": {"embedding": jnp.zeros((64, 8))},
            "layers_0": {"self_attn": {"q_proj": {"kernel": jnp.zeros((8, 16))}}},
        },
        "gen_head": {"bias": jnp.zeros((6,))},
    }
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optax.adam(1e-3).init(params),
    }
    specs = jax.tree.map(
        lambda s: s.spec, sharding.state_shardings(state, sharding.JANUS_RULES, mesh, params.keys())
    )
    want = sharding.param_specs(params, sharding.JANUS_RULES, mesh)
    assert want["language_model"]["embed_tokens"]["embedding"] == PartitionSpec("tensor", "fsdp")
    assert specs["params"] == want
    assert specs["opt_state"][0].mu == want and specs["opt_state"][0].nu == want
    assert specs["step"] == PartitionSpec() and specs["opt_state"][0].count == PartitionSpec()
