"""The pairug job (configs/pairug.py): the paper's settings in both presets, command-line overrides,
clear errors for missing weights and data, and two real Pair-GRPO steps end to end on a tiny
transformers Janus checkpoint with a tiny CLIP as the generation reward."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
from absl import flags
from command_line import load_config
from janus_tiny import hf_config
from PIL import Image
from tiny_tokenizer import save_tiny_tokenizer

from pairuni_jax.data import pairug
from pairuni_jax.processing import SPECIAL_TOKENS
from pairuni_jax.rl.grpo import GRPOConfig
from pairuni_jax.train import pairug_job, run


def load(arg: str = "", *overrides: str):
    """The config as `python -m pairuni_jax.main --config=configs/pairug.py:arg ...` builds it."""
    return load_config("pairug.py", arg, *overrides)


def test_presets_carry_the_papers_settings():
    for arg, hub_id, group in (("", "deepseek-ai/Janus-Pro-1B", 8),
                               ("1b", "deepseek-ai/Janus-Pro-1B", 8),
                               ("7b", "deepseek-ai/Janus-Pro-7B", 4)):
        c = load(arg)
        assert c.job == "pairug" and c.model.path == hub_id
        r = c.rl
        assert (r.group_size, r.guidance, r.temperature, r.learning_rate) == (group, 5.0, 1.0, 1e-6)
        assert (r.pairs_per_batch, r.beta, r.pair_weighting) == (16, 0.0, "sqrt")
        assert c.reward.generation == "hpsv2" and c.lora.rank == 0
    assert load("7b").rl.steps == 1200
    with pytest.raises(flags.IllegalFlagValueError, match="unknown preset .3b."):
        load("3b")


def test_command_line_overrides_reach_the_rl_config():
    c = load("7b", "--config.lora.rank=8", "--config.rl.combiner.mode=pareto",
             "--config.rl.learning_rate=3e-6", "--config.mesh.fsdp=2", "--config.mesh.data=-1")
    cfg = pairug_job.build_rl_config(c)
    assert cfg.update.group_size == 4 and cfg.learning_rate == 3e-6
    assert cfg.update.combiner.mode == "pareto" and cfg.update.lora.rank == 8
    assert cfg.frozen == (r"^vision_model/", r"^vqmodel/")
    assert (c.mesh.data, c.mesh.fsdp) == (-1, 2)
    assert pairug_job.build_rl_config(load()).update.lora is None  # rank 0: full fine-tuning
    grpo_cfg = pairug_job.build_rl_config(
        load("", "--config.rl.adv_eps=0.01", "--config.rl.std_ddof=0")).update.grpo
    assert (grpo_cfg.adv_eps, grpo_cfg.std_ddof) == (0.01, 0)
    assert pairug_job.build_rl_config(load()).update.grpo == GRPOConfig(
        eps_low=0.2, eps_high=0.2, beta=0.0, pair_weighting="sqrt", aggregation="task_sum")
    with pytest.raises(pairug_job.ConfigError, match=r"config\.rl\.group_size"):
        pairug_job.validate(load("", "--config.rl.group_size=1"))
    with pytest.raises(pairug_job.ConfigError, match=r"config\.rl.*pair_weighting"):
        pairug_job.build_rl_config(load("", "--config.rl.pair_weighting=cube"))
    with pytest.raises(pairug_job.ConfigError, match=r"config\.rl\.pairs_per_batch: 12 pairs .* 8"):
        pairug_job.make_mesh(load("", "--config.rl.pairs_per_batch=12"))  # 8 devices
    with pytest.raises(pairug_job.ConfigError, match=r"config\.mesh: .*needs 6 devices"):
        pairug_job.make_mesh(load("", "--config.mesh.fsdp=3", "--config.mesh.tensor=2"))
    assert dict(pairug_job.make_mesh(load()).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(pairug_job.ConfigError, match=r"config\.reward\.generation"):
        pairug_job.validate(load("", "--config.reward.generation=pickscore"))


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    import huggingface_hub

    missing = str(tmp_path / "nowhere")
    with pytest.raises(pairug_job.WeightsNotFound) as e:
        pairug_job.resolve_weights(missing)
    assert missing in str(e.value) and "hf download" in str(e.value)
    assert "configs/shapes.py" in str(e.value)
    with pytest.raises(pairug_job.WeightsNotFound, match="no config.json"):
        pairug_job.resolve_weights(str(tmp_path))
    with pytest.raises(pairug_job.WeightsNotFound, match="local disk.*tpu_vm.sh weights"):
        pairug_job.resolve_weights("gs://bucket/Janus-Pro-7B")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(pairug_job.WeightsNotFound) as e:
        pairug_job.resolve_weights("deepseek-ai/Janus-Pro-7B")
    message = str(e.value)
    assert "hf download deepseek-ai/Janus-Pro-7B" in message
    assert "configs/shapes.py" in message


def test_missing_data_and_reward_weights_say_how_to_build_them(tmp_path):
    c = load("", f"--config.data.path={tmp_path / 'pairs.jsonl'}")
    with pytest.raises(pairug_job.DataNotFound) as e:
        pairug_job.open_pairs(c.data)
    for text in ("config.data.path", "python -m pairuni_jax.data.pairing",
                 "pairug validate", "configs/shapes.py"):
        assert text in str(e.value)
    c.reward.hpsv2_checkpoint = str(tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(pairug_job.DataNotFound, match=r"config\.reward\.hpsv2_checkpoint.*xswu"):
        pairug_job.validate(c)
    c.reward.hpsv2_checkpoint = "gs://bucket/HPS_v2.1_compressed.pt"  # weights: local only
    with pytest.raises(pairug_job.DataNotFound, match=r"hpsv2_checkpoint=.*local disk"):
        pairug_job.validate(c)
    c.data.path = "ram://nowhere/pairs.jsonl"  # data may be in a bucket, but must be there
    with pytest.raises(pairug_job.DataNotFound, match="no PairUG data there"):
        pairug_job.open_pairs(c.data)


# -- end to end ----------------------------------------------------------------------------------

MERGES = ["#version: 0.2", "a t</w>", "r e", "re d</w>", "c i", "ci r"]


def tiny_janus_dir(torch, path) -> str:
    """A random transformers Janus (16 px images, 16 image tokens) with the tiny BPE tokenizer."""
    from transformers import JanusForConditionalGeneration

    tok = save_tiny_tokenizer(path)
    cfg = hf_config("gqa")
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.pad_token_id, cfg.text_config.bos_token_id = ids["pad"], ids["bos"]
    cfg.text_config.eos_token_id = ids["eos"]
    cfg.image_token_id = ids["image_placeholder"]
    torch.manual_seed(0)
    JanusForConditionalGeneration(cfg).save_pretrained(path)
    return str(path)


def tiny_clip_dir(torch, path) -> tuple[str, str]:
    """(transformers CLIP directory, open_clip-style merges file) of a tiny CLIP."""
    from test_clip import tiny_hf_model

    from pairuni_jax import clip_processing

    os.makedirs(path)
    bpe = os.path.join(path, "bpe.txt.gz")
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("\n".join(MERGES))
    tok = clip_processing.load_tokenizer(bpe)
    model = tiny_hf_model(torch, eos_token_id=tok.eos_token_id, vocab_size=len(tok.get_vocab()))
    model.save_pretrained(os.path.join(path, "model"))
    return os.path.join(path, "model"), bpe


def write_pairs(root, n: int, seed: int = 0) -> tuple[str, str]:
    """(PairUG JSONL of n pairs, understanding JSONL of n held-out questions) with PNG images."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "img")
    pairs, held_out = [], []
    colours = ["red", "blue", "green"]
    for i in range(n):
        rel = f"img/{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / rel)
        question = pairug.format_mc_question("What colour is the circle?", colours)
        und = pairug.UnderstandingAnn(rel, question, "ABC"[i % 3], f"colour{i % 2}")
        gen = pairug.GenerationAnn(rel, f"a {colours[i % 3]} circle", "object")
        pairs.append(pairug.PairRecord(0.8 if i % 2 else 1.0, "retrieved" if i % 2 else "aligned",
                                       gen, und))
        held_out.append(json.dumps({"image_path": rel, "question": question,
                                    "answer": und.answer, "tag": und.tag}))
    pairug.write_pairug(str(root / "pairs.jsonl"), pairs)
    (root / "heldout.jsonl").write_text("\n".join(held_out) + "\n")
    return str(root / "pairs.jsonl"), str(root / "heldout.jsonl")


