"""Pair building for PairUG: medoid selection, nearest-neighbour retrieval, one-to-one matching.

Steps (PairUni §3, REFERENCE.md §2):
  1. image features of every understanding (U) and generation (G) item (`features.py`, cached);
  2. selection (optional, K > 0): faiss spherical k-means over U ∪ G, keep each cluster's medoid
     (the member with the highest inner product with its centroid);
  3. retrieval: an inner-product faiss index over the U features (exact `Flat` for small sets,
     `IVF` for large ones, chosen by size), the top-n U neighbours of each G image;
  4. matching: candidate edges with similarity >= threshold (default 0.6), taken greedily in
     descending similarity (ties: lower G index, then lower U index), each item used once;
  5. aligned pairs from the augmentation output are added as they are.
Each image is used once: images of aligned pairs are not reused by retrieval, and when several
records share an image (e.g. several questions on one picture) only the first is a candidate.
Memory stays O((N_u + N_g) * (D + n)): queries run in blocks, never an N x N matrix.

CLI:
  python -m pairuni_jax.data.pairing --understanding U.jsonl --generation G.jsonl \\
      --out pairs.jsonl [--aligned aligned.jsonl] [--features pixels|janus] [--clusters K] ...
writes the PairUG file, `<out>.report.json` (counts by pair type and tag, similarity histogram)
and `<out>.similarity.png`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence

import faiss
import numpy as np

from pairuni_jax.data import features as features_lib
from pairuni_jax.data import pairug

EXACT_MAX_BASE = 20_000  # `auto` uses an exact index up to this many understanding items


# ---------------------------------------------------------------------------------------------
# Core algorithms on feature matrices (float32, rows L2-normalised)


def kmeans_medoids(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 20,
    nredo: int = 1,
    max_points_per_centroid: int = 64,
) -> np.ndarray:
    """Indices (sorted) of the medoids of a spherical k-means with `k` clusters over x [N, D].

    The medoid of a cluster is its member with the highest inner product with the centroid.
    Empty clusters contribute nothing, so at most k indices are returned; k >= N keeps all.
    nredo > 1 keeps the best of that many k-means runs (fewer bad local optima).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k >= n:
        return np.arange(n)
    km = faiss.Kmeans(
        d, k, niter=niter, nredo=nredo, seed=seed, spherical=True, verbose=False,
        max_points_per_centroid=max_points_per_centroid,
    )
    km.train(x)
    assign = _assign(x, km.centroids)  # [N]
    score = np.einsum("nd,nd->n", x, km.centroids[assign])  # [N]
    order = np.lexsort((np.arange(n), -score, assign))  # by cluster, best score first
    first = np.ones(n, bool)
    first[1:] = assign[order][1:] != assign[order][:-1]
    return np.sort(order[first])


def _assign(x: np.ndarray, centroids: np.ndarray, block: int = 16384) -> np.ndarray:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), block):
        out[s : s + block] = index.search(x[s : s + block], 1)[1][:, 0]
    return out


