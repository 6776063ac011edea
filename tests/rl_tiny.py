"""A tiny Pair-GRPO setup for the loop tests: a few rendered Shapes pairs, the world's tokenizer,
a random 1-layer Janus-architecture policy and a brightness image reward.

Shared by tests/test_rl_loop.py, tests/test_multihost.py and its worker processes, so every one of
them builds the same world, policy and data order.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from pairuni_jax.data import pipeline as pipeline_lib
from pairuni_jax.data.shapes import write_world
from pairuni_jax.data.shapes_render import WorldConfig
from pairuni_jax.models import janus
from pairuni_jax.models.configs import JanusConfig, LlamaConfig, SigLIPConfig
from pairuni_jax.processing import JanusProcessor
from pairuni_jax.rl import pareto
from pairuni_jax.train import rl as rl_lib
from pairuni_jax.train import rl_step
from pairuni_jax.train.vq import shapes_vq_config

IMAGE_SIZE = 32
NUM_PAIRS = 16


def write_tiny_world(directory: str) -> str:
    """Render the world (deterministic); returns the aligned pairs' JSONL."""
    if not os.path.exists(os.path.join(directory, "train_aligned_pairs.jsonl")):
        write_world(
            directory,
            train_size=2,
            train_pairs=NUM_PAIRS,
            heldout_size=1,
            heldout_pairs=1,
            cfg=WorldConfig(image_size=IMAGE_SIZE),
            seed=0,
        )
    return os.path.join(directory, "train_aligned_pairs.jsonl")


def processor(world_dir: str) -> JanusProcessor:
    vq = shapes_vq_config(IMAGE_SIZE)
    proc = JanusProcessor.from_pretrained(
        os.path.join(world_dir, "tokenizer"), image_size=IMAGE_SIZE, num_image_tokens=vq.grid**2
    )
    return dataclasses.replace(proc, system_prompt="")


def model_config(vocab_size: int) -> JanusConfig:
    vq = shapes_vq_config(IMAGE_SIZE)
    text = LlamaConfig(
        vocab_size=-(-vocab_size // 64) * 64,  # a vocab the tensor axis divides, as Janus's
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=512,
    )
    vision = SigLIPConfig(
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_SIZE // vq.grid,
        width=16,
        depth=1,
        num_heads=2,
        mlp_dim=32,
    )
    return JanusConfig(
        text=text, vision=vision, vq=vq, gen_head_dim=32, dtype="float32", param_dtype="float32"
    )


def init_params(config: JanusConfig):
    """Fresh numpy params (host memory: every run gets its own device copy to donate)."""
    return jax.device_get(janus.init_params(config, jax.random.key(0)))


def pipeline(
    pairs_path: str,
    proc: JanusProcessor,
    pairs_per_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> pipeline_lib.PairPipeline:
    source = pipeline_lib.JsonlPairSource(pairs_path)
    return pipeline_lib.PairPipeline(
        source,
        proc,
        pipeline_lib.PipelineConfig(
            pairs_per_batch=pairs_per_batch,
            seed=0,
            process_index=process_index,
            process_count=process_count,
            bucket_multiple=32,
            num_parallel_calls=1,
        ),
    )


class BrightnessReward:
    """A generation reward with real spread on random images: mean brightness in [0, 1].

    `actions[call]` runs before call `call` (0-based) returns (e.g. a SIGTERM); calls from
    `nan_from` on return NaN (a broken reward model)."""

    def __init__(self):
        self.calls = 0
        self.actions = {}
        self.nan_from = None

    def __call__(self, pixels: np.ndarray, prompts) -> tuple[np.ndarray, dict]:
        call, self.calls = self.calls, self.calls + 1
        if call in self.actions:
            self.actions[call]()
        reward = np.asarray(pixels, np.float32).mean(axis=(-3, -2, -1)) / 255.0  # [P, G]
        if self.nan_from is not None and call >= self.nan_from:
            reward = np.full_like(reward, np.nan)
        return reward, {}


def rl_config(**overrides) -> rl_lib.RLConfig:
    update = rl_step.UpdateConfig(
        combiner=pareto.CombinerConfig(mode="sum", objective_stats=False), group_size=2
    )
    base = dict(
        steps=4,
        temperature=1.0,
        guidance=2.0,
        max_new_tokens=2,
        learning_rate=1e-2,
        update=update,
        frozen=(r"^vqmodel/",),
        checkpoint_every=2,
        keep=5,
        seed=0,
    )
    return rl_lib.RLConfig(**(base | overrides))


# The multi-host comparison: 2 processes x 4 devices against 1 process x 8 devices, the same
# global batch of 4 pairs (2 per process), 2 steps, on a (data 2, fsdp 2, tensor 2) mesh.
MULTIHOST_PAIRS = 4


def multihost_config() -> rl_lib.RLConfig:
    return rl_config(steps=2, checkpoint_every=1, mesh_shape=(2, 2, 2))


class ProcessShards:
    """One process feeding what `process_count` processes would: its batches are the processes'
    batches concatenated in process order (prompts padded to one length), the global batch of a
    multi-process run with the same pipelines."""

    def __init__(self, pipelines, pad_id: int):
        self.pipelines, self.pad_id = pipelines, pad_id
        self.source = pipelines[0].source

    def iterator(self, state=None):
        assert state is None, "the reference run does not resume"
        return _ConcatIterator([p.iterator() for p in self.pipelines], self.pad_id)


class _ConcatIterator:
    def __init__(self, iterators, pad_id: int):
        self.iterators, self.pad_id = iterators, pad_id

    def state(self) -> dict:
        return self.iterators[0].state()

    def __next__(self) -> dict:
        batches = [next(it) for it in self.iterators]
        lengths = {
            "und": max(b["und_ids"].shape[1] for b in batches),
            "gen": max(b["gen_ids"].shape[1] for b in batches),
        }
        batches = [rl_lib.left_pad(b, lengths, self.pad_id) for b in batches]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
