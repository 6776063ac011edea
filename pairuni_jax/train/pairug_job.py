"""The PairUni recipe on real Janus-Pro (configs/pairug.py): Pair-GRPO on PairUG pairs.

    python -m pairuni_jax.main --config=configs/pairug.py:1b --workdir=runs/pairug_1b

`run_pairug(config, workdir)`: validate the config (every error names its field) -> resolve the
weights (a local directory, or a Hugging Face Hub download) -> open the PairUG data -> processor,
this host's data pipeline, the generation reward, the RLConfig -> `rl.train_rl`, which resumes
from the workdir's checkpoints. The trained policy is saved under <workdir>/model in transformers'
format with the tokenizer, loadable by `checkpoints.load_janus` and transformers alike.
Missing weights or data stop the run before anything heavy, with how to get them; the embedded
default (configs/shapes.py) needs neither.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image

from pairuni_jax import checkpoints, files, rollout
from pairuni_jax.data import pairug
from pairuni_jax.data import pipeline as pipeline_lib
from pairuni_jax.data.shapes_eval import mc_accuracy
from pairuni_jax.models import janus
from pairuni_jax.models import lora as lora_lib
from pairuni_jax.models.configs import JanusConfig, from_hf_config
from pairuni_jax.processing import JanusProcessor, letterbox
from pairuni_jax.rl.rewards import build_generation_reward, extract_choice, parse_generation_spec
from pairuni_jax.train import rl as rl_lib
from pairuni_jax.train import sharding

EMBEDDED_DEFAULT = (
    "To try the whole pipeline without downloads, run the embedded default instead: "
    "`python -m pairuni_jax.main --config=configs/shapes.py --workdir=runs/shapes`."
)
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]  # weights, config, tokenizer


class ConfigError(ValueError):
    """A config field with a bad value; the message names the field."""


class WeightsNotFound(FileNotFoundError):
    """The model weights are neither a local directory nor downloadable."""


class DataNotFound(FileNotFoundError):
    """The PairUG data (or a file the config names) does not exist."""


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {message}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Check the fields a run depends on before loading anything; raises ConfigError."""
    for section in ("model", "data", "reward", "lora", "mesh", "rl", "eval"):
        _require(section in config, section, "missing section (start from configs/pairug.py)")
    m, r, lo = config.model, config.rl, config.lora
    _require(bool(m.path), "model.path", "empty: a checkpoint directory or a Hub id such as "
             "deepseek-ai/Janus-Pro-1B")
    for field in ("dtype", "compute_dtype"):
        try:
            jnp.dtype(m[field])
        except TypeError:
            raise ConfigError(f"config.model.{field}: {m[field]!r} is not a dtype "
                              "(float32, bfloat16, ...)") from None
    _require(config.data.on_error in ("raise", "skip"), "data.on_error",
             f"{config.data.on_error!r}: use 'raise' or 'skip'")
    _require(config.data.bucket_multiple >= 1, "data.bucket_multiple", "must be >= 1")
    for field, low in (("steps", 1), ("pairs_per_batch", 1), ("group_size", 2),
                       ("max_new_tokens", 1), ("mu", 1), ("num_micro_batches", 1),
                       ("log_every", 1), ("checkpoint_every", 1), ("keep", 1)):
        _require(r[field] >= low, f"rl.{field}", f"{r[field]} must be >= {low}"
                 + (" (advantages are normalised within a group)" if field == "group_size"
                    else ""))
    hosts = jax.process_count()
    _require(r.pairs_per_batch % hosts == 0, "rl.pairs_per_batch",
             f"the global batch {r.pairs_per_batch} must divide over {hosts} hosts")
    for field in ("learning_rate", "temperature"):
        _require(r[field] > 0, f"rl.{field}", f"{r[field]} must be > 0")
    for field in ("guidance", "beta", "eval_every", "warmup_steps", "format_weight"):
        _require(r[field] >= 0, f"rl.{field}", f"{r[field]} must be >= 0")
    _require(lo.rank >= 0, "lora.rank", f"{lo.rank}: 0 (full fine-tuning) or a positive rank")
    try:
        weights = parse_generation_spec(config.reward.generation)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    if "hpsv2" in weights:
        _require_file(config.reward.hpsv2_checkpoint, "reward.hpsv2_checkpoint",
                      "download it with `hf download xswu/HPSv2 "
                      "HPS_v2.1_compressed.pt --local-dir weights`", local=True)
    if "clip" in weights:
        _require_file(config.reward.clip_path, "reward.clip_path",
                      "a transformers CLIP directory, e.g. `hf download "
                      "openai/clip-vit-large-patch14 --local-dir weights/clip-vit-large-patch14`",
                      local=True)
    if config.eval.understanding:
        _require_file(config.eval.understanding, "eval.understanding",
                      "a held-out understanding JSONL, or '' for no evaluation")


