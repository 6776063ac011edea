"""The final report of a job's workdir: `report.md` (tables) and PNG curves, from what it logged.

Inputs: each stage's `result.json` (stages.py) and the `metrics.jsonl` of the training stages
(metrics.py: one record per logged step, `train/...` scalars, and `eval/...` scalars at every
evaluation). Outputs, in the workdir:
  report.md          understanding and generation accuracy by category on each evaluation split at
                     every evaluation (after SFT and after RL among them), and a training summary
  rewards.png        RL reward mean per task vs step, raw and smoothed
  eval_accuracy.png  accuracies (overall and by category) vs step, per stage and evaluation set

A resumed stage appends to its metrics.jsonl, so a step can appear twice (the steps between the
last checkpoint and a preemption run again): the later record of a step wins.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from pairuni_jax.train.metrics import read_jsonl
from pairuni_jax.train.stages import load_result

TRAINING_STAGES = ("sft", "rl")
TASK_NAMES = {"und": "understanding", "gen": "generation"}
# Metric prefixes of the evaluation sets (evaluate.py), in report order.
EVAL_SETS = {"und": "understanding, held-out (compositional)",
             "gen": "generation, held-out (compositional)",
             "und_test": "understanding, test (in-distribution)",
             "gen_test": "generation, test (in-distribution)"}


@dataclasses.dataclass
class StageLog:
    """One training stage's metrics.jsonl, one record per step (later records of a step win)."""

    train: dict[int, dict[str, float]]  # step -> {"und/reward_mean": ..., ...} ("train/" dropped)
    evals: dict[int, dict[str, float]]  # step -> {"und/acc_overall": ..., ...} ("eval/" dropped)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a train scalar over the steps that logged it (None: NaN)."""
        steps = sorted(s for s, r in self.train.items() if key in r)
        values = [self.train[s][key] for s in steps]
        return np.array(steps, int), np.array([np.nan if v is None else v for v in values], float)


def read_stage_log(path: str | os.PathLike) -> StageLog:
    """Split a metrics.jsonl into train and eval records by step."""
    train: dict[int, dict[str, float]] = {}
    evals: dict[int, dict[str, float]] = {}
    for record in read_jsonl(path):
        step = int(record["step"])
        for prefix, table in (("train/", train), ("eval/", evals)):
            values = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
            if values:
                table.setdefault(step, {}).update(values)
    return StageLog(dict(sorted(train.items())), dict(sorted(evals.items())))


def smooth(values: Sequence[float], weight: float = 0.8) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); NaNs are carried over."""
    out, avg, norm = [], 0.0, 0.0
    for v in np.asarray(values, float):
        if math.isfinite(v):
            avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm if norm > 0 else np.nan)
    return np.array(out)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats to 3 decimals, missing values as '–'."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def eval_points(logs: Mapping[str, StageLog]) -> list[tuple[str, dict[str, float]]]:
    """(column label, eval metrics) at every evaluation, in training order."""
    points = []
    for stage, log in logs.items():
        steps = list(log.evals)
        for step in steps:
            label = f"{stage} {step}"
            if step == steps[-1] and len(steps) > 1:
                label = f"after {stage.upper()} ({step})"
            elif step == 0:
                label = f"{stage} start"
            points.append((label, log.evals[step]))
    return points


def accuracy_table(points: Sequence[tuple[str, dict[str, float]]], task: str) -> str:
    """Rows: overall then categories (and other scalars) of a task; columns: eval points."""
    keys = sorted({k for _, m in points for k in m if k.startswith(f"{task}/")},
                  key=lambda k: (_order(k), k))
    rows = [[_label(k)] + [m.get(k) for _, m in points] for k in keys]
    return markdown_table(["category"] + [label for label, _ in points], rows)


# Not categories: listed first, drawn in black.
SUMMARY_METRICS = ("overall", "sampled", "asks_heldout", "shows_heldout", "constraints",
                   "other_prompt")


def _label(key: str) -> str:
    return key.split("/", 1)[1].removeprefix("acc_")  # "gen/acc_colors" -> "colors"


def _order(key: str) -> int:
    """Summary accuracies first, then categories, then anything else the evaluator reported."""
    label = _label(key)
    if label in SUMMARY_METRICS:
        return SUMMARY_METRICS.index(label)
    return len(SUMMARY_METRICS) + (not key.split("/", 1)[1].startswith("acc_"))


def _last(log: StageLog, key: str) -> float | None:
    steps, values = log.series(key)
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else None


def summary_rows(workdir: str, stage_names: Sequence[str], logs: Mapping[str, StageLog]):
    rows = []
    for name in stage_names:
        result = load_result(workdir, name)
        log = logs.get(name)
        steps = max(log.train) if log is not None and log.train else None
        seconds = result.get("seconds") if result else None
        row = [name, "done" if result else "not finished", steps,
               None if seconds is None else f"{seconds:.1f}"]
        if log is not None and name == "rl":
            row += [_last(log, "und/reward_mean"), _last(log, "gen/reward_mean"),
                    sum(1 for r in log.train.values() if (r.get("skipped") or 0) > 0)]
        elif log is not None:
            row += [_last(log, "und/loss"), _last(log, "gen/loss"), None]
        else:
            row += [None, None, None]
        rows.append(row)
    return rows


def plot_rewards(log: StageLog, path: str, title: str = "Pair-GRPO rewards") -> str | None:
    """Reward mean per task vs step: raw (faint) and smoothed. None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {t: log.series(f"{t}/reward_mean") for t in TASK_NAMES}
    series = {t: s for t, s in series.items() if len(s[0])}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (task, (steps, values)) in enumerate(series.items()):
        color = f"C{i}"
        ax.plot(steps, values, color=color, alpha=0.3, lw=1)
        ax.plot(steps, smooth(values), color=color, lw=2, label=f"{TASK_NAMES[task]} (smoothed)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward mean")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_SUMMARY_STYLE = {"sampled": "--", "constraints": ":", "other_prompt": "-."}


