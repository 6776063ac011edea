"""Peak host memory of `load_janus` on a random 1B-shaped checkpoint (`python -m pairuni_jax.bench
load`).

Writes a randomly initialised Janus-Pro-1B-shaped checkpoint in transformers format (safetensors,
bf16 by default) to a temporary directory, loads it in a fresh subprocess and reports
(peak RSS - peak RSS before loading) / bytes of the loaded params (peak RSS = VmHWM, falling back
to getrusage's ru_maxrss where /proc is missing). Goal: <= 1.3 (streaming, one tensor
at a time). `--reference` also measures transformers' JanusForConditionalGeneration.from_pretrained
on the same files (needs torch), after reading every weight once (it memory-maps safetensors, so
untouched weights would not be resident yet).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import ml_dtypes
import numpy as np

from pairuni_jax.bench.common import Record
from pairuni_jax.checkpoints import hf_config_dict, hf_name, hf_shape, write_safetensors
from pairuni_jax.models import configs, janus

_PROBE = r"""
import json, resource, sys
def rss_kb():
    # Peak RSS of this process image. ru_maxrss would also count the parent's peak (Linux folds
    # the pre-exec high-water mark into it), so prefer the kernel's VmHWM of the new image.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
path, dtype, which = sys.argv[1], sys.argv[2], sys.argv[3]
if which == "ours":
    import jax
    import numpy as np
    from pairuni_jax.checkpoints import load_janus
    jax.block_until_ready(jax.numpy.ones(4) + 1)
    base = rss_kb()
    config, params = load_janus(path, dtype=dtype)
    jax.block_until_ready(params)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
else:
    import torch
    from transformers import JanusForConditionalGeneration
    torch.ones(4) + 1
    base = rss_kb()
    model = JanusForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
    with torch.no_grad():  # touch every weight: memory-mapped tensors count once they are read
        for p in model.parameters():
            p.float().sum()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"base_kb": base, "peak_kb": rss_kb(), "param_bytes": int(nbytes)}))
"""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=["1b", "tiny"], default="1b")
    parser.add_argument("--dtype", default="bfloat16", help="file and param dtype")
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--reference", action="store_true",
                        help="also measure transformers' from_pretrained (needs torch)")


def write_random_checkpoint(config: configs.JanusConfig, path: str, dtype: str,
                            seed: int = 0) -> int:
    """A random transformers-format checkpoint of `config`'s shapes; returns its byte size."""
    os.makedirs(path, exist_ok=True)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    shapes = janus.param_shapes(config)
    tensors = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path_ = tuple(k.key for k in p)
        tensors[hf_name(path_)] = (hf_shape(path_, leaf.shape), np_dtype)
    rng = np.random.default_rng(seed)

    def produce(name: str) -> np.ndarray:
        shape = tensors[name][0]
        x = rng.random(shape, dtype=np.float32)
        x -= 0.5
        x *= 0.05
        return x.astype(np_dtype)

    write_safetensors(os.path.join(path, "model.safetensors"), tensors, produce)
    cfg = hf_config_dict(config)
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return os.path.getsize(os.path.join(path, "model.safetensors"))


def _probe(path: str, dtype: str, which: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _PROBE, path, dtype, which], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load probe ({which}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> list[Record]:
    config = configs.janus_pro_1b() if args.size == "1b" else configs.tiny()
    directory = args.dir or tempfile.mkdtemp(prefix="janus_load_bench_")
    try:
        size = write_random_checkpoint(config, directory, args.dtype)
        ours = _probe(directory, args.dtype, "ours")
        ratio = (ours["peak_kb"] - ours["base_kb"]) * 1024 / ours["param_bytes"]
        note = f"{ours['param_bytes'] / 2**30:.2f} GiB params, file {size / 2**30:.2f} GiB"
        ref_ratio = None
        if args.reference:
            ref = _probe(directory, args.dtype, "reference")
            ref_ratio = (ref["peak_kb"] - ref["base_kb"]) * 1024 / ref["param_bytes"]
        return [Record("load peak RSS / param bytes", ratio, ref_ratio, "x", note=note
                       + ("; reference = transformers from_pretrained" if ref_ratio else ""))]
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