def test_two_pair_grpo_steps_on_a_tiny_janus(torch, tmp_path):
    model_dir = tiny_janus_dir(torch, tmp_path / "janus")
    clip_dir, bpe = tiny_clip_dir(torch, tmp_path / "clip")
    pairs, heldout = write_pairs(tmp_path / "data", n=8)
    workdir = str(tmp_path / "run")
    c = load(
        "", f"--config.model.path={model_dir}", "--config.model.dtype=float32",
        "--config.model.compute_dtype=float32", f"--config.data.path={pairs}",
        "--config.data.bucket_multiple=16", "--config.reward.generation=clip",
        f"--config.reward.clip_path={clip_dir}", f"--config.reward.clip_tokenizer={bpe}",
        "--config.rl.steps=2", "--config.rl.pairs_per_batch=8", "--config.rl.group_size=2",
        "--config.rl.max_new_tokens=3", "--config.rl.checkpoint_every=1",
        f"--config.eval.understanding={heldout}", "--config.eval.batch_size=4",
    )
    summary = run.run(c, workdir)

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = sorted({r["step"] for r in rows if any(k.startswith("train/") for k in r)})
    assert steps == [1, 2]
    assert any("eval/und/acc_overall" in r for r in rows)
    assert np.isfinite(summary["train/gen/reward_mean"])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1].endswith("2")
    assert os.path.exists(os.path.join(workdir, "model", "config.json"))
    assert os.path.exists(os.path.join(workdir, "model", "tokenizer.json"))
