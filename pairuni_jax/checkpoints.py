"""Load Janus-Pro checkpoints (transformers or original DeepSeek format) into JAX params; save back.

`load_janus(path_or_hub_id, dtype=...)` reads config.json (either format, see models/configs.py),
checks every tensor's name, shape and dtype against the model before reading any data (one error
listing every problem), then streams tensors one at a time: read, cast, change layout, put on the
device, drop. Safetensors are read with positioned file reads (not a whole-file memory map, whose
touched pages would stay resident), so peak host memory stays near the size of the final params.

Names: our param paths mirror transformers' tensor names (see models/janus.py); the original
names are first rewritten to transformers' names (the mapping of transformers'
`convert_janus_weights_to_hf.py`: fused `attn.qkv` split in three, `pos_embed` squeezed,
`attn_pool.*` and `quantize.codebook_used` dropped). Layouts: Linear [out, in] -> kernel [in, out];
Conv OIHW -> HWIO.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pairuni_jax.models import janus
from pairuni_jax.models.configs import JanusConfig, from_hf_config

Params = dict[str, Any]
Path = tuple[str, ...]

# ----------------------------------------------------------------------------- names and layouts

_INDEXED = {"layers", "hidden_layers", "down", "up", "block", "attn"}


def hf_name(path: Path) -> str:
    """Our param path -> transformers tensor name, e.g.
    ('language_model', 'layers_3', 'self_attn', 'q_proj', 'kernel')
    -> 'model.language_model.layers.3.self_attn.q_proj.weight'."""
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    parts: list[str] = []
    for i, part in enumerate(path[:-1]):
        head, _, index = part.rpartition("_")
        if head in _INDEXED and index.isdigit() and path[i - 1] != "mid":
            if head == "layers" and path[0] == "vision_model":
                parts.append("encoder")
            parts += [head, index]
        else:
            parts.append(part)
    leaf = path[-1]
    if leaf == "position_embedding" or path[-2:] == ("quantize", "embedding"):
        parts += [leaf, "weight"]  # plain params named like transformers' nn.Embedding modules
    else:
        parts.append("bias" if leaf == "bias" else "weight")
    return "model." + ".".join(parts)


def hf_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the transformers tensor for a param of our `shape`."""
    if path[-1] == "kernel" and len(shape) == 2:
        return shape[::-1]
    if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def to_jax_layout(path: Path, x: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and x.ndim == 2:
        return x.T
    if path[-1] == "kernel" and x.ndim == 4:  # OIHW -> HWIO
        return x.transpose(2, 3, 1, 0)
    return x


def to_hf_layout(path: Path, x: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and x.ndim == 2:
        return x.T
    if path[-1] == "kernel" and x.ndim == 4:  # HWIO -> OIHW
        return x.transpose(3, 2, 0, 1)
    return x


_ORIGINAL_DROPPED = re.compile(r"^vision_model\.vision_tower\.attn_pool\.|\.codebook_used$")
_ORIGINAL_RULES = [  # applied in order to an original name; first the vision tower
    (r"^vision_model\.vision_tower\.pos_embed$",
     "model.vision_model.embeddings.position_embedding.weight"),
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.",
     "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.norm(\d)\.",
     r"model.vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.",
     r"model.vision_model.encoder.layers.\1.self_attn.projection_layer."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.",
     r"model.vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.",
     r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^(gen_)?aligner\.layers\.0\.", lambda m: f"model.{_ALIGNER[m.group(1)]}.fc1."),
    (r"^(gen_)?aligner\.layers\.(\d+)\.",
     lambda m: f"model.{_ALIGNER[m.group(1)]}.hidden_layers.{int(m.group(2)) // 2 - 1}."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^gen_vision_model\.encoder\.conv_blocks\.", "model.vqmodel.encoder.down."),
    (r"^gen_vision_model\.decoder\.conv_blocks\.", "model.vqmodel.decoder.up."),
    (r"^gen_vision_model\.", "model.vqmodel."),
    (r"^(model\.vqmodel\..*)\.res\.", r"\1.block."),
    (r"^(model\.vqmodel\..*)\.mid\.0\.", r"\1.mid.block_1."),
    (r"^(model\.vqmodel\..*)\.mid\.1\.", r"\1.mid.attn_1."),
    (r"^(model\.vqmodel\..*)\.mid\.2\.", r"\1.mid.block_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
_ALIGNER = {None: "aligner", "gen_": "generation_aligner"}


def original_to_hf(name: str) -> str | None:
    """Original DeepSeek tensor name -> transformers name (None: unused by the model).

    Fused qkv comes out as '...self_attn.qkv.{weight,bias}' (split by the caller)."""
    if _ORIGINAL_DROPPED.search(name):
        return None
    for pattern, repl in _ORIGINAL_RULES:
        name = re.sub(pattern, repl, name)
    return name


# ----------------------------------------------------------------------------- tensor sources

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class TensorEntry:
    """A tensor's metadata and a loader that reads only this tensor."""

    def __init__(self, source: str, shape: tuple[int, ...], dtype: np.dtype,
                 read: Callable[[], np.ndarray]):
        self.source, self.shape, self.dtype, self.read = source, tuple(shape), np.dtype(dtype), read


def _safetensors_entries(file: str) -> Iterator[tuple[str, TensorEntry]]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    for name, meta in header.items():
        if meta["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name}: unsupported dtype {meta['dtype']}")
        dtype = np.dtype(_ST_DTYPES[meta["dtype"]])
        start, end = meta["data_offsets"]
        shape = tuple(meta["shape"])

        def read(start=start, end=end, dtype=dtype, shape=shape) -> np.ndarray:
            with open(file, "rb") as fh:
                fh.seek(base + start)
                return np.fromfile(fh, dtype=dtype, count=(end - start) // dtype.itemsize).reshape(
                    shape)

        yield name, TensorEntry(os.path.basename(file), shape, dtype, read)


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def _torch_entries(file: str) -> Iterator[tuple[str, TensorEntry]]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{file} is a PyTorch checkpoint (original DeepSeek format); reading it needs torch "
            "(pip install torch, CPU build is enough), or convert it to safetensors first") from e
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    for name, t in state.items():
        dtype = np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else np.dtype(
            str(t.dtype).removeprefix("torch."))
        yield name, TensorEntry(os.path.basename(file), tuple(t.shape), dtype,
                                lambda t=t: _torch_to_numpy(t))


def _split_rows(entry: TensorEntry, part: int, parts: int) -> TensorEntry:
    rows = entry.shape[0] // parts
    shape = (rows,) + entry.shape[1:]
    return TensorEntry(entry.source, shape, entry.dtype,
                       lambda: entry.read()[part * rows:(part + 1) * rows])


def _shard_files(directory: str, index_name: str, single: str, pattern: str) -> list[str]:
    index = os.path.join(directory, index_name)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, name) for name in files]
    if os.path.exists(os.path.join(directory, single)):
        return [os.path.join(directory, single)]
    return sorted(glob.glob(os.path.join(directory, pattern)))


def checkpoint_tensors(directory: str) -> tuple[str, dict[str, TensorEntry]]:
    """(format, {transformers name: entry}) for the weights in `directory`."""
    st = _shard_files(directory, "model.safetensors.index.json", "model.safetensors",
                      "*.safetensors")
    if st:
        fmt, files, reader = "transformers", st, _safetensors_entries
    else:
        files = _shard_files(directory, "pytorch_model.bin.index.json", "pytorch_model.bin",
                             "pytorch_model*.bin")
        if not files:
            raise FileNotFoundError(
                f"{directory}: no weights found (expected model*.safetensors [+ model.safetensors"
                ".index.json] or pytorch_model.bin [+ pytorch_model.bin.index.json])")
        fmt, reader = "original", _torch_entries
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: listed in the checkpoint index but missing")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in reader(file):
            if fmt == "original" and not name.startswith("model.") and name != "lm_head.weight":
                mapped = original_to_hf(name)
                if mapped is None:
                    continue
                if ".self_attn.qkv." in mapped:
                    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                        entries[mapped.replace(".qkv.", f".{proj}.")] = _split_rows(entry, i, 3)
                    continue
                if mapped.endswith("position_embedding.weight") and len(entry.shape) == 3:
                    entry = TensorEntry(entry.source, entry.shape[1:], entry.dtype,
                                        lambda e=entry: e.read()[0])
                name = mapped
            entries[name] = entry
    return fmt, entries


# ----------------------------------------------------------------------------- loading

class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message lists every offending tensor."""


def _resolve(path_or_hub_id: str) -> str:
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise NotADirectoryError(f"{path_or_hub_id}: expected a checkpoint directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_hub_id):
        raise FileNotFoundError(f"{path_or_hub_id}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_hub_id, allow_patterns=[
            "*.json", "*.safetensors", "*.bin", "*.model", "*.txt"])
    except Exception as e:
        raise FileNotFoundError(
            f"{path_or_hub_id}: not a local directory, and downloading it from the Hugging Face "
            f"Hub failed ({type(e).__name__}: {e}). Provide a local copy instead: on a machine "
            f"with network run `hf download {path_or_hub_id} --local-dir DIR`, copy "
            "DIR here and pass its path.") from e


def _check(expected: dict[str, tuple[Path, tuple[int, ...]]], entries: dict[str, TensorEntry],
           where: str) -> None:
    problems = []
    for name in sorted(set(expected) - set(entries)):
        problems.append(f"  missing     {name}: expected shape {list(expected[name][1])}")
    for name in sorted(set(entries) - set(expected)):
        e = entries[name]
        problems.append(f"  unexpected  {name} ({e.source}): shape {list(e.shape)}")
    for name in sorted(set(entries) & set(expected)):
        e, shape = entries[name], expected[name][1]
        if e.shape != shape:
            problems.append(f"  shape       {name} ({e.source}): expected {list(shape)}, "
                            f"got {list(e.shape)}")
        if not jnp.issubdtype(e.dtype, jnp.floating):  # numpy's check misses bfloat16
            problems.append(f"  dtype       {name} ({e.source}): expected a floating dtype, "
                            f"got {e.dtype}")
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match the model config "
                              f"({len(problems)} problems):\n" + "\n".join(problems))


def load_janus(path_or_hub_id: str, dtype: Any = "float32", compute_dtype: Any = None,
               shardings: Params | None = None) -> tuple[JanusConfig, Params]:
    """(config, params) from a checkpoint directory (either format) or a Hub id.

    dtype: storage dtype of the params (cast on the way); compute_dtype defaults to dtype.
    shardings: optional pytree of jax.sharding.Sharding matching the param tree, so each tensor
    goes straight to its devices (large models never gather on one device).
    """
    directory = _resolve(path_or_hub_id)
    config_file = os.path.join(directory, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{config_file}: missing (every checkpoint needs its config.json)")
    with open(config_file) as f:
        raw = json.load(f)
    dtype = np.dtype(dtype).name
    config = from_hf_config(raw, param_dtype=dtype, dtype=np.dtype(compute_dtype or dtype).name)
    fmt, entries = checkpoint_tensors(directory)

    shapes = janus.param_shapes(config)
    flat = {tuple(k.key for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    expected = {hf_name(p): (p, hf_shape(p, leaf.shape)) for p, leaf in flat.items()}
    tied = raw.get("tie_word_embeddings", False) or raw.get("language_config", {}).get(
        "tie_word_embeddings", False)
    if "lm_head.weight" not in entries and tied:
        embed = entries.get("model.language_model.embed_tokens.weight")
        if embed is not None:
            entries["lm_head.weight"] = embed  # tied: same [V, D] table
    _check(expected, entries, directory)

    target = np.dtype(config.params_dtype)
    shard_flat = None
    if shardings is not None:
        shard_flat = {tuple(k.key for k in p): s
                      for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    out: dict[Path, jax.Array] = {}
    for name, (path, _) in expected.items():
        x = entries[name].read()
        x = np.ascontiguousarray(to_jax_layout(path, x.astype(target, copy=False)))
        out[path] = jax.device_put(x, shard_flat[path] if shard_flat else None)
        del x
    return config, _unflatten(out)


def _unflatten(flat: dict[Path, Any]) -> Params:
    tree: Params = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


# ----------------------------------------------------------------------------- saving

def hf_config_dict(config: JanusConfig) -> dict[str, Any]:
    """A transformers JanusConfig dict for `config` (model_type "janus")."""
    t, v, q = config.text, config.vision, config.vq
    d = t.hidden_size
    if q.grid != v.grid:
        raise ValueError(f"transformers ties the VQ grid to the vision patch grid: VQ grid "
                         f"{q.grid} != vision grid {v.grid}; cannot save this config for it")
    if q.num_groups != 32 and all(q.ch * m % 32 == 0 for m in q.ch_mult):
        raise ValueError(f"transformers' VQ hard-codes GroupNorm(32) and would load this VQ "
                         f"(num_groups {q.num_groups}) with different numbers")
    if config.gen_head_dim != d:
        raise ValueError(f"transformers needs gen_head_dim == hidden_size ({config.gen_head_dim} "
                         f"!= {d})")
    return {
        "architectures": ["JanusForConditionalGeneration"],
        "model_type": "janus",
        "image_token_id": config.image_token_id,
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": d,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "janus_vision_model", "hidden_size": v.width,
            "num_hidden_layers": v.depth, "num_attention_heads": v.num_heads,
            "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
            "mlp_ratio": v.mlp_dim / v.width, "layer_norm_eps": v.layer_norm_eps,
            "projection_dim": d, "depth": config.aligner_depth, "hidden_act": "gelu",
            "attention_bias": True, "num_image_tokens": v.num_tokens,
        },
        "vq_config": {
            "model_type": "janus_vqgan", "embed_dim": q.codebook_dim,
            "num_embeddings": q.codebook_size, "latent_channels": q.z_channels,
            "base_channels": q.ch, "channel_multiplier": list(q.ch_mult),
            "num_res_blocks": q.num_res_blocks, "in_channels": q.in_channels,
            "out_channels": q.out_channels, "projection_dim": d,
            "num_hidden_layers": config.gen_aligner_depth, "image_token_embed_dim": d,
            "hidden_act": "gelu", "num_patches": v.grid,
            # Read by this project's loader only: transformers builds GroupNorm(32) whatever this
            # says, and refuses (rather than mis-computes) channel counts 32 does not divide.
            **({"num_groups": q.num_groups} if q.num_groups != 32 else {}),
        },
    }


def write_safetensors(file: str, tensors: dict[str, tuple[tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray]) -> None:
    """Write a safetensors file tensor by tensor: `produce(name)` is called once per name, in
    order, so only one tensor is in host memory at a time."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in tensors.items():
            x = np.ascontiguousarray(produce(name), dtype=dtype)
            if x.shape != tuple(shape):
                raise ValueError(f"{file}: tensor {name} has shape {x.shape}, declared {shape}")
            f.write(x.tobytes())


def save_hf(config: JanusConfig, params: Params, path: str) -> None:
    """Write `path/config.json` + `path/model.safetensors` in transformers' Janus format
    (loadable with JanusForConditionalGeneration.from_pretrained and with load_janus)."""
    os.makedirs(path, exist_ok=True)
    cfg = hf_config_dict(config)
    flat = {tuple(k.key for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    names = {hf_name(p): p for p in sorted(flat)}
    tensors = {n: (hf_shape(p, flat[p].shape), np.dtype(flat[p].dtype)) for n, p in names.items()}
    cfg["torch_dtype"] = cfg["dtype"] = np.dtype(config.params_dtype).name
    write_safetensors(os.path.join(path, "model.safetensors"), tensors,
                      lambda n: to_hf_layout(names[n], np.asarray(flat[names[n]])))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
