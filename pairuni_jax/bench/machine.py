"""Measured limits of this machine: matmul FLOP/s and memory read bandwidth (fp32, jitted).

`python -m pairuni_jax.bench machine` prints them; other benchmarks call `measure()` to put their
figures on a roofline measured in the same run. Bandwidth is the best of a few ways to stream a
buffer much larger than the last-level cache (a reduction, and a matrix-vector product, which is
what a batch-1 decode step does), so "fraction of bandwidth" is against what XLA can reach here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pairuni_jax.bench.common import Record, time_fn


@dataclasses.dataclass(frozen=True)
class Machine:
    matmul_flops: float  # FLOP/s of a large fp32 matmul
    read_bandwidth: float  # bytes/s streamed from memory


def _best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    return min(time_fn(lambda: jax.block_until_ready(fn(*args)), repeats=1, warmup=0)
               for _ in range(repeats))


@functools.cache
def measure(size_mb: int = 512, matmul_n: int = 2048, repeats: int = 7) -> Machine:
    """Measure once per process (cached): peak matmul FLOP/s and memory read bandwidth."""
    a = jnp.ones((matmul_n, matmul_n), jnp.float32)
    t = _best_time(jax.jit(lambda x: x @ x), a, repeats=repeats)
    flops = 2 * matmul_n**3 / t

    cols = 4096
    rows = size_mb * 2**20 // (4 * cols)
    big = jnp.ones((rows, cols), jnp.float32)
    vec = jnp.ones((rows,), jnp.float32)
    t_sum = _best_time(jax.jit(jnp.sum), big, repeats=repeats)
    t_gemv = _best_time(jax.jit(lambda v, m: v @ m), vec, big, repeats=repeats)
    bandwidth = big.nbytes / min(t_sum, t_gemv)
    return Machine(matmul_flops=flops, read_bandwidth=bandwidth)


def add_args(parser) -> None:
    parser.add_argument("--size-mb", type=int, default=512, help="streamed buffer size")


def run(args) -> list[Record]:
    m = measure(size_mb=args.size_mb)
    return [
        Record("fp32 matmul peak", m.matmul_flops / 1e9, None, "GFLOP/s"),
        Record("memory read bandwidth", m.read_bandwidth / 1e9, None, "GB/s"),
    ]
