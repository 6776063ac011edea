"""The final report: tables and curves from a real micro run's logs, and from a written log."""

import json
import os

import numpy as np
import pytest
from micro_job import micro_run
from PIL import Image

from pairuni_jax.train import report
from pairuni_jax.train.metrics import MetricsWriter


def test_report_of_the_micro_run_shows_every_eval_point_and_the_training_summary():
    workdir, results = micro_run()
    path = report.write_report(workdir)
    text = open(path).read()
    rl = report.read_stage_log(os.path.join(workdir, "rl", "metrics.jsonl"))
    sft = report.read_stage_log(os.path.join(workdir, "sft", "metrics.jsonl"))
    # columns: every evaluation of both stages, the last of each named "after ..."
    header = next(line for line in text.splitlines() if line.startswith("| category"))
    assert header.split(" | ")[1:] == ["sft start", "after SFT (3)", "rl start",
                                       "after RL (2) |"]
    # a table per evaluation set: both tasks on the held-out and the test split
    for name in report.EVAL_SETS.values():
        assert f"### {name.capitalize()}" in text
    # rows: overall first, then each category the evaluator reported, with its values
    for task in report.EVAL_SETS:
        cats = sorted(k.split("/acc_")[1] for k in rl.evals[2] if k.startswith(f"{task}/acc_"))
        assert cats, task
        assert ("sampled" in cats) == task.startswith("und")
        for cat in cats:
            values = [sft.evals[0], sft.evals[3], rl.evals[0], rl.evals[2]]
            row = f"| {cat} | " + " | ".join(f"{m[f'{task}/acc_{cat}']:.3f}" for m in values)
            assert row in text, row
    # summary: steps, seconds and the final RL rewards
    final_und = rl.train[2]["und/reward_mean"]
    rl_row = next(line for line in text.splitlines() if line.startswith("| rl |"))
    assert rl_row.startswith(f"| rl | done | 2 | {results['rl']['seconds']:.1f} | "
                             f"{final_und:.3f} |")
    for png in ("rewards.png", "eval_accuracy.png"):
        assert f"]({png})" in text
        with Image.open(os.path.join(workdir, png)) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_a_resumed_log_keeps_the_later_record_of_a_step(tmp_path):
    stage = tmp_path / "rl"
    writer = MetricsWriter(stage)
    writer.scalars(0, {"und/acc_overall": 0.25, "gen/acc_overall": 0.5}, prefix="eval/")
    for step, r in [(1, 0.1), (2, 0.2), (3, float("nan")), (2, 0.4), (3, 0.6), (4, 0.8)]:
        writer.scalars(step, {"und/reward_mean": r, "gen/reward_mean": 1 - r}, prefix="train/")
    writer.scalars(4, {"und/acc_overall": 0.75, "gen/acc_overall": 1.0}, prefix="eval/")
    writer.close()
    log = report.read_stage_log(stage / "metrics.jsonl")
    steps, values = log.series("und/reward_mean")
    assert steps.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(values, [0.1, 0.4, 0.6, 0.8])  # the rerun's steps 2, 3 win
    assert log.evals == {0: {"und/acc_overall": 0.25, "gen/acc_overall": 0.5},
                         4: {"und/acc_overall": 0.75, "gen/acc_overall": 1.0}}

    (tmp_path / "rl" / "result.json").write_text(json.dumps({"seconds": 12.5}))
    text = open(report.write_report(str(tmp_path))).read()
    assert "| world | not finished | – | – |" in text  # a partial workdir is reported as such
    assert "| rl | done | 4 | 12.5 | 0.800 | 0.200 | 0 |" in text
    assert "Total time of the finished stages: 12.5 s (0.2 min)." in text
    assert "| overall | 0.250 | 0.750 |" in text and "after RL (4)" in text
    assert os.path.exists(tmp_path / "rewards.png")


def test_smoothing_is_a_debiased_moving_average():
    np.testing.assert_allclose(report.smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])
    out = report.smooth([0.0, 1.0, float("nan"), 1.0], weight=0.5)
    np.testing.assert_allclose(out, [0.0, 2 / 3, 2 / 3, 6 / 7])
    assert report.smooth([]).shape == (0,)


@pytest.mark.parametrize("values, expected", [([0.5, None], "| a | 0.500 | – |")])
def test_markdown_table_formats_missing_values(values, expected):
    assert expected in report.markdown_table(["k", "x", "y"], [["a"] + values])
