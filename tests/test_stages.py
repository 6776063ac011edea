"""Resumable stages: finished stages are kept; changed settings stop the run with the fields."""

import json
import os

import pytest

from pairuni_jax.train.stages import Stage, StageInputsChanged, run_stages


def counting_stage(name, calls, inputs):
    def fn(stage_dir):
        calls.append(name)
        return {"dir": os.path.basename(stage_dir)}

    return Stage(name, fn, inputs)


def test_finished_stages_are_kept_and_inputs_recorded(tmp_path):
    calls = []
    stages = [counting_stage("a", calls, {"seed": 0, "a": {"steps": 3}}),
              counting_stage("b", calls, None)]
    first = run_stages(str(tmp_path), stages, log=lambda _: None)
    again = run_stages(str(tmp_path), stages, log=lambda _: None)
    assert calls == ["a", "b"]
    assert first["a"]["dir"] == "a" and again["a"] == first["a"]
    with open(tmp_path / "a" / "inputs.json") as f:
        assert json.load(f) == {"seed": 0, "a": {"steps": 3}}
    assert not (tmp_path / "b" / "inputs.json").exists()


@pytest.mark.parametrize("finished", [True, False])
def test_changed_inputs_name_the_fields_and_touch_nothing(tmp_path, finished):
    calls = []
    inputs = {"seed": 0, "vq": {"steps": 2000, "lr": 5e-3}, "groups": (1, 2)}
    if finished:
        run_stages(str(tmp_path), [counting_stage("vq", calls, inputs)], log=lambda _: None)
    else:  # started, interrupted: inputs recorded, no result
        os.makedirs(tmp_path / "vq")
        with open(tmp_path / "vq" / "inputs.json", "w") as f:
            json.dump(json.loads(json.dumps(inputs)), f)
    before = sorted(os.listdir(tmp_path / "vq"))
    changed = dict(inputs, vq={"steps": 1500, "lr": 5e-3, "batch": 8})
    with pytest.raises(StageInputsChanged) as err:
        run_stages(str(tmp_path), [counting_stage("vq", calls, changed)], log=lambda _: None)
    msg = str(err.value)
    assert "inputs.json" in msg and "'vq'" in msg
    assert "vq.steps: 2000 -> 1500" in msg and "vq.batch: '<unset>' -> 8" in msg
    assert "vq.lr" not in msg and "seed" not in msg
    assert sorted(os.listdir(tmp_path / "vq")) == before
    assert calls == (["vq"] if finished else [])
    # The same inputs (tuples read back as lists) run or keep the stage as before.
    run_stages(str(tmp_path), [counting_stage("vq", calls, inputs)], log=lambda _: None)
    assert calls == ["vq"]


def test_logging_and_checkpoint_periods_may_change(tmp_path):
    calls = []
    inputs = {"seed": 0, "rl": {"steps": 4, "log_every": 1, "checkpoint_every": 2, "keep": 3}}
    run_stages(str(tmp_path), [counting_stage("rl", calls, inputs)], log=lambda _: None)
    with open(tmp_path / "rl" / "inputs.json") as f:
        assert json.load(f) == {"seed": 0, "rl": {"steps": 4}}
    periods = {"seed": 0, "rl": {"steps": 4, "log_every": 5, "checkpoint_every": 7}}
    run_stages(str(tmp_path), [counting_stage("rl", calls, periods)], log=lambda _: None)
    assert calls == ["rl"]  # kept, not an error
    with pytest.raises(StageInputsChanged, match=r"rl\.steps: 4 -> 8"):
        run_stages(str(tmp_path), [counting_stage("rl", calls, {"seed": 0, "rl": {"steps": 8}})],
                   log=lambda _: None)
