"""Held-out evaluation on the Shapes world, the way MMStar/POPE and GenEval score real models.

Understanding: greedy answers to held-out multiple-choice questions, read by the reward's letter
extraction; accuracy by question tag. Generation: one CFG sample per held-out prompt (fixed key,
the RL temperature and guidance), decoded by the VQ and scored by the world's checker; strict
GenEval-style accuracy by category, their mean ("overall") and the mean fraction of constraints.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

from pairuni_jax import rollout
from pairuni_jax.data.shapes_eval import geneval_accuracy, mc_accuracy
from pairuni_jax.data.shapes_render import DEFAULT_WORLD, WorldConfig
from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.processing import JanusProcessor
from pairuni_jax.rl.rewards import extract_choice
from pairuni_jax.train.metrics import read_jsonl


def _batches(n: int, size: int) -> Sequence[np.ndarray]:
    """Row indices of each batch, all of one size (the last repeats its final row), so that every
    batch runs the same compiled program; callers keep the first `_real(rows)` outputs."""
    size = min(size, n)
    return [np.minimum(np.arange(i, i + size), n - 1) for i in range(0, n, size)]


def _real(rows: np.ndarray) -> int:
    """How many of a batch's rows are not padding."""
    return int(rows[-1] - rows[0] + 1)


class ShapesEvaluator:
    """`evaluator(params, step) -> (metrics, sample images uint8 [n, H, W, 3], captions)`."""

    def __init__(self, world_dir: str, processor: JanusProcessor, model_config: JanusConfig, *,
                 num_understanding: int = 200, num_generation: int = 120, guidance: float = 5.0,
                 temperature: float = 1.0, max_new_tokens: int = 8, batch_size: int = 64,
                 num_images: int = 16, seed: int = 0, split: str = "heldout",
                 world_config: WorldConfig = DEFAULT_WORLD):
        self.processor, self.config = processor, model_config
        self.guidance, self.temperature = guidance, temperature
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.num_images, self.key = num_images, jax.random.key(seed)
        self.world_config = world_config
        und = read_jsonl(os.path.join(world_dir, f"{split}_understanding.jsonl"))
        und = und[:num_understanding]
        gen = read_jsonl(os.path.join(world_dir, f"{split}_generation.jsonl"))[:num_generation]
        if not und or not gen:
            raise ValueError(f"{world_dir}: no {split} items to evaluate on")
        self.answers = [r["answer"] for r in und]
        self.tags = [r["tag"] for r in und]
        self.und_pixels = np.stack([
            processor.preprocess_image(Image.open(os.path.join(world_dir, r["image_path"])))
            for r in und])  # [Nu, S, S, 3]
        self.und_ids, self.und_mask = rollout.pad_prompts(
            [processor.understanding_ids(r["question"]) for r in und], processor.pad_id)
        self.prompts = [r["prompt"] for r in gen]
        self.gen_ids, self.gen_mask = rollout.pad_prompts(
            [processor.generation_ids(p) for p in self.prompts], processor.pad_id)

    def answers_of(self, params) -> list[str]:
        """Greedy decoded answers to every evaluation question."""
        p, out = self.processor, []
        for s in _batches(len(self.und_ids), self.batch_size):
            text = rollout.generate_text(
                params, self.config, self.und_ids[s], self.und_mask[s], self.key,
                self.und_pixels[s], num_samples=1, max_new_tokens=self.max_new_tokens,
                sampling=rollout.GREEDY, eos_id=p.eos_id, pad_id=p.pad_id,
                image_token_id=p.image_placeholder_id)
            n = _real(s)
            tokens, mask = np.asarray(text.tokens[:n, 0]), np.asarray(text.mask[:n, 0])
            out += [p.decode(t[m]) for t, m in zip(tokens, mask, strict=True)]
        return out

    def images_of(self, params) -> np.ndarray:
        """One CFG sample per evaluation prompt: uint8 [Ng, H, W, 3]."""
        p, out = self.processor, []
        sampling = rollout.Sampling(temperature=self.temperature)
        for i, s in enumerate(_batches(len(self.gen_ids), self.batch_size)):
            imgs = rollout.generate_images(
                params, self.config, self.gen_ids[s], self.gen_mask[s],
                jax.random.fold_in(self.key, i), self.guidance, num_samples=1,
                sampling=sampling, bos_id=p.bos_id, boi_id=p.image_start_id, pad_id=p.pad_id)
            out.append(np.asarray(imgs.pixels[:_real(s), 0]))
        return np.concatenate(out)

    def __call__(self, params, step: int = 0):
        answers = self.answers_of(params)
        und = mc_accuracy([extract_choice(a) for a in answers], self.answers, self.tags)
        images = self.images_of(params)
        gen = geneval_accuracy(images, self.prompts, self.world_config)
        metrics = {f"und/acc_{k}": v for k, v in und.items()}
        metrics.update({f"gen/acc_{k}": v for k, v in gen.items()})
        n = min(self.num_images, len(images))
        return metrics, images[:n], self.prompts[:n]