def _require_file(path: str, field: str, how: str, *, local: bool = False) -> None:
    """`path` exists; with `local`, on this host's disk (reward weights are loaded from local
    files; data and the workdir may be in a bucket)."""
    if local and path and files.is_url(path):
        raise DataNotFound(
            f"config.{field}={path!r}: reward weights are read from local disk; download them on "
            "every host and pass the local path.")
    if not path or not files.exists(path):
        raise DataNotFound(f"config.{field}: {path!r} does not exist; {how}")


# ----------------------------------------------------------------------------- inputs


def resolve_weights(path_or_hub_id: str) -> str:
    """The checkpoint directory: `path_or_hub_id` itself, or its Hub snapshot (downloaded once,
    then read from the Hugging Face cache). Raises WeightsNotFound saying how to get them."""
    if files.is_url(path_or_hub_id):
        raise WeightsNotFound(
            f"config.model.path={path_or_hub_id!r}: weights are read from local disk; download "
            "them on every host (launch/tpu_vm.sh weights) and pass the local directory.")
    known = path_or_hub_id.startswith(("deepseek-ai/", "deepseek-community/"))
    hub_id = path_or_hub_id if known else "deepseek-ai/Janus-Pro-1B"  # what to suggest
    local = f"weights/{hub_id.split('/')[-1]}"
    how = (
        f"Get the weights on a machine with network: `hf download {hub_id} "
        f"--local-dir {local}` (transformers-format copies: deepseek-community/Janus-Pro-1B and "
        f"-7B), then pass --config.model.path={local}. {EMBEDDED_DEFAULT}"
    )
    if os.path.isdir(path_or_hub_id):
        if not os.path.exists(os.path.join(path_or_hub_id, "config.json")):
            raise WeightsNotFound(f"config.model.path={path_or_hub_id!r}: the directory has no "
                                  f"config.json, so it is not a Janus checkpoint. {how}")
        return path_or_hub_id
    if os.path.exists(path_or_hub_id) or not HUB_ID.fullmatch(path_or_hub_id):
        raise WeightsNotFound(f"config.model.path={path_or_hub_id!r}: no such checkpoint "
                              f"directory. {how}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_hub_id, allow_patterns=HUB_FILES)
    except Exception as e:  # offline, no network, gated, unknown repo: all mean "get it by hand"
        raise WeightsNotFound(
            f"config.model.path={path_or_hub_id!r}: not a local directory, and downloading it "
            f"from the Hugging Face Hub failed ({type(e).__name__}: {e}). {how}") from e


def open_pairs(data: ml_collections.ConfigDict) -> pipeline_lib.PairSource:
    """The PairUG source (JSONL file or TFDS directory); DataNotFound says how to build one."""
    if not data.path or not files.exists(data.path):
        raise DataNotFound(
            f"config.data.path={data.path!r}: no PairUG data there. Build pairs from an "
            "understanding and a generation JSONL with `python -m pairuni_jax.data.pairing "
            "--understanding U.jsonl --generation G.jsonl --aligned aligned.jsonl --out "
            "data/pairug/pairs.jsonl`, check them with `python -m pairuni_jax.data.pairug "
            "validate data/pairug/pairs.jsonl`, and pass --config.data.path=data/pairug/"
            f"pairs.jsonl. {EMBEDDED_DEFAULT}")
    return pipeline_lib.open_source(data.path, root=data.image_root or None,
                                    on_error=data.on_error)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh over all devices; the global batch of pairs must split
    evenly over its batch axes ('data', 'fsdp')."""
    try:
        mesh = sharding.make_mesh(**config.mesh)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    _require(config.rl.pairs_per_batch % shards == 0, "rl.pairs_per_batch",
             f"{config.rl.pairs_per_batch} pairs do not split over the mesh's {shards} batch "
             f"shards (data x fsdp of {dict(mesh.shape)}): use a multiple of {shards}, or move "
             "devices to config.mesh.tensor")
    return mesh


def lora_config(lo: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
    """models/lora.LoraConfig from the `lora` section; None (full fine-tuning) at rank 0."""
    if lo.rank == 0:
        return None
    try:
        return lora_lib.LoraConfig(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
                                   targets=tuple(lo.targets))
    except ValueError as e:
        raise ConfigError(f"config.lora: {e}") from None


def build_rl_config(config: ml_collections.ConfigDict) -> rl_lib.RLConfig:
    """RLConfig from the `rl` and `lora` sections. Full fine-tuning trains the LLM, aligners and
    heads; the vision encoder and the VQ stay frozen (as the open Janus-Pro GRPO trainer)."""
    try:
        return rl_lib.rl_config_from(config.rl, config.seed, lora=lora_config(config.lora))
    except ValueError as e:
        raise ConfigError(f"config.rl: {e}") from None


# ----------------------------------------------------------------------------- evaluation


class UnderstandingEvaluator:
    """Held-out multiple-choice accuracy: greedy answers, overall and by tag.

    `evaluator(params, step) -> (metrics, images uint8 [n, S, S, 3], captions)`; the images are
    the first questions' inputs captioned "predicted/gold" letter. Images are read per batch, so
    a large set never sits in memory; every batch has the same shape (the last one is padded by
    repeating its final row), so greedy decoding compiles once.
    """

    def __init__(self, path: str, processor: JanusProcessor, model_config: JanusConfig, *,
                 root: str | None = None, max_items: int = 0, batch_size: int = 16,
                 max_new_tokens: int = 512, num_images: int = 8):
        read = pairug.read_understanding_set(path, root=root)  # bad records: file, line, field
        self.records = read.records[: max_items or None]
        if not self.records:
            raise DataNotFound(f"config.eval.understanding={path!r}: no understanding records")
        self.root, self.processor, self.model_config = read.root, processor, model_config
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.num_images = num_images
        self.ids, self.mask = rollout.pad_prompts(
            [processor.understanding_ids(r.question) for r in self.records], processor.pad_id)
        self.key = jax.random.key(0)  # greedy: the key is unused but required

    def _images(self, rows: np.ndarray) -> np.ndarray:
        """Letterboxed uint8 [len(rows), S, S, 3] of the given records."""
        out = []
        for i in rows:
            full = pairug.resolve_image_path(self.records[i].image_path, self.root)
            with files.open_file(full, "rb") as f, Image.open(f) as im:
                out.append(letterbox(im, self.processor.image_size))
        return np.stack(out)

    def answers(self, params) -> tuple[list[str], np.ndarray]:
        """(greedy answer text per record, uint8 images of the first `num_images` records)."""
        p, n, b = self.processor, len(self.records), self.batch_size
        texts, shown = [], []
        for start in range(0, n, b):
            rows = np.minimum(np.arange(start, start + b), n - 1)  # [b], last batch padded
            images = self._images(rows)  # [b, S, S, 3]
            pixels = (images.astype(np.float32) / 255.0 - 0.5) / 0.5  # preprocess_image
            out = rollout.generate_text(
                params, self.model_config, self.ids[rows], self.mask[rows], self.key, pixels,
                num_samples=1, max_new_tokens=self.max_new_tokens, sampling=rollout.GREEDY,
                eos_id=p.eos_id, pad_id=p.pad_id, image_token_id=p.image_placeholder_id)
            # every host feeds the same rows; a multi-host output is gathered whole
            tokens, mask = multihost_utils.process_allgather((out.tokens[:, 0], out.mask[:, 0]),
                                                             tiled=True)
            real = min(b, n - start)
            texts += [p.decode(t[m]) for t, m in zip(tokens[:real], mask[:real], strict=True)]
            if len(shown) < self.num_images:
                shown += list(images[:real])
        return texts, np.stack(shown[: self.num_images])

    def __call__(self, params, step: int = 0):
        texts, images = self.answers(params)
        predictions = [extract_choice(t, len(pairug.mc_options(r.question)))
                       for t, r in zip(texts, self.records, strict=True)]
        accuracy = mc_accuracy(predictions, [r.answer for r in self.records],
                               [r.tag for r in self.records])
        captions = [f"{pred or '-'}/{r.answer}" for pred, r in zip(predictions, self.records,
                                                                    strict=False)]
        return ({f"und/acc_{k}": v for k, v in accuracy.items()}, images,
                captions[: len(images)])


# ----------------------------------------------------------------------------- the job


def load_model(config: ml_collections.ConfigDict, directory: str, mesh: Mesh):
    """(model config, params placed on `mesh` by sharding.JANUS_RULES, processor) from a
    checkpoint directory of either format. Each tensor goes straight to its devices, so a model
    larger than one device's memory loads."""
    m = config.model
    with open(os.path.join(directory, "config.json")) as f:
        model_config = from_hf_config(json.load(f), param_dtype=jnp.dtype(m.dtype).name,
                                      dtype=jnp.dtype(m.compute_dtype).name)
    shardings = sharding.param_shardings(janus.param_shapes(model_config), sharding.JANUS_RULES,
                                         mesh)
    model_config, params = checkpoints.load_janus(directory, dtype=m.dtype,
                                                  compute_dtype=m.compute_dtype,
                                                  shardings=shardings)
    processor = JanusProcessor.from_pretrained(
        directory, image_size=model_config.vision.image_size,
        num_image_tokens=model_config.vision.num_tokens)
    return model_config, params, processor


def save_policy(model_config: JanusConfig, params, processor: JanusProcessor, path: str) -> None:
    """transformers-format weights + the tokenizer under `path` (every host gathers; host 0
    writes)."""
    params = multihost_utils.process_allgather(params, tiled=True)  # numpy, on every host
    if jax.process_index() == 0:
        with files.local_directory(path) as local:
            checkpoints.save_hf(model_config, params, local)
            processor.tokenizer.save_pretrained(local)


def run_pairug(config: ml_collections.ConfigDict, workdir: str, *,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the recipe under `workdir`; returns the summary metrics."""
    validate(config)
    source = open_pairs(config.data)  # before a download of several GB
    directory = resolve_weights(config.model.path)
    cfg = build_rl_config(config)
    mesh = make_mesh(config)
    log(f"pairug: weights {directory}; {len(source)} pairs from {source.name}; mesh "
        f"{dict(mesh.shape)}")

    model_config, params, processor = load_model(config, directory, mesh)
    r = config.rl
    pipeline = pipeline_lib.PairPipeline(source, processor, pipeline_lib.PipelineConfig(
        pairs_per_batch=r.pairs_per_batch // jax.process_count(), seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        bucket_multiple=config.data.bucket_multiple, fast_resize=config.data.fast_resize))
    # Each host scores its own rollouts: the reward's mesh is this host's devices.
    local_mesh = sharding.make_mesh(devices=jax.local_devices())
    reward = build_generation_reward(config.reward.to_dict(), mesh=local_mesh)
    evaluate = None
    if config.eval.understanding:
        e = config.eval
        evaluate = UnderstandingEvaluator(
            e.understanding, processor, model_config, root=e.image_root or None,
            max_items=e.max_items, batch_size=e.batch_size, max_new_tokens=r.max_new_tokens)

    params, summary = rl_lib.train_rl(params, model_config, processor, pipeline, reward, cfg,
                                      workdir, evaluate=evaluate, log=log, mesh=mesh)
    model_dir = os.path.join(workdir, "model")
    save_policy(model_config, params, processor, model_dir)
    if jax.process_index() == 0:
        with files.open_file(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
    log(f"pairug: policy saved to {model_dir}")
    return summary
