"""Resumable stages of a job: each stage keeps its result in `<workdir>/<name>/result.json`.

A finished stage (its result file exists) is skipped on a re-run; an unfinished one runs again and
resumes from whatever it checkpointed under its own directory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

Stage = tuple[str, Callable[[str], dict[str, Any]]]  # (name, fn(stage_dir) -> JSON result)


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
    for name, fn in stages:
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
