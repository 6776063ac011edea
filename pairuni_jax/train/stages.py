"""Resumable stages of a job: each stage keeps its result in `<workdir>/<name>/result.json`.

A finished stage (its result file exists) is skipped on a re-run; an unfinished one runs again and
resumes from whatever it checkpointed under its own directory. A stage's `inputs` (the config it
depends on) are written to `<workdir>/<name>/inputs.json` when it starts; a re-run whose inputs
differ stops with `StageInputsChanged` naming the fields, rather than keep or resume work done
under other settings. Fields named in `BOOKKEEPING` (logging and checkpoint periods), at any
depth, are left out: no result depends on them, so a re-run may change them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class Stage(NamedTuple):
    name: str
    fn: Callable[[str], dict[str, Any]]  # fn(stage_dir) -> JSON-serialisable result
    inputs: dict[str, Any] | None = None  # JSON-serialisable config the stage depends on


class StageInputsChanged(ValueError):
    """A stage already started or finished in this workdir under different settings."""


BOOKKEEPING = ("log_every", "checkpoint_every", "keep")  # config fields no result depends on


def _without_bookkeeping(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _without_bookkeeping(v) for k, v in tree.items() if k not in BOOKKEEPING}
    return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def settings_diff(before: Any, now: Any) -> list[str]:
    """"field: old -> new" for every field (dotted path) in which two JSON-able settings trees
    differ, bookkeeping fields left out; empty when they agree."""
    old = _flatten(_without_bookkeeping(json.loads(json.dumps(before))))  # tuples -> lists
    new = _flatten(_without_bookkeeping(json.loads(json.dumps(now))))
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_inputs(workdir: str, stage: Stage) -> None:
    """Record the stage's inputs, or raise if the recorded ones differ."""
    if stage.inputs is None:
        return
    path = os.path.join(workdir, stage.name, "inputs.json")
    now = _without_bookkeeping(json.loads(json.dumps(stage.inputs)))  # tuples -> lists
    if os.path.exists(path):
        with open(path) as f:
            diff = settings_diff(json.load(f), now)
        if diff:
            raise StageInputsChanged(
                f"{path}: stage {stage.name!r} was run with other settings ("
                + "; ".join(diff) + "). Use a new --workdir, or delete "
                f"{os.path.join(workdir, stage.name)} (and the stages after it) to redo it.")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(now, f, indent=1, sort_keys=True)


def result_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, name, "result.json")


def load_result(workdir: str, name: str) -> dict[str, Any] | None:
    """A finished stage's result, or None."""
    path = result_path(workdir, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_stages(workdir: str, stages: Sequence[Stage], log: Callable[[str], None] = print
               ) -> dict[str, dict[str, Any]]:
    """Run the unfinished stages in order; returns every stage's result by name."""
    results = {}
    for stage in stages:
        name, fn = stage.name, stage.fn
        check_inputs(workdir, stage)
        done = load_result(workdir, name)
        if done is not None:
            log(f"== {name}: done earlier, kept ({result_path(workdir, name)})")
            results[name] = done
            continue
        log(f"== {name}")
        stage_dir = os.path.join(workdir, name)
        os.makedirs(stage_dir, exist_ok=True)
        t0 = time.perf_counter()
        result = dict(fn(stage_dir))
        result["seconds"] = round(time.perf_counter() - t0, 1)
        tmp = result_path(workdir, name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, result_path(workdir, name))  # the result appears whole or not at all
        log(f"== {name}: done in {result['seconds']} s")
        results[name] = result
    return results
