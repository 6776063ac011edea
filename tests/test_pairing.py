"""Pair building: features + cache, medoid selection, retrieval with known neighbours, matching,
and the CLI end to end on generated images."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pairuni_jax.data import features, pairing, pairug


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _planted(n, d, noise, seed):
    """Understanding and generation vectors whose nearest neighbours are known (a permutation)."""
    rng = np.random.default_rng(seed)
    und = _unit(rng.normal(size=(n, d)))
    perm = rng.permutation(n)  # gen i is a noisy copy of und perm[i]
    gen = _unit(und[perm] + noise * rng.normal(size=(n, d)) / np.sqrt(d))
    return und, gen, perm


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_retrieval_finds_planted_neighbours(kind):
    und, gen, perm = _planted(3000, 64, noise=0.5, seed=0)
    sims, ids = pairing.top_neighbours(gen, und, 5, index_kind=kind, nlist=32, nprobe=32)
    assert (ids[:, 0] == perm).all()
    assert np.allclose(sims[:, 0], np.einsum("nd,nd->n", gen, und[perm]), atol=1e-5)
    matches = pairing.retrieve_pairs(gen, und, top_n=5, threshold=0.6, index_kind=kind,
                                     nlist=32, nprobe=32)
    assert sorted((g, u) for g, u, _ in matches) == [(i, int(perm[i])) for i in range(len(perm))]


def test_auto_index_choice():
    small = _unit(np.random.default_rng(0).normal(size=(10, 8)))
    assert isinstance(pairing.build_index(small), pairing.faiss.IndexFlatIP)
    assert pairing.EXACT_MAX_BASE < 100_000  # large sets go to IVF


def test_greedy_match_is_one_to_one_descending_and_thresholded():
    # gen 0 and gen 1 both want und 0; gen 1 is closer, so gen 0 falls back to und 1.
    sims = np.array([[0.9, 0.8], [0.95, 0.1], [0.59, 0.5]], np.float32)
    ids = np.array([[0, 1], [0, 2], [3, 4]])
    out = pairing.greedy_match(sims, ids, threshold=0.6)
    assert [(g, u) for g, u, _ in out] == [(1, 0), (0, 1)]
    assert [s for *_, s in out] == sorted([s for *_, s in out], reverse=True)
    # ties break by the lower generation index, then the lower understanding index
    tie = pairing.greedy_match(np.full((2, 2), 0.7, np.float32), np.array([[1, 0], [0, 1]]), 0.6)
    assert [(g, u) for g, u, _ in tie] == [(0, 0), (1, 1)]
    # missing neighbours (-1) are ignored
    assert pairing.greedy_match(np.array([[-np.inf]], np.float32), np.array([[-1]]), 0.0) == []


def test_kmeans_medoids_pick_the_member_nearest_each_centre():
    rng = np.random.default_rng(1)
    centres = _unit(rng.normal(size=(6, 32)) * 10)
    members = []
    for c in centres:  # one exact copy of the centre per cluster plus noisy members
        members.append(c)
        members.extend(_unit(c + 0.3 * rng.normal(size=(40, 32)) / np.sqrt(32)))
    x = np.stack(members).astype(np.float32)
    chosen = pairing.kmeans_medoids(x, 6, seed=0, nredo=5)
    assert sorted(chosen.tolist()) == [41 * i for i in range(6)]
    assert (pairing.kmeans_medoids(x, 6, seed=0, nredo=5) == chosen).all()  # deterministic
    assert len(pairing.kmeans_medoids(x[:5], 10)) == 5


def test_pixel_features_and_cache(tmp_path):
    colours = [(255, 0, 0), (0, 0, 255), (250, 10, 5)]
    paths = []
    for i, c in enumerate(colours):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((30, 50, 3), c, np.uint8)).save(p)
        paths.append(str(p))
    ex = features.pixel_extractor(grid=4, input_size=16, batch_size=2)
    cache = str(tmp_path / "cache")
    f = features.compute_features(paths, ex, cache_dir=cache)
    assert f.shape == (3, 48) and np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-5)
    assert f[0] @ f[2] > 0.99 and f[0] @ f[1] < 0.5
    # served from the cache: a different function would give different numbers
    fake = features.FeatureExtractor(ex.name, 16, lambda x: np.zeros((len(x), 48)), 2)
    assert np.array_equal(features.compute_features(paths, fake, cache_dir=cache), f)
    # a modified image (new mtime) is recomputed
    Image.fromarray(np.full((30, 50, 3), (0, 0, 250), np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(1, 10**18))
    g = features.compute_features(paths, ex, cache_dir=cache)
    assert g[0] @ f[1] > 0.99 and np.array_equal(g[1:], f[1:])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png: cannot load image"):
        features.compute_features([str(tmp_path / "bad.png")], ex)


def _colour_set(root, n, seed):
    """n random colour-block images; gen i is a slightly changed copy of und perm[i]."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    question = pairug.format_mc_question("Which block is red?", ["left", "right"])
    und, gen = [], []
    blocks = rng.integers(0, 256, size=(n, 4, 4, 3))
    for i in range(n):
        big = np.kron(blocks[i], np.ones((16, 16, 1))).astype(np.uint8)
        Image.fromarray(big).save(root / f"u{i}.png")
        und.append({"image_path": f"u{i}.png", "question": question, "answer": "A",
                    "tag": f"ut{i % 2}"})
    for i in range(n):
        src = np.kron(blocks[perm[i]], np.ones((16, 16, 1)))
        noisy = np.clip(src + rng.normal(0, 8, src.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy[:, 4:]).save(root / f"g{i}.png")  # different aspect ratio too
        gen.append({"image_path": f"g{i}.png", "prompt": f"image {i}", "tag": "gt"})
    (root / "und.jsonl").write_text("".join(json.dumps(r) + "\n" for r in und))
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    return perm


def test_cli_end_to_end(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    perm = _colour_set(data, 24, seed=3)
    aligned = pairug.PairRecord(
        1.0, "aligned",
        pairug.GenerationAnn("u0.png", "a prompt written for u0", "ut0"),
        pairug.UnderstandingAnn("u0.png", pairug.format_mc_question("q", ["x", "y"]), "B", "ut0"),
    )
    pairug.write_pairug(str(data / "aligned.jsonl"), [aligned])
    out = tmp_path / "out" / "pairs.jsonl"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "pairuni_jax.data.pairing",
           "--understanding", str(data / "und.jsonl"), "--generation", str(data / "gen.jsonl"),
           "--aligned", str(data / "aligned.jsonl"), "--features", "pixels",
           "--out", str(out), "--out-root", str(data), "--threshold", "0.5"]
    res = subprocess.run(cmd, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr
    read = pairug.read_pairug(str(out), root=str(data), check_images=True)
    recs = read.records
    assert recs[0] == aligned
    retrieved = [(r.generate_ann.image_path, r.understand_ann.image_path) for r in recs[1:]]
    # u0 is used by the aligned pair, so its generation partner is left without a match
    expected = {(f"g{i}.png", f"u{perm[i]}.png") for i in range(24) if perm[i] != 0}
    assert set(retrieved) == expected
    sims = [r.similarity for r in recs[1:]]
    assert sims == sorted(sims, reverse=True) and all(0.5 <= s <= 1 for s in sims)
    report = json.loads((tmp_path / "out" / "pairs.report.json").read_text())
    assert report["by_pair_type"] == {"aligned": 1, "retrieved": 23}
    assert sum(report["retrieved_similarity"]["histogram"]) == 23
    assert report["by_tag"]["aligned"] == {"ut0|ut0": 1}
    assert (tmp_path / "out" / "pairs.similarity.png").stat().st_size > 1000
    # paths outside the output root are refused with a message saying what to do
    res = subprocess.run(cmd[:-4] + ["--out-root", str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode != 0 and "--out-root" in res.stderr


def test_selection_keeps_medoids_only(tmp_path):
    perm = _colour_set(tmp_path, 12, seed=5)
    und = pairug.read_understanding_set(str(tmp_path / "und.jsonl"))
    gen = pairug.read_generation_set(str(tmp_path / "gen.jsonl"))
    ex = features.pixel_extractor(grid=4, input_size=16)
    fu = features.compute_features([str(tmp_path / r.image_path) for r in und.records], ex)
    fg = features.compute_features([str(tmp_path / r.image_path) for r in gen.records], ex)
    # a second question on an image already in the set is not a candidate: images are used once
    dup = pairug.UnderstandingAnn(und.records[0].image_path, und.records[0].question, "B", "dup")
    und.records.append(dup)
    fu = np.concatenate([fu, fu[:1]])
    cfg = pairing.PairingConfig(threshold=0.0, clusters=6)
    res = pairing.build_pairs(und, gen, fu, fg, out_root=str(tmp_path), config=cfg)
    inputs = res.report["inputs"]
    assert inputs["understanding_after_selection"] + inputs["generation_after_selection"] <= 6
    assert len(res.records) <= 3
    again = pairing.build_pairs(und, gen, fu, fg, out_root=str(tmp_path), config=cfg)
    assert again.records == res.records
    full = pairing.build_pairs(und, gen, fu, fg, out_root=str(tmp_path),
                               config=pairing.PairingConfig(threshold=0.0))
    assert {(r.generate_ann.image_path, r.understand_ann.image_path) for r in full.records} == {
        (f"g{i}.png", f"u{perm[i]}.png") for i in range(12)
    }
    assert all(r.understand_ann.tag != "dup" for r in full.records)
    assert full.report["inputs"]["understanding_repeated_images"] == 1


def test_janus_extractor_matches_the_transformers_vision_tower(torch, tmp_path):
    from janus_tiny import tiny_checkpoint

    ckpt = tiny_checkpoint("gqa")
    ex = features.make_extractor("janus", checkpoint=ckpt.path, batch_size=2)
    size = ex.input_size
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(30, 20), (16, 16), (9, 40)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    ours = features.compute_features(paths, ex)
    images = np.stack([features.letterbox_uint8(p, size) for p in paths])
    pixels = torch.from_numpy((images / 255.0 - 0.5) / 0.5).float().permute(0, 3, 1, 2)
    with torch.no_grad():
        tokens = ckpt.model.model.vision_model(pixel_values=pixels).last_hidden_state
    ref = torch.nn.functional.normalize(tokens.mean(1), dim=-1).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4)
