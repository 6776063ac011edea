"""Pairing at scale: N generation x N understanding items of dimension D (100k x 100k x 1024).

Features are synthetic but structured like image embeddings: a mixture of unit-norm cluster
centres plus noise, with every generation item a perturbed copy of a known understanding item.
ours:      pairing.retrieve_pairs with the `auto` index (IVF at this size) + greedy matching, and
           k-means medoid selection over U ∪ G.
reference: exact blockwise brute force in numpy (matmul + argpartition, bounded memory), timed on
           a sample of queries and scaled to N (stated in the note); recall of ours against it.
Wall time and process CPU time (all threads) are both given: on a shared machine the wall time
understates the code, and CPU seconds / cores bounds the wall time on idle cores.
"""

from __future__ import annotations

import resource
import time

import faiss
import numpy as np

from pairuni_jax.bench.common import Record
from pairuni_jax.data import pairing


def add_args(parser) -> None:
    parser.add_argument("--n", type=int, default=100_000, help="items per side")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=1000, help="K for medoid selection")
    parser.add_argument("--ref-queries", type=int, default=2000, help="queries timed exactly")


def synthetic(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(und [n, d], gen [n, d], truth [n]): gen i is a noisy copy of und truth[i]; unit rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 50, 1), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    und = np.empty((n, d), np.float32)
    gen = np.empty((n, d), np.float32)
    truth = rng.permutation(n)
    for s in range(0, n, 10_000):  # build in blocks to bound temporary memory
        e = min(s + 10_000, n)
        c = centres[rng.integers(0, len(centres), e - s)]
        und[s:e] = c + 0.8 * rng.standard_normal((e - s, d), dtype=np.float32) / np.sqrt(d)
    und /= np.linalg.norm(und, axis=1, keepdims=True)
    for s in range(0, n, 10_000):
        e = min(s + 10_000, n)
        noise = rng.standard_normal((e - s, d), dtype=np.float32) / np.sqrt(d)
        gen[s:e] = und[truth[s:e]] + 0.3 * noise
    gen /= np.linalg.norm(gen, axis=1, keepdims=True)
    return und, gen, truth


def brute_force_top_n(queries, base, n, block: int = 1024):
    """Exact top-n by inner product, blockwise: memory O(block x N)."""
    ids = np.empty((len(queries), n), np.int64)
    sims = np.empty((len(queries), n), np.float32)
    for s in range(0, len(queries), block):
        scores = queries[s : s + block] @ base.T  # [b, N]
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        part = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-part, axis=1, kind="stable")
        ids[s : s + block] = np.take_along_axis(top, order, axis=1)
        sims[s : s + block] = np.take_along_axis(part, order, axis=1)
    return sims, ids


def run(args) -> list[Record]:
    t0 = time.perf_counter()
    und, gen, truth = synthetic(args.n, args.dim)
    print(f"synthetic {args.n} x {args.dim} x 2 in {time.perf_counter() - t0:.1f}s")
    threads = faiss.omp_get_max_threads()

    t0, c0 = time.perf_counter(), time.process_time()
    sims, ids = pairing.top_neighbours(gen, und, args.top_n, index_kind="auto")
    t_search, c_search = time.perf_counter() - t0, time.process_time() - c0
    print(f"search {t_search:.1f}s wall, {c_search:.1f}s cpu")
    t0 = time.perf_counter()
    matches = pairing.greedy_match(sims, ids, threshold=0.6)
    t_match = time.perf_counter() - t0
    correct = sum(int(truth[g] == u) for g, u, _ in matches)

    q = min(args.ref_queries, args.n)
    t0, c0 = time.perf_counter(), time.process_time()
    _, ref_ids = brute_force_top_n(gen[:q], und, args.top_n)
    t_ref = (time.perf_counter() - t0) * args.n / q
    c_ref = (time.process_time() - c0) * args.n / q
    recall1 = float((ids[:q, 0] == ref_ids[:, 0]).mean())
    recall_n = float(np.mean([len(set(a) & set(b)) / args.top_n
                              for a, b in zip(ids[:q], ref_ids, strict=True)]))

    records = [
        Record(f"retrieval top-{args.top_n}, {args.n}x{args.n}x{args.dim}", t_search, t_ref, "s",
               note=f"IVF index build+search vs numpy brute force (scaled from {q} queries); "
                    f"faiss threads {threads}"),
        Record("  same, CPU seconds (all threads)", c_search, c_ref, "cpu-s",
               note=f"/ {threads} cores = {c_search / threads:.0f} s on idle cores"),
        Record("greedy one-to-one matching", t_match, None, "s",
               note=f"{len(matches)} pairs, {correct} equal to the planted truth"),
        Record(f"recall@1 / recall@{args.top_n} vs exact", recall1, 1.0, "fraction",
               note=f"recall@{args.top_n} = {recall_n:.4f} on {q} queries"),
    ]
    if args.clusters > 0:
        t0, c0 = time.perf_counter(), time.process_time()
        chosen = pairing.kmeans_medoids(np.concatenate([und, gen]), args.clusters)
        records.append(Record(
            f"k-means medoids K={args.clusters} over {2 * args.n}", time.perf_counter() - t0,
            None, "s", note=f"{len(chosen)} medoids; {time.process_time() - c0:.0f} cpu-s"))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    inputs_gb = (und.nbytes + gen.nbytes) / 2**30
    records.append(Record("peak RSS", peak_gb, inputs_gb, "GiB",
                          note="reference column: the two feature matrices themselves"))
    return records
