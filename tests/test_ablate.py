"""Ablations: the data variants are what they claim, and a micro run of two variants writes the
table from the same SFT start."""

import csv
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from micro_job import REPO, copy_of_micro_run, micro_config

from pairuni_jax.data import pairug
from pairuni_jax.rl import grpo
from pairuni_jax.train import ablate
from pairuni_jax.train import report as report_lib
from pairuni_jax.train.rl import RLConfig


def _records(n):
    return [pairug.PairRecord(
        similarity=0.9, pair_type="aligned" if i % 2 else "retrieved",
        generate_ann=pairug.GenerationAnn(image_path=f"g{i}.png", prompt=f"prompt {i}"),
        understand_ann=pairug.UnderstandingAnn(image_path=f"u{i}.png", question=f"q {i}",
                                               answer="A"))
        for i in range(n)]


def _features(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # [N, D]


def _index(path):
    return int(path[1:].split(".")[0])


def test_random_pairs_permute_the_generation_sides_and_carry_their_true_similarity():
    n, records = 200, _records(200)
    und_f, gen_f = _features(n, 16, 0), _features(n, 16, 1)
    out = ablate.random_pairs(records, und_f, gen_f, seed=3)
    und = [_index(r.understand_ann.image_path) for r in out]
    gen = [_index(r.generate_ann.image_path) for r in out]
    assert und == list(range(n))  # understanding sides keep their order
    assert sorted(gen) == list(range(n)) and np.sum(np.equal(und, gen)) <= 5
    for r, u, g in zip(out, und, gen, strict=True):
        assert r.pair_type == "retrieved"  # never passed off as aligned
        assert r.similarity == pytest.approx(float(np.clip(und_f[u] @ gen_f[g], 0, 1)), abs=1e-6)
        assert r.generate_ann == records[g].generate_ann
    assert [_index(r.generate_ann.image_path) for r in
            ablate.random_pairs(records, und_f, gen_f, seed=3)] == gen  # seeded
    assert [_index(r.generate_ann.image_path) for r in
            ablate.random_pairs(records, und_f, gen_f, seed=4)] != gen


def test_unpaired_sides_are_drawn_independently():
    n, records = 200, _records(200)
    und_f, gen_f = _features(n, 16, 0), _features(n, 16, 1)
    out = ablate.unpaired(records, und_f, gen_f, seed=0)
    und = [_index(r.understand_ann.image_path) for r in out]
    gen = [_index(r.generate_ann.image_path) for r in out]
    assert sorted(und) == sorted(gen) == list(range(n))  # every item once on each side
    assert und != list(range(n)) and gen != list(range(n))
    assert np.sum(np.equal(und, gen)) <= 5  # former partners meet only by chance
    # each side's order is its own generator's: changing the other side's data changes nothing
    other = ablate.unpaired(_records(n)[::-1], und_f, gen_f[::-1], seed=0)
    assert [r.understand_ann.image_path for r in other] == [
        f"u{n - 1 - i}.png" for i in und]
    assert all(r.pair_type == "retrieved" for r in out)
    sims = np.array([r.similarity for r in out])
    np.testing.assert_allclose(sims, np.clip(np.einsum("nd,nd->n", und_f[und], gen_f[gen]),
                                             0, 1), atol=1e-6)


@pytest.mark.parametrize("name, weighting, combiner, tasks", [
    ("pair_none", "none", "sum", ("und", "gen")),
    ("pair_linear", "linear", "sum", ("und", "gen")),
    ("pair_sqrt", "sqrt", "sum", ("und", "gen")),
    ("pair_pareto", "sqrt", "pareto", ("und", "gen")),
    ("unpaired", "none", "sum", ("und", "gen")),
    ("random_pairs", "sqrt", "sum", ("und", "gen")),
    ("und_only", "sqrt", "sum", ("und",)),
    ("gen_only", "sqrt", "sum", ("gen",)),
])
def test_variant_configs(name, weighting, combiner, tasks):
    variant = ablate.VARIANTS[name]
    if tasks != ("und", "gen") and "tasks" not in {f.name for f in dataclasses.fields(RLConfig)}:
        with pytest.raises(ValueError, match="needs RLConfig.tasks"):
            ablate.variant_rl_config(micro_config(), variant, seed=5)
        return
    cfg = ablate.variant_rl_config(micro_config(), variant, seed=5)
    assert cfg.update.grpo.pair_weighting == weighting
    assert cfg.update.combiner.mode == combiner
    assert cfg.seed == 5 and cfg.steps == micro_config().rl.steps
    assert getattr(cfg, "tasks", ("und", "gen")) == tasks


def test_pair_weights_of_the_variants():
    sim = np.array([0.25, 0.64, 0.81], np.float32)
    aligned = np.array([False, False, True])
    for mode, expected in [("none", [1, 1, 1]), ("linear", [0.25, 0.64, 1]),
                           ("sqrt", [0.5, 0.8, 1])]:
        np.testing.assert_allclose(grpo.pair_weights(sim, aligned, mode), expected, rtol=1e-6)


def test_gain_over_sft_is_judged_against_the_spread_over_seeds():
    sft = {"eval/und/acc_overall": 0.40, "eval/gen/acc_overall": 0.10}
    rows = [{"variant": "pair_sqrt", "eval/und/acc_overall": u, "eval/gen/acc_overall": g}
            for u, g in ((0.50, 0.20), (0.52, 0.22), (0.48, 0.18))]  # gains 0.1, std 0.02
    rows += [{"variant": "unpaired", "eval/und/acc_overall": u, "eval/gen/acc_overall": 0.30}
             for u in (0.30, 0.60)]  # und gain +0.05 < spread 0.21
    rows += [{"variant": "gen_only", "eval/und/acc_overall": 0.7, "eval/gen/acc_overall": 0.3}]
    table = ablate.gains(rows, [ablate.VARIANTS[n] for n in ("pair_sqrt", "unpaired",
                                                              "gen_only", "und_only")], sft)
    assert table.splitlines()[0] == ("| variant | seeds | und gain (spread) | gen gain (spread) "
                                     "| gain > spread |")  # columns the SFT start has
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert lines["pair_sqrt"] == "| pair_sqrt | 3 | +0.100 (0.020) | +0.100 (0.020) | und, gen |"
    assert lines["unpaired"].endswith("| +0.050 (0.212) | +0.200 (0.000) | gen |")
    assert lines["gen_only"].endswith("| one seed |")
    assert "und_only" not in lines  # no finished runs


@pytest.mark.slow
def test_a_micro_ablation_writes_one_table_from_one_sft_start(tmp_path):
    workdir = copy_of_micro_run(str(tmp_path / "run"))
    lines = []
    paths = ablate.run_ablation(micro_config(), workdir, ["pair_sqrt", "random_pairs"],
                                log=lines.append)
    assert "== world: done earlier, kept" in "\n".join(lines)  # the job's stages are reused

    # the random pairs file is a real PairUG file the real pipeline reads
    data = os.path.join(workdir, "world", "ablation_random_pairs_seed0.jsonl")
    read = pairug.read_pairug(data, check_images=True)
    base = pairug.read_pairug(os.path.join(workdir, "world", "train_pairs.jsonl"))
    assert [r.understand_ann for r in read.records] == [r.understand_ann for r in base.records]
    assert sorted(r.generate_ann.image_path for r in read.records) == sorted(
        r.generate_ann.image_path for r in base.records)
    assert {r.pair_type for r in read.records} == {"retrieved"}

    # both runs start from the same SFT policy and are scored by the same evaluator
    logs = {v: report_lib.read_stage_log(os.path.join(workdir, "ablations", v, "metrics.jsonl"))
            for v in ("pair_sqrt", "random_pairs")}
    assert logs["pair_sqrt"].evals[0] == logs["random_pairs"].evals[0]
    for log in logs.values():
        assert sorted(log.train) == [1, 2]

    table = open(paths["markdown"]).read()
    for row in ("| sft |", "| pair_sqrt |", "| random_pairs |"):
        assert row in table
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["pair_sqrt", "random_pairs"]
    final = logs["pair_sqrt"].evals[2]["und/acc_overall"]
    assert float(rows[0]["eval/und/acc_overall"]) == pytest.approx(final)
    assert os.path.getsize(paths["plot"]) > 10_000

    with pytest.raises(ValueError, match="unknown variants"):
        ablate.run_ablation(micro_config(), workdir, ["pair_cube"])


def test_the_command_names_an_unknown_variant(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pairuni_jax.ablate", "--config=configs/shapes.py:smoke",
         f"--workdir={tmp_path}", "--variants=pair_sqrt,pair_cube"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "unknown variants ['pair_cube']" in out.stderr
    assert not os.path.exists(tmp_path / "world")  # nothing ran