def build_index(
    base: np.ndarray, *, kind: str = "auto", nlist: int | None = None, nprobe: int | None = None
) -> faiss.Index:
    """Inner-product index over base [N, D]: `flat` (exact), `ivf` or `auto` (by size).

    IVF: nlist defaults to 4 sqrt(N) lists (k-means, 10 iterations on <= 64 points per list,
    with faiss's fixed seed, so the index is deterministic) and nprobe to max(16, nlist // 64).
    Fewer, larger lists cost more: a search is bound by reading the probed vectors from memory.
    """
    base = np.ascontiguousarray(base, dtype=np.float32)
    n, d = base.shape
    if kind == "auto":
        kind = "flat" if n <= EXACT_MAX_BASE else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, int(round(4 * math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = 64  # train on <= 64 * nlist points
        index.cp.niter = 10
        index.train(base)
        index.nprobe = min(nlist, nprobe or max(16, nlist // 64))
    else:
        raise ValueError(f"index kind must be auto, flat or ivf, got {kind!r}")
    index.add(base)
    return index


def top_neighbours(
    queries: np.ndarray,
    base: np.ndarray,
    n: int,
    *,
    index_kind: str = "auto",
    block: int = 8192,
    **index_kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-n inner-product neighbours in base of each query: (sims [Nq, n], ids [Nq, n]).

    Missing neighbours (fewer than n reachable) have id -1 and similarity -inf.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = min(n, len(base))
    sims = np.full((len(queries), n), -np.inf, np.float32)
    ids = np.full((len(queries), n), -1, np.int64)
    if n == 0 or len(queries) == 0:
        return sims, ids
    index = build_index(base, kind=index_kind, **index_kwargs)
    for s in range(0, len(queries), block):
        d, i = index.search(queries[s : s + block], n)
        sims[s : s + block], ids[s : s + block] = d, i
    sims[ids < 0] = -np.inf
    return sims, ids


def greedy_match(
    sims: np.ndarray, ids: np.ndarray, threshold: float
) -> list[tuple[int, int, float]]:
    """One-to-one matching from candidate lists: (query, base, similarity) in descending similarity.

    Edges below `threshold` are dropped; ties break by lower query index, then lower base index,
    so the result is deterministic.
    """
    q = np.repeat(np.arange(sims.shape[0]), sims.shape[1])
    b, s = ids.reshape(-1), sims.reshape(-1)
    keep = (b >= 0) & (s >= threshold)
    q, b, s = q[keep], b[keep], s[keep]
    order = np.lexsort((b, q, -s))
    used_q, used_b, out = set(), set(), []
    for qi, bi, si in zip(q[order].tolist(), b[order].tolist(), s[order].tolist(), strict=True):
        if qi not in used_q and bi not in used_b:
            used_q.add(qi)
            used_b.add(bi)
            out.append((qi, bi, si))
    return out


def retrieve_pairs(
    gen_features: np.ndarray,
    und_features: np.ndarray,
    *,
    top_n: int = 10,
    threshold: float = 0.6,
    index_kind: str = "auto",
    **index_kwargs,
) -> list[tuple[int, int, float]]:
    """Retrieved pairs (generation index, understanding index, similarity), best first."""
    sims, ids = top_neighbours(
        gen_features, und_features, top_n, index_kind=index_kind, **index_kwargs
    )
    return greedy_match(sims, ids, threshold)


# ---------------------------------------------------------------------------------------------
# Building a PairUG file from datasets


@dataclasses.dataclass
class PairingConfig:
    top_n: int = 10
    threshold: float = 0.6
    clusters: int = 0  # K for medoid selection over U ∪ G; 0 keeps every item
    seed: int = 0
    index_kind: str = "auto"
    nlist: int | None = None  # IVF lists (default 4 sqrt(N))
    nprobe: int | None = None  # IVF lists probed per query (default max(16, nlist // 64))


@dataclasses.dataclass
class PairingResult:
    records: list[pairug.PairRecord]
    report: dict


def build_pairs(
    und: pairug.ReadResult,
    gen: pairug.ReadResult,
    und_features: np.ndarray,
    gen_features: np.ndarray,
    *,
    out_root: str,
    config: PairingConfig = PairingConfig(),  # noqa: B008 - frozen defaults
    aligned: Sequence[pairug.ReadResult] = (),
) -> PairingResult:
    """PairUG records (aligned first, then retrieved by descending similarity) and a report.

    und/gen: the item sets as read by `pairug`; *_features: their L2-normalised features [N, D]
    row-aligned with the records. Image paths are rewritten relative to `out_root`.
    """
    und_abs = [os.path.realpath(os.path.join(und.root, r.image_path)) for r in und.records]
    gen_abs = [os.path.realpath(os.path.join(gen.root, r.image_path)) for r in gen.records]
    records: list[pairug.PairRecord] = []
    used_images: set[str] = set()
    for a in aligned:
        for r in a.records:
            g_full = os.path.realpath(os.path.join(a.root, r.generate_ann.image_path))
            u_full = os.path.realpath(os.path.join(a.root, r.understand_ann.image_path))
            used_images.update((g_full, u_full))
            rel_g = pairug.relative_image_path(g_full, out_root, a.path)
            rel_u = pairug.relative_image_path(u_full, out_root, a.path)
            records.append(dataclasses.replace(
                r,
                generate_ann=dataclasses.replace(r.generate_ann, image_path=rel_g),
                understand_ann=dataclasses.replace(r.understand_ann, image_path=rel_u),
            ))
    n_aligned = len(records)

    # each image is used once: only the first record of an image is a candidate, and images of
    # aligned pairs are not reused
    u_first, g_first = _first_of_each(und_abs), _first_of_each(gen_abs)
    u_keep = np.array([p not in used_images for p in und_abs], bool) & u_first
    g_keep = np.array([p not in used_images for p in gen_abs], bool) & g_first
    if config.clusters > 0:
        union = np.concatenate([und_features[u_keep], gen_features[g_keep]])
        chosen = kmeans_medoids(union, config.clusters, seed=config.seed)
        chosen_mask = np.zeros(len(union), bool)  # [N_u' + N_g']
        chosen_mask[chosen] = True
        n_u = int(u_keep.sum())
        u_keep[np.flatnonzero(u_keep)] = chosen_mask[:n_u]
        g_keep[np.flatnonzero(g_keep)] = chosen_mask[n_u:]
    u_idx, g_idx = np.flatnonzero(u_keep), np.flatnonzero(g_keep)
    matches = retrieve_pairs(
        gen_features[g_idx], und_features[u_idx],
        top_n=config.top_n, threshold=config.threshold, index_kind=config.index_kind,
        nlist=config.nlist, nprobe=config.nprobe,
    )
    for gi, ui, sim in matches:
        g, u = gen.records[g_idx[gi]], und.records[u_idx[ui]]
        records.append(pairug.PairRecord(
            similarity=round(min(max(sim, 0.0), 1.0), 6),
            pair_type="retrieved",
            generate_ann=dataclasses.replace(
                g, image_path=pairug.relative_image_path(gen_abs[g_idx[gi]], out_root, gen.path)
            ),
            understand_ann=dataclasses.replace(
                u, image_path=pairug.relative_image_path(und_abs[u_idx[ui]], out_root, und.path)
            ),
        ))
    report = make_report(records)
    report["inputs"] = {
        "understanding": len(und.records), "generation": len(gen.records),
        "aligned_in": n_aligned,
        "understanding_repeated_images": int((~u_first).sum()),
        "generation_repeated_images": int((~g_first).sum()),
        "understanding_after_selection": int(len(u_idx)),
        "generation_after_selection": int(len(g_idx)),
        "skipped_on_read": {
            "understanding": dict(und.skipped), "generation": dict(gen.skipped),
            "aligned": {a.path: dict(a.skipped) for a in aligned},
        },
    }
    report["config"] = dataclasses.asdict(config)
    return PairingResult(records, report)


def _first_of_each(paths: Sequence[str]) -> np.ndarray:
    """bool [N]: True where paths[i] appears for the first time."""
    seen: set[str] = set()
    out = np.zeros(len(paths), bool)
    for i, p in enumerate(paths):
        out[i] = p not in seen
        seen.add(p)
    return out


def make_report(records: Sequence[pairug.PairRecord], bins: int = 20) -> dict:
    """Counts by pair type and by (understanding tag, generation tag), similarity histogram."""
    sims = np.array([r.similarity for r in records if r.pair_type == "retrieved"], np.float64)
    hist, edges = np.histogram(sims, bins=bins, range=(0.0, 1.0))
    by_tag: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in records:
        by_tag[r.pair_type][f"{r.understand_ann.tag}|{r.generate_ann.tag}"] += 1
    return {
        "pairs": len(records),
        "by_pair_type": dict(collections.Counter(r.pair_type for r in records)),
        "by_tag": {k: dict(sorted(v.items())) for k, v in by_tag.items()},
        "retrieved_similarity": {
            "mean": float(sims.mean()) if len(sims) else None,
            "min": float(sims.min()) if len(sims) else None,
            "histogram": hist.tolist(),
            "bin_edges": edges.round(4).tolist(),
        },
    }


def plot_histogram(report: dict, path: str) -> None:
    """Save the retrieved-pair similarity histogram as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = report["retrieved_similarity"]
    edges = np.asarray(h["bin_edges"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], h["histogram"], width=np.diff(edges), align="edge", edgecolor="black")
    ax.set_xlabel("image cosine similarity (retrieved pairs)")
    ax.set_ylabel("pairs")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report["by_pair_type"].items()))
    ax.set_title(f"PairUG: {report['pairs']} pairs ({counts})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pairuni_jax.data.pairing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--understanding", required=True, help="understanding-set JSONL")
    p.add_argument("--generation", required=True, help="generation-set JSONL")
    p.add_argument("--aligned", action="append", default=[], help="aligned PairUG JSONL (repeat)")
    p.add_argument("--und-root", help="image root of --understanding (default: its directory)")
    p.add_argument("--gen-root", help="image root of --generation (default: its directory)")
    p.add_argument("--out", required=True, help="output PairUG JSONL")
    p.add_argument("--out-root", help="dataset root of the output (default: --out's directory)")
    p.add_argument("--features", default="janus", choices=sorted(features_lib.EXTRACTORS))
    p.add_argument("--checkpoint", help="Janus checkpoint for --features janus")
    p.add_argument("--cache-dir", help="feature cache directory (default: <out dir>/.features)")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--clusters", type=int, default=0, help="K for medoid selection (0: off)")
    p.add_argument("--index", default="auto", choices=["auto", "flat", "ivf"])
    p.add_argument("--nlist", type=int, help="IVF lists (default 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, help="IVF lists probed (default max(16, nlist // 64))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    a = p.parse_args(argv)

    out_dir = os.path.dirname(os.path.abspath(a.out))
    out_root = os.path.realpath(a.out_root or out_dir)
    read = dict(on_error=a.on_error)
    und = pairug.read_understanding_set(a.understanding, root=a.und_root, **read)
    gen = pairug.read_generation_set(a.generation, root=a.gen_root, **read)
    aligned = [pairug.read_pairug(path, **read) for path in a.aligned]
    for r in (und, gen, *aligned):
        print(r.summary())
    kwargs = {"checkpoint": a.checkpoint} if a.features == "janus" else {}
    if a.features == "janus" and not a.checkpoint:
        p.error("--features janus needs --checkpoint (or use --features pixels)")
    extractor = features_lib.make_extractor(a.features, **kwargs)
    cache = a.cache_dir or os.path.join(out_dir, ".features")

    def feats(rr):
        paths = [os.path.join(rr.root, x.image_path) for x in rr.records]
        return features_lib.compute_features(paths, extractor, cache_dir=cache)

    config = PairingConfig(a.top_n, a.threshold, a.clusters, a.seed, a.index, a.nlist, a.nprobe)
    result = build_pairs(
        und, gen, feats(und), feats(gen), out_root=out_root, config=config, aligned=aligned
    )
    pairug.write_pairug(a.out, result.records)
    stem = os.path.splitext(a.out)[0]
    with open(stem + ".report.json", "w") as f:
        json.dump(result.report, f, indent=1)
    plot_histogram(result.report, stem + ".similarity.png")
    print(f"wrote {len(result.records)} pairs to {a.out}: {result.report['by_pair_type']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
