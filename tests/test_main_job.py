"""The embedded default end to end at a micro scale: every stage runs, and a rerun resumes."""

import json
import os
import subprocess
import sys

import pytest

from pairuni_jax.train import run as run_lib
from pairuni_jax.train.metrics import read_jsonl

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import shapes
    finally:
        sys.path.pop(0)
    c = shapes.get_config("smoke")
    c.world.update(train_size=24, train_pairs=12, heldout_size=12, heldout_pairs=4)
    c.vq.update(steps=4, warmup_steps=1, batch_size=8, num_images=32, eval_per_category=2)
    c.sft.update(steps=3, batch_size=4, log_every=1)
    c.rl.update(steps=2, pairs_per_batch=2, group_size=2, checkpoint_every=1)
    c.eval.update(num_understanding=4, num_generation=4)
    return c


def test_stages_run_in_order_and_a_rerun_resumes(tmp_path):
    results = run_lib.run(micro_config(), str(tmp_path))
    assert list(results) == ["world", "vq", "sft", "pairs", "rl"]
    for stage in results:
        assert os.path.exists(tmp_path / stage / "result.json")
    assert results["pairs"]["by_pair_type"]["aligned"] == 12
    for stage in ("sft", "rl"):
        with open(tmp_path / stage / "model" / "config.json") as f:
            assert json.load(f)["model_type"] == "janus"
    train = [r for r in read_jsonl(tmp_path / "rl" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0.0 <= r["train/gen/reward_mean"] <= 1.0 for r in train)
    records = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    evals = [r for r in records if "eval/und/acc_overall" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert os.path.exists(tmp_path / "rl" / "images" / "eval_samples_000002.png")

    before = os.path.getmtime(tmp_path / "rl" / "result.json")
    again = run_lib.run(micro_config(), str(tmp_path))  # every stage is done: nothing reruns
    assert again == results
    assert os.path.getmtime(tmp_path / "rl" / "result.json") == before


def test_main_rejects_a_bad_preset(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pairuni_jax.main", "--config=configs/shapes.py:nope",
         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "unknown preset 'nope'" in out.stderr
