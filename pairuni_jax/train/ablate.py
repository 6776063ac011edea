"""The paper's pairing and weighting ablations (PairUni Tables 5-6) on the Shapes world.

    python -m pairuni_jax.ablate --config=configs/shapes.py:smoke --workdir=DIR \
        [--variants=pair_sqrt,random_pairs] [--seeds=0,1,2]

The Shapes job's stages up to `pairs` run once (a finished workdir is reused); then every variant
trains Pair-GRPO from the SAME SFT policy, with the same evaluator, into
`DIR/ablations/<variant>` (or `.../<variant>/seed<k>` when seeds are given). Each run is a resumable
stage. The table (`ablation.md`, `ablation.csv`) and the plot (`ablation.png`) go in
`DIR/ablations/`.

Data variants are real PairUG files written next to the world's `train_pairs.jsonl` (so the
pipeline and `pairug validate` read them as any other): partners that were not matched by
retrieval are marked "retrieved" with their true feature similarity, never "aligned".
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from pairuni_jax.data import features as features_lib
from pairuni_jax.data import pairug
from pairuni_jax.train import report as report_lib
from pairuni_jax.train.rl import RLConfig
from pairuni_jax.train.run import use_compilation_cache
from pairuni_jax.train.shapes_job import ShapesJob, rl_config
from pairuni_jax.train.stages import Stage, load_result, run_stages

PREPARE_STAGES = ("world", "vq", "vision", "sft", "pairs")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ablation: which pairs it trains on, how pairs are weighted, which combiner and tasks."""

    name: str
    description: str
    data: str = "pairs"  # "pairs" (the pairing stage's file) | "random_pairs" | "unpaired"
    pair_weighting: str = "sqrt"  # grpo.pair_weights mode for retrieved pairs
    combiner: str = "sum"  # "sum" | "pareto"
    tasks: tuple[str, ...] = ("und", "gen")


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("und_only", "GRPO on understanding only (the pairs' questions)", tasks=("und",)),
    Variant("gen_only", "GRPO on generation only (the pairs' prompts)", tasks=("gen",)),
    Variant("unpaired", "both tasks, the two sides of each batch drawn independently, weight 1",
            data="unpaired", pair_weighting="none"),
    Variant("random_pairs", "random partners, weighted by their real similarity (sqrt)",
            data="random_pairs"),
    Variant("pair_none", "Pair-GRPO, retrieved pairs weigh 1", pair_weighting="none"),
    Variant("pair_linear", "Pair-GRPO, retrieved pairs weigh s", pair_weighting="linear"),
    Variant("pair_sqrt", "Pair-GRPO, retrieved pairs weigh sqrt(s) (the paper's)"),
    Variant("pair_pareto", "Pair-GRPO sqrt(s) + Pareto min-norm combiner", combiner="pareto"),
)}


# ---------------------------------------------------------------------------------------------
# Data variants


def _clip_similarity(x: float) -> float:
    return round(min(max(float(x), 0.0), 1.0), 6)  # as pairing.build_pairs writes it


def _pair(und: pairug.PairRecord, gen: pairug.PairRecord, similarity: float) -> pairug.PairRecord:
    return pairug.PairRecord(similarity=_clip_similarity(similarity), pair_type="retrieved",
                             generate_ann=gen.generate_ann, understand_ann=und.understand_ann)


def random_pairs(records: Sequence[pairug.PairRecord], und_features: np.ndarray,
                 gen_features: np.ndarray, seed: int) -> list[pairug.PairRecord]:
    """Every understanding side keeps its place; generation sides are a random permutation of the
    same records'. Similarity: the cosine of the new partners' features [N, D] (row-aligned with
    `records`, L2-normalised), clipped to [0, 1] like retrieved pairs."""
    perm = np.random.default_rng([seed, 1]).permutation(len(records))  # [N]
    sims = np.einsum("nd,nd->n", und_features, gen_features[perm])  # [N]
    return [_pair(records[i], records[j], s) for i, (j, s) in enumerate(zip(perm, sims,
                                                                          strict=True))]


