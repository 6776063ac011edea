"""The embedded default end to end at a micro scale: every stage runs, and a rerun resumes."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from command_line import load_config
from micro_job import REPO, copy_of_micro_run, micro_config, micro_run, smoke_config

from pairuni_jax.checkpoints import load_janus
from pairuni_jax.models import lora as lora_lib
from pairuni_jax.sampling import Sampling
from pairuni_jax.train import evaluate
from pairuni_jax.train import run as run_lib
from pairuni_jax.train.metrics import read_jsonl
from pairuni_jax.train.shapes_job import ShapesJob, _load_image, rl_config
from pairuni_jax.train.stages import StageInputsChanged

pytestmark = pytest.mark.slow


def test_stages_run_in_order_and_a_rerun_resumes():
    workdir, results = micro_run()
    assert list(results) == ["world", "vq", "sft", "pairs", "rl"]
    for stage in results:
        assert os.path.exists(os.path.join(workdir, stage, "result.json"))
    assert results["pairs"]["by_pair_type"]["aligned"] == 12
    for stage in ("sft", "rl"):
        with open(os.path.join(workdir, stage, "model", "config.json")) as f:
            exported = json.load(f)
        assert exported["model_type"] == "janus"
        # The policy's image vocabulary is the VQ's codebook, sized by the config.
        assert exported["vq_config"]["num_embeddings"] == micro_config().vq.codebook_size
    records = read_jsonl(os.path.join(workdir, "rl", "metrics.jsonl"))
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0.0 <= r["train/gen/reward_mean"] <= 1.0 for r in train)
    evals = [r for r in records if "eval/und/acc_overall" in r]
    assert [r["step"] for r in evals] == [0, 2]
    # The RL start is the SFT end: its evaluation is read back from the cache, identical.
    sft_end = [r for r in read_jsonl(os.path.join(workdir, "sft", "metrics.jsonl"))
               if "eval/und/acc_overall" in r][-1]
    assert {k: v for k, v in evals[0].items() if k != "step"} == {
        k: v for k, v in sft_end.items() if k.startswith("eval/")}
    assert os.path.exists(os.path.join(workdir, "rl", "images", "eval_samples_000002.png"))
    assert os.path.exists(os.path.join(workdir, "report.md"))

    before = os.path.getmtime(os.path.join(workdir, "rl", "result.json"))
    os.remove(os.path.join(workdir, "report.md"))
    again = run_lib.run(micro_config(), workdir)  # every stage is done: nothing reruns
    assert again == results
    assert os.path.getmtime(os.path.join(workdir, "rl", "result.json")) == before
    assert os.path.exists(os.path.join(workdir, "report.md"))  # the rerun writes the report


def test_a_rerun_with_other_settings_stops_before_any_work(tmp_path):
    workdir = copy_of_micro_run(str(tmp_path / "run"))
    config = micro_config()
    config.sft.combiner.mode = "pareto"
    before = {name: sorted(os.listdir(os.path.join(workdir, name))) for name in os.listdir(workdir)
              if os.path.isdir(os.path.join(workdir, name))}
    with pytest.raises(StageInputsChanged, match=r"'sft'.*sft\.combiner\.mode: 'sum' -> 'pareto'"):
        run_lib.run(config, workdir)
    after = {name: sorted(os.listdir(os.path.join(workdir, name))) for name in before}
    assert after == before
    # Logging and checkpoint periods are not settings a result depends on.
    config = micro_config()
    config.rl.log_every, config.sft.checkpoint_every = 5, 7
    assert list(run_lib.run(config, workdir)) == ["world", "vq", "sft", "pairs", "rl"]


def test_a_bad_vq_crop_size_is_refused_before_anything_is_written(tmp_path):
    config = micro_config()
    config.vq.crop_size = 18  # not a multiple of the VQ's 4x downsampling
    with pytest.raises(ValueError, match=r"vq\.crop_size 18: need a multiple of 4 in \(0, 32\]"):
        run_lib.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_main_rejects_a_bad_preset(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pairuni_jax.main", "--config=configs/shapes.py:nope",
         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "unknown preset 'nope'" in out.stderr


def test_rl_frozen_from_the_command_line_keeps_those_leaves_out_of_training():
    assert rl_config(smoke_config()).frozen == (r"^vqmodel/",)  # the default: the VQ only
    cfg = rl_config(load_config("shapes.py", "smoke", "--config.rl.frozen=('^vision_model/',)"))
    assert cfg.frozen == (r"^vqmodel/", r"^vision_model/")
    _, params = load_janus(os.path.join(micro_run()[0], "sft", "model"))
    mask = lora_lib.trainable_mask(params, cfg.trainable, cfg.frozen)
    assert not any(jax.tree.leaves(mask["vision_model"]) + jax.tree.leaves(mask["vqmodel"]))
    assert all(jax.tree.leaves(mask["aligner"]) + jax.tree.leaves(mask["language_model"]))


def test_sampled_accuracy_at_a_near_zero_temperature_is_the_greedy_accuracy():
    workdir, _ = micro_run()
    job = ShapesJob(micro_config(), workdir)
    model_dir = os.path.join(workdir, "sft", "model")
    model_config, params = load_janus(model_dir)
    proc = job.processor(model_dir)
    evaluator = job.evaluator(proc, model_config)
    evaluator.temperature = 1e-4
    for items in evaluator.splits:
        greedy = [a[0] for a in evaluator.answers_of(params, items)]
        sampled = evaluator.answers_of(params, items, 3, Sampling(temperature=1e-4))
        assert sampled == [[a] * 3 for a in greedy]
    metrics, _, _ = evaluator(params)
    for prefix in ("und", "und_test"):
        assert metrics[f"{prefix}/acc_sampled"] == metrics[f"{prefix}/acc_overall"]


def test_the_evaluator_reads_back_params_it_scored_before(tmp_path, monkeypatch):
    workdir, _ = micro_run()
    job = ShapesJob(micro_config(), workdir)
    model_dir = os.path.join(workdir, "sft", "model")
    model_config, params = load_janus(model_dir)
    evaluator = job.evaluator(job.processor(model_dir), model_config)
    evaluator.cache_dir = str(tmp_path)
    score = evaluator.split_metrics
    calls = []
    monkeypatch.setattr(evaluator, "split_metrics",
                        lambda p, items: calls.append(items.suffix) or score(p, items))
    metrics, images, captions = evaluator(params)
    assert calls == ["", "_test"] and len(os.listdir(tmp_path)) == 1
    again = evaluator(params, step=7)
    assert calls == ["", "_test"]  # read back, not scored
    assert again[0] == metrics and again[2] == captions
    np.testing.assert_array_equal(again[1], images)
    # Other params, or another setting, are another entry, scored afresh.
    kernel = params["lm_head"]["kernel"]
    evaluator(dict(params, lm_head={"kernel": kernel + 1e-3}))
    evaluator.temperature = 0.5
    evaluator(params)
    assert len(calls) == 6 and len(os.listdir(tmp_path)) == 3
    # A result scored by other scoring rules (the checker's, the answer reader's) is stale.
    rules = tmp_path / "rules.py"
    rules.write_text("MIN_FIT = 0.7")
    monkeypatch.setattr(evaluate, "_SCORING_SOURCES", (str(rules),))
    evaluator(params)
    evaluator(params)
    rules.write_text("MIN_FIT = 0.8")
    evaluator(params)
    assert len(calls) == 10 and len(list(tmp_path.glob("*.npz"))) == 5


def test_other_prompt_accuracy_tells_prompt_following_from_one_drawing(monkeypatch):
    """Ground-truth images meet their own prompts, not the next ones; one drawing for every
    prompt scores the same against either."""
    workdir, _ = micro_run()
    job = ShapesJob(micro_config(), workdir)
    model_dir = os.path.join(workdir, "sft", "model")
    model_config, params = load_janus(model_dir)
    evaluator = job.evaluator(job.processor(model_dir), model_config)
    items = evaluator.splits[0]
    records = read_jsonl(os.path.join(job.world_dir, "heldout_generation.jsonl"))
    truth = np.stack([_load_image(job.world_dir, r["image_path"])
                      for r in records[:len(items.prompts)]])
    monkeypatch.setattr(evaluator, "images_of", lambda p, it: truth)
    metrics, _ = evaluator.split_metrics(params, items)
    assert metrics["gen/acc_overall"] == 1.0 and metrics["gen/acc_other_prompt"] <= 0.5
    monkeypatch.setattr(evaluator, "images_of", lambda p, it: truth[[0] * len(truth)])
    metrics, _ = evaluator.split_metrics(params, items)
    assert metrics["gen/acc_other_prompt"] == metrics["gen/acc_overall"]


def test_heldout_understanding_is_split_into_questions_about_and_beside_held_out_pairs(
        monkeypatch):
    """asks_heldout / shows_heldout: accuracy on the held-out questions about a held-out
    combination and on the rest, whose image alone shows one."""
    workdir, _ = micro_run()
    config = micro_config()
    config.eval.num_understanding = config.world.heldout_size  # every held-out question
    job = ShapesJob(config, workdir)
    model_dir = os.path.join(workdir, "sft", "model")
    model_config, params = load_janus(model_dir)
    evaluator = job.evaluator(job.processor(model_dir), model_config)
    heldout, test = evaluator.splits
    flags = heldout.asks_heldout
    assert any(flags) and not all(flags) and not any(test.asks_heldout)
    # An answerer right exactly on the questions about a held-out combination.
    def answers_of(params, items, num_samples=1, sampling=None):
        return [[gold if about else ""] * num_samples
                for gold, about in zip(items.answers, items.asks_heldout, strict=True)]

    monkeypatch.setattr(evaluator, "answers_of", answers_of)
    monkeypatch.setattr(evaluator, "images_of",
                        lambda p, it: np.zeros((len(it.prompts), 32, 32, 3), np.uint8))
    metrics, _ = evaluator.split_metrics(params, heldout)
    assert metrics["und/acc_asks_heldout"] == 1.0 and metrics["und/acc_shows_heldout"] == 0.0
    assert metrics["und/acc_overall"] == pytest.approx(np.mean(flags))
    metrics, _ = evaluator.split_metrics(params, test)  # no question of it is about one
    assert not any("heldout" in k for k in metrics)


def test_smoke_end_to_end_raises_the_training_reward(tmp_path):
    """`:smoke` as it is, every stage: Pair-GRPO's second pass over its pairs earns more
    understanding reward than its first on the same questions, so the mean reward over both tasks
    rises. (Its 120-step VQ draws nothing the checker can read: the generation reward stays 0.)"""
    config = smoke_config()
    results = run_lib.run(config, str(tmp_path))
    assert list(results) == ["world", "vq", "sft", "pairs", "rl"]
    num_pairs = sum(results["pairs"]["by_pair_type"].values())
    per_pass = num_pairs // config.rl.pairs_per_batch  # steps that see every pair once
    records = read_jsonl(os.path.join(tmp_path, "rl", "metrics.jsonl"))
    train = sorted((r for r in records if "train/und/reward_mean" in r), key=lambda r: r["step"])
    assert len(train) == config.rl.steps >= 2 * per_pass
    und = np.array([r["train/und/reward_mean"] for r in train])  # [steps]
    gen = np.array([r["train/gen/reward_mean"] for r in train])
    first, second = slice(0, per_pass), slice(per_pass, 2 * per_pass)
    assert und[second].mean() > und[first].mean() + 0.02, (und[first].mean(), und[second].mean())
    both = (und + gen) / 2
    assert both[second].mean() > both[first].mean(), (both[first].mean(), both[second].mean())
    assert os.path.exists(os.path.join(tmp_path, "report.md"))