def _eval_sets(logs: Mapping[str, StageLog]) -> list[str]:
    """The evaluation sets that some evaluation reported, in EVAL_SETS order."""
    keys = {k.split("/", 1)[0] for log in logs.values() for m in log.evals.values() for k in m}
    return [name for name in EVAL_SETS if name in keys]


def plot_evals(logs: Mapping[str, StageLog], path: str) -> str | None:
    """Accuracy vs step: one row per stage, a column per evaluation set; summaries in black,
    categories thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {k: v for k, v in logs.items() if v.evals}
    if not logs:
        return None
    sets = _eval_sets(logs)
    fig, axes = plt.subplots(len(logs), len(sets), figsize=(5 * len(sets), 3.2 * len(logs)),
                             squeeze=False)
    for row, (stage, log) in enumerate(logs.items()):
        steps = list(log.evals)
        for col, task in enumerate(sets):
            ax = axes[row, col]
            keys = sorted({k for m in log.evals.values() for k in m
                           if k.startswith(f"{task}/acc_")})
            for key in sorted(keys, key=lambda k: (_order(k), k)):
                values = [log.evals[s].get(key, np.nan) for s in steps]
                summary = _label(key) in SUMMARY_METRICS
                ax.plot(steps, values, marker="o", lw=2.5 if summary else 1,
                        color="k" if summary else None, alpha=1 if summary else 0.7,
                        ls=_SUMMARY_STYLE.get(_label(key), "-"), label=_label(key))
            ax.set_title(f"{stage.upper()}: {EVAL_SETS[task]}", fontsize=9)
            ax.set_xlabel(f"{stage.upper()} step")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if keys:
                ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(workdir: str, stage_names: Sequence[str] = ("world", "vq", "sft", "pairs", "rl"),
                 title: str = "Shapes job report") -> str:
    """Write report.md, rewards.png and eval_accuracy.png into `workdir`; returns report.md's path.

    Works on a partly finished workdir too (missing stages are reported as not finished).
    """
    logs = {}
    for stage in TRAINING_STAGES:
        path = os.path.join(workdir, stage, "metrics.jsonl")
        if stage in stage_names and os.path.exists(path):
            logs[stage] = read_stage_log(path)
    lines = [f"# {title}", "", f"Workdir: `{os.path.abspath(workdir)}`", ""]
    points = eval_points(logs)
    if points:
        lines += ["## Evaluation", "",
                  "Held-out (compositional): every item shows or names a combination training "
                  "never saw. Test (in-distribution): new scenes from the training distribution. "
                  "Understanding: greedy multiple-choice accuracy by question tag (`overall`: over "
                  "all questions; `sampled`: expected accuracy of one answer sampled at the RL "
                  "temperature; held-out `asks_heldout` / `shows_heldout`: the questions about a "
                  "held-out combination / whose image alone shows one). Generation: strict "
                  "GenEval-style accuracy by prompt category "
                  "(`overall`: mean over categories; `constraints`: mean fraction of a prompt's "
                  "constraints met; `other_prompt`: `overall` of the same images scored against "
                  "another prompt, near `overall` when the images ignore their prompts). Columns: "
                  "every evaluation, by stage and step.", ""]
        for task in _eval_sets(logs):
            lines += [f"### {EVAL_SETS[task].capitalize()}", "", accuracy_table(points, task), ""]
    total = sum((load_result(workdir, n) or {}).get("seconds", 0.0) for n in stage_names)
    lines += ["## Training summary", "",
              "Final values: RL rows give the last logged reward means, SFT rows the last losses.",
              "",
              markdown_table(["stage", "status", "steps", "seconds", "und reward / loss",
                              "gen reward / loss", "skipped updates"],
                             summary_rows(workdir, stage_names, logs)), "",
              f"Total time of the finished stages: {total:.1f} s ({total / 60:.1f} min).", ""]
    for name in stage_names:
        result = load_result(workdir, name) or {}
        if "by_pair_type" in result:
            pairs = ", ".join(f"{k} {v}" for k, v in result["by_pair_type"].items())
            lines += [f"Pairs: {pairs}.", ""]
        if "checker_accuracy_on_reconstructions" in result:
            acc = result["checker_accuracy_on_reconstructions"]
            lines += ["VQ: checker accuracy on held-out reconstructions: "
                      + ", ".join(f"{k} {_fmt(v)}" for k, v in acc.items()) + ".", ""]
    figures = []
    if "rl" in logs and plot_rewards(logs["rl"], os.path.join(workdir, "rewards.png")):
        figures.append(("RL reward mean per task", "rewards.png"))
    if plot_evals(logs, os.path.join(workdir, "eval_accuracy.png")):
        figures.append(("Evaluation accuracy", "eval_accuracy.png"))
    if figures:
        lines += ["## Curves", ""] + [f"![{alt}]({file})" for alt, file in figures] + [""]
    out = os.path.join(workdir, "report.md")
    with open(out + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(out + ".tmp", out)
    return out