def unpaired(records: Sequence[pairug.PairRecord], und_features: np.ndarray,
             gen_features: np.ndarray, seed: int) -> list[pairug.PairRecord]:
    """Both sides shuffled by two independent generators: which question meets which prompt in a
    batch is chance. Trained with pair weight 1 (`pair_weighting="none"`); the similarity written
    is still the partners' true one."""
    und_order = np.random.default_rng([seed, 2]).permutation(len(records))  # [N]
    gen_order = np.random.default_rng([seed, 3]).permutation(len(records))  # [N]
    sims = np.einsum("nd,nd->n", und_features[und_order], gen_features[gen_order])  # [N]
    return [_pair(records[u], records[g], s)
            for u, g, s in zip(und_order, gen_order, sims, strict=True)]


DATA_VARIANTS: dict[str, Callable] = {"random_pairs": random_pairs, "unpaired": unpaired}


def side_features(read: pairug.ReadResult, extractor: features_lib.FeatureExtractor,
                  cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(understanding, generation) image features [N, D] of a PairUG file's records."""

    def feats(paths):
        paths = [pairug.resolve_image_path(p, read.root) for p in paths]
        return features_lib.compute_features(paths, extractor, cache_dir=cache_dir)

    return (feats([r.understand_ann.image_path for r in read.records]),
            feats([r.generate_ann.image_path for r in read.records]))


# ---------------------------------------------------------------------------------------------
# Runs


def run_name(variant: str, seed: int | None) -> str:
    """The run's directory under the workdir: ablations/<variant>[/seed<k>]."""
    return os.path.join("ablations", variant) + ("" if seed is None else f"/seed{seed}")


def variant_rl_config(config: ml_collections.ConfigDict, variant: Variant, seed: int
                      ) -> RLConfig:
    """The `rl` section with the variant's weighting and combiner; its tasks; the run's seed."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.rl.pair_weighting = variant.pair_weighting
    config.rl.combiner.mode = variant.combiner
    return dataclasses.replace(rl_config(config, seed), tasks=variant.tasks)


class Ablation:
    """The Shapes job's preparation stages, then one Pair-GRPO run per (variant, seed)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 variants: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                 log: Callable[[str], None] = print):
        unknown = [v for v in variants or () if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        self.job = ShapesJob(config, workdir, log)
        self.config, self.workdir, self.log = config, self.job.workdir, log
        self.variants = [VARIANTS[v] for v in (variants or VARIANTS)]
        for variant in self.variants:  # fail before any training if a variant cannot run
            variant_rl_config(config, variant, config.seed)
        self.seeds: list[int | None] = list(seeds) if seeds else [None]
        self.out_dir = os.path.join(self.workdir, "ablations")

    def pairs_path(self, variant: Variant, seed: int) -> str:
        """The PairUG file a variant trains on; data variants are written on first use."""
        pairs = os.path.join(self.job.world_dir, "train_pairs.jsonl")
        if variant.data == "pairs":
            return pairs
        out = os.path.join(self.job.world_dir, f"ablation_{variant.data}_seed{seed}.jsonl")
        if not os.path.exists(out):
            read = pairug.read_pairug(pairs)
            extractor = features_lib.make_extractor(self.config.pairing.features)
            und_f, gen_f = side_features(read, extractor,
                                         os.path.join(self.workdir, "pairs", ".features"))
            records = DATA_VARIANTS[variant.data](read.records, und_f, gen_f, seed)
            pairug.write_pairug(out, records)
            self.log(f"ablation: wrote {len(records)} {variant.data} pairs to {out}")
        return out

    def stages(self) -> list[Stage]:
        """One resumable stage per (variant, seed), named by its directory."""
        stages = []
        for variant in self.variants:
            for seed in self.seeds:
                run_seed = self.config.seed if seed is None else seed

                def train(stage_dir, variant=variant, run_seed=run_seed):
                    cfg = variant_rl_config(self.config, variant, run_seed)
                    result = self.job.train_policy(stage_dir, cfg,
                                                   self.pairs_path(variant, run_seed),
                                                   save_model=False)
                    return {"variant": variant.name, "seed": run_seed, **result}

                inputs = {"variant": variant.name, "seed": run_seed,
                          "rl": self.config.rl.to_dict(), "reward": self.config.reward.to_dict(),
                          "eval": self.config.eval.to_dict()}
                stages.append(Stage(run_name(variant.name, seed), train, inputs))
        return stages

    def run(self) -> dict[str, str]:
        """Prepare, train every run that is not done, write the table and plot; their paths."""
        prepare = [s for s in self.job.stages() if s.name in PREPARE_STAGES]
        run_stages(self.workdir, prepare, self.log)
        run_stages(self.workdir, self.stages(), self.log)
        return write_outputs(self.workdir, self.variants, self.seeds, self.out_dir,
                             rl_steps=self.config.rl.steps)


def run_ablation(config: ml_collections.ConfigDict, workdir: str,
                 variants: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, str]:
    """Run (or resume) the ablation; returns {"markdown", "csv", "plot"} paths."""
    use_compilation_cache(config.get("compile_cache", ""))  # the job's RL programs, compiled
    return Ablation(config, workdir, variants, seeds, log).run()


# ---------------------------------------------------------------------------------------------
# Table and plot


def run_rows(workdir: str, variants: Sequence[Variant], seeds: Sequence[int | None]
             ) -> list[dict[str, Any]]:
    """One row per finished run: variant, seed, final eval/... and train/... scalars."""
    rows = []
    for variant in variants:
        for seed in seeds:
            result = load_result(workdir, run_name(variant.name, seed))
            if result is None:
                continue
            rows.append({"variant": variant.name, "seed": result["seed"],
                         "seconds": result.get("seconds"), **result["metrics"]})
    return rows


def _mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _cell(stat: tuple[float, float] | None, n: int) -> str:
    if stat is None:
        return "–"
    return f"{stat[0]:.3f} ± {stat[1]:.3f}" if n > 1 else f"{stat[0]:.3f}"


# (label, metric) of the accuracies compared: held-out (compositional) and test (in-distribution)
# splits; `sampled` is the expected accuracy of one answer at the RL temperature.
ACCURACY_COLUMNS = (("und", "eval/und/acc_overall"),
                    ("und sampled", "eval/und/acc_sampled"),
                    ("gen", "eval/gen/acc_overall"),
                    ("test und", "eval/und_test/acc_overall"),
                    ("test und sampled", "eval/und_test/acc_sampled"),
                    ("test gen", "eval/gen_test/acc_overall"))
TABLE_COLUMNS = ACCURACY_COLUMNS + (("final und reward", "train/und/reward_mean"),
                                    ("final gen reward", "train/gen/reward_mean"),
                                    ("pair weight mean", "train/pair_weight_mean"))


def markdown(rows: Sequence[dict], variants: Sequence[Variant], sft: dict[str, float]) -> str:
    """Mean ± sample std over seeds per variant; the SFT start as the first row."""
    header = ["variant", "what", "seeds"] + [c for c, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sft_cells = [_cell((sft[k], 0.0), 1) if k in sft else "–" for _, k in TABLE_COLUMNS]
    lines.append("| sft | the common start (no RL) | – | " + " | ".join(sft_cells) + " |")
    for v in variants:
        mine = [r for r in rows if r["variant"] == v.name]
        if not mine:
            continue
        cells = [_cell(_mean_std([r.get(k) for r in mine]), len(mine)) for _, k in TABLE_COLUMNS]
        lines.append(f"| {v.name} | {v.description} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gains(rows: Sequence[dict], variants: Sequence[Variant], sft: dict[str, float]) -> str:
    """Accuracy gained over the SFT start per variant and column: mean gain and the spread (sample
    std over seeds); the last column names the accuracies whose gain is positive and larger than
    its spread."""
    columns = [(label, key) for label, key in ACCURACY_COLUMNS if key in sft]
    header = ["variant", "seeds"] + [f"{label} gain (spread)" for label, _ in columns]
    lines = ["| " + " | ".join(header + ["gain > spread"]) + " |",
             "|" + "---|" * (len(header) + 1)]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v.name]
        if not mine or not columns:
            continue
        cells, cleared = [], []
        for label, key in columns:
            stat = _mean_std([r.get(key) for r in mine])
            if stat is None:
                cells.append("–")
                continue
            gain = stat[0] - sft[key]
            cells.append(f"{gain:+.3f} ({stat[1]:.3f})")
            if gain > 0 and gain > stat[1]:
                cleared.append(label)
        verdict = (", ".join(cleared) or "none") if len(mine) > 1 else "one seed"
        lines.append(f"| {v.name} | {len(mine)} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str) -> None:
    """Every run's final scalars, one row per (variant, seed)."""
    keys = ["variant", "seed", "seconds"]
    keys += sorted({k for r in rows for k in r} - set(keys))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in keys})


def plot(workdir: str, rows: Sequence[dict], variants: Sequence[Variant],
         seeds: Sequence[int | None], sft: dict[str, float], path: str) -> str:
    """Left: final held-out accuracy per variant (bars: mean, whiskers: std over seeds; dashed:
    SFT). Right: smoothed reward mean vs step per variant (mean over seeds), one panel a task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.name for v in variants if any(r["variant"] == v.name for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    x = np.arange(len(names))
    bars = [(label, key) for label, key in ACCURACY_COLUMNS if "sampled" not in label]
    width = 0.8 / len(bars)
    for i, (label, key) in enumerate(bars):
        stats = [_mean_std([r.get(key) for r in rows if r["variant"] == n]) for n in names]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, [s[0] if s else np.nan for s in stats],
               width, yerr=[s[1] if s else 0 for s in stats], capsize=3, color=f"C{i}",
               label=label.replace("und", "understanding").replace("gen", "generation"))
        if key in sft:
            ax.axhline(sft[key], color=f"C{i}", ls="--", lw=1)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (dashed: SFT)")
    ax.set_title("Final accuracy (held-out; test: in-distribution)")
    ax.legend()
    for ax, task in zip(axes[1:], report_lib.TASK_NAMES, strict=True):
        for i, name in enumerate(names):
            curves = []
            for seed in seeds:
                metrics = os.path.join(workdir, run_name(name, seed), "metrics.jsonl")
                if os.path.exists(metrics):
                    curves.append(report_lib.read_stage_log(metrics).series(f"{task}/reward_mean"))
            curves = [c for c in curves if len(c[0])]
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            mean = np.nanmean([c[1][:n] for c in curves], axis=0)
            ax.plot(curves[0][0][:n], report_lib.smooth(mean), color=f"C{i % 10}", label=name,
                    ls="-" if i < 10 else "--")
        ax.set_title(f"{report_lib.TASK_NAMES[task]} reward (smoothed)")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(workdir: str, variants: Sequence[Variant], seeds: Sequence[int | None],
                  out_dir: str, rl_steps: int | None = None) -> dict[str, str]:
    """ablation.md, ablation.csv and ablation.png under `out_dir` from the finished runs."""
    os.makedirs(out_dir, exist_ok=True)
    rows = run_rows(workdir, variants, seeds)
    sft_result = load_result(workdir, "sft") or {}
    sft = {k: v for k, v in sft_result.get("metrics", {}).items() if k.startswith("eval/")}
    paths = {"markdown": os.path.join(out_dir, "ablation.md"),
             "csv": os.path.join(out_dir, "ablation.csv"),
             "plot": os.path.join(out_dir, "ablation.png")}
    text = ["# Ablations on the Shapes world (PairUni Tables 5-6)", "",
            "Every run starts from the same SFT policy and is scored by the same evaluator on "
            "the held-out (compositional) split and the test (in-distribution, `test ...`) "
            "split; accuracies are overall (understanding: greedy multiple-choice accuracy, "
            "`sampled`: expected accuracy of one answer sampled at the RL temperature; "
            "generation: strict GenEval-style accuracy, mean over categories); rewards are the "
            "last step's means. With several seeds: mean ± sample std.", "",
            markdown(rows, variants, sft), "", "## Gain over the SFT start", "",
            gains(rows, variants, sft), "", "![ablation](ablation.png)", ""]
    if rl_steps is not None:
        text[2:2] = [f"Each run: {rl_steps} Pair-GRPO steps.", ""]
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(text))
    write_csv(rows, paths["csv"])
    plot(workdir, rows, variants, seeds, sft, paths["plot"])
    return paths


# ---------------------------------------------------------------------------------------------
# Config files (for the CLI and notebooks)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:preset]` -> the file's `get_config(preset)` (as `--config=` reads it)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    spec_ = importlib.util.spec_from_file_location("_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
