"""Evaluation on the Shapes world, the way MMStar/POPE and GenEval score real models.

Two splits: `heldout` (compositional: every item shows or names a colour-shape pair, relation or
count that training never saw; metric keys `und/...`, `gen/...`) and `test` (new scenes from the
training distribution; `und_test/...`, `gen_test/...`).

Understanding: greedy answers to the multiple-choice questions, read by the reward's letter
extraction; accuracy by question tag. `acc_sampled` is the expected accuracy of one answer sampled
at the RL temperature (the mean over `und_samples` answers per question, fixed key): what GRPO
optimises, and it moves before the greedy answer flips. Generation: one CFG sample per prompt
(fixed key, the RL temperature and guidance), decoded by the VQ and scored by the world's
checker; strict GenEval-style accuracy by category, their mean ("overall"), the mean fraction
of constraints, and "other_prompt": the overall accuracy of the same images against other prompts,
which tells prompt-following from a drawing that meets many prompts at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

from pairuni_jax import rollout
from pairuni_jax.data import shapes_checker, shapes_eval
from pairuni_jax.data.shapes_eval import geneval_accuracy, mc_accuracy
from pairuni_jax.data.shapes_render import DEFAULT_WORLD, WorldConfig
from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.processing import JanusProcessor
from pairuni_jax.rl import rewards
from pairuni_jax.rl.rewards import extract_choice
from pairuni_jax.train.metrics import read_jsonl

# The code that turns answers and images into scores: a result cached under older rules is stale.
_SCORING_SOURCES = (__file__, shapes_checker.__file__, shapes_eval.__file__, rewards.__file__)


def _batches(n: int, size: int) -> Sequence[np.ndarray]:
    """Row indices of each batch, all of one size (the last repeats its final row), so that every
    batch runs the same compiled program; callers keep the first `_real(rows)` outputs."""
    size = min(size, n)
    return [np.minimum(np.arange(i, i + size), n - 1) for i in range(0, n, size)]


def _real(rows: np.ndarray) -> int:
    """How many of a batch's rows are not padding."""
    return int(rows[-1] - rows[0] + 1)


@dataclasses.dataclass(frozen=True)
class _SplitItems:
    """One split's evaluation items, tokenised and preprocessed once."""

    suffix: str  # appended to the task in metric keys: "" (heldout) or "_test"
    answers: list[str]
    tags: list[str]
    asks_heldout: list[bool] | None  # per question: about a held-out combination (None: unknown)
    und_pixels: np.ndarray  # [Nu, S, S, 3]
    und_ids: np.ndarray  # [Nu, Lu] left-padded
    und_mask: np.ndarray  # [Nu, Lu]
    prompts: list[str]
    gen_ids: np.ndarray  # [Ng, Lg] left-padded
    gen_mask: np.ndarray  # [Ng, Lg]


def _by_asking(choices: Sequence[str | None], items: _SplitItems) -> dict[str, float]:
    """Accuracy of the chosen letters on the questions about a held-out combination
    ("asks_heldout") and on those whose image alone shows one ("shows_heldout"), when the split
    has both."""
    flags = items.asks_heldout
    if flags is None or all(flags) or not any(flags):
        return {}
    hits = [c == gold for c, gold in zip(choices, items.answers, strict=True)]
    return {name: float(np.mean([h for h, f in zip(hits, flags, strict=True) if f == want]))
            for name, want in (("asks_heldout", True), ("shows_heldout", False))}


def _asks_heldout(world_dir: str) -> dict[str, list[int]] | None:
    """world.json's `asks_heldout`: per split, the understanding items whose question is about a
    held-out combination (None for a world written without that list)."""
    path = os.path.join(world_dir, "world.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("asks_heldout")


def _task_suffix(split: str) -> str:
    return "" if split == "heldout" else f"_{split}"


class ShapesEvaluator:
    """`evaluator(params, step) -> (metrics, sample images uint8 [n, H, W, 3], captions)`; the
    sample images are the first split's.

    With `cache_dir`, each result is kept under a digest of the params, of every setting and item
    and of the scoring code's source: params scored before (the SFT policy that starts every RL
    and ablation run) are read back, not scored again. The evaluation is a function of exactly
    these, so nothing changes.
    """

    def __init__(self, world_dir: str, processor: JanusProcessor, model_config: JanusConfig, *,
                 num_understanding: int = 200, num_generation: int = 120, guidance: float = 5.0,
                 temperature: float = 1.0, max_new_tokens: int = 8, und_samples: int = 4,
                 batch_size: int = 64, num_images: int = 16, seed: int = 0,
                 splits: Sequence[str] = ("heldout", "test"),
                 world_config: WorldConfig = DEFAULT_WORLD, cache_dir: str | None = None):
        self.processor, self.config = processor, model_config
        self.guidance, self.temperature = guidance, temperature
        self.max_new_tokens, self.und_samples = max_new_tokens, und_samples
        self.batch_size, self.num_images, self.key = batch_size, num_images, jax.random.key(seed)
        self.world_config = world_config
        asks = _asks_heldout(world_dir)
        self.splits = [self._load(world_dir, split, num_understanding, num_generation, asks)
                       for split in splits]
        self.cache_dir = cache_dir

    def _load(self, world_dir: str, split: str, num_und: int, num_gen: int,
              asks_heldout: dict[str, list[int]] | None) -> _SplitItems:
        p = self.processor
        und = read_jsonl(os.path.join(world_dir, f"{split}_understanding.jsonl"))[:num_und]
        gen = read_jsonl(os.path.join(world_dir, f"{split}_generation.jsonl"))[:num_gen]
        if not und or not gen:
            raise ValueError(f"{world_dir}: no {split} items to evaluate on")
        und_ids, und_mask = rollout.pad_prompts(
            [p.understanding_ids(r["question"]) for r in und], p.pad_id)
        prompts = [r["prompt"] for r in gen]
        gen_ids, gen_mask = rollout.pad_prompts([p.generation_ids(x) for x in prompts], p.pad_id)
        pixels = np.stack([p.preprocess_image(Image.open(os.path.join(world_dir, r["image_path"])))
                           for r in und])
        about = None
        if asks_heldout is not None:
            listed = set(asks_heldout.get(split, ()))
            about = [i in listed for i in range(len(und))]
        return _SplitItems(_task_suffix(split), [r["answer"] for r in und],
                           [r["tag"] for r in und], about, pixels, und_ids, und_mask, prompts,
                           gen_ids, gen_mask)

    def answers_of(self, params, items: _SplitItems, num_samples: int = 1,
                   sampling: rollout.Sampling = rollout.GREEDY) -> list[list[str]]:
        """`num_samples` decoded answers to every question of a split: [Nu][num_samples]."""
        p, out = self.processor, []
        for i, s in enumerate(_batches(len(items.und_ids), self.batch_size)):
            text = rollout.generate_text(
                params, self.config, items.und_ids[s], items.und_mask[s],
                jax.random.fold_in(self.key, i), items.und_pixels[s], num_samples=num_samples,
                max_new_tokens=self.max_new_tokens, sampling=sampling, eos_id=p.eos_id,
                pad_id=p.pad_id, image_token_id=p.image_placeholder_id)
            n = _real(s)
            tokens, mask = np.asarray(text.tokens[:n]), np.asarray(text.mask[:n])  # [n, k, T]
            out += [[p.decode(t[m]) for t, m in zip(row_t, row_m, strict=True)]
                    for row_t, row_m in zip(tokens, mask, strict=True)]
        return out

    def images_of(self, params, items: _SplitItems) -> np.ndarray:
        """One CFG sample per prompt of a split: uint8 [Ng, H, W, 3]."""
        p, out = self.processor, []
        sampling = rollout.Sampling(temperature=self.temperature)
        for i, s in enumerate(_batches(len(items.gen_ids), self.batch_size)):
            imgs = rollout.generate_images(
                params, self.config, items.gen_ids[s], items.gen_mask[s],
                jax.random.fold_in(self.key, i), self.guidance, num_samples=1,
                sampling=sampling, bos_id=p.bos_id, boi_id=p.image_start_id, pad_id=p.pad_id)
            out.append(np.asarray(imgs.pixels[:_real(s), 0]))
        return np.concatenate(out)

    def split_metrics(self, params, items: _SplitItems) -> tuple[dict[str, float], np.ndarray]:
        """(metrics of one split, its generated images)."""
        choices = [extract_choice(a[0]) for a in self.answers_of(params, items)]  # greedy
        und = mc_accuracy(choices, items.answers, items.tags)
        und.update(_by_asking(choices, items))
        if self.und_samples:
            sampled = self.answers_of(params, items, self.und_samples,
                                      rollout.Sampling(temperature=self.temperature))
            hits = [[extract_choice(a) == gold for a in answers]
                    for answers, gold in zip(sampled, items.answers, strict=True)]
            und["sampled"] = float(np.mean(hits))
        images = self.images_of(params, items)
        # detected once, scored against the real prompts and against others
        detections = [shapes_checker.detect(img, self.world_config) for img in images]
        gen = geneval_accuracy(detections, items.prompts, self.world_config)
        # Each image against the next prompt (another category): as high as `overall` when the
        # images do not depend on their prompts, e.g. a policy collapsed onto one drawing.
        other = items.prompts[1:] + items.prompts[:1]
        gen["other_prompt"] = geneval_accuracy(detections, other, self.world_config)["overall"]
        metrics = {f"und{items.suffix}/acc_{k}": v for k, v in und.items()}
        metrics.update({f"gen{items.suffix}/acc_{k}": v for k, v in gen.items()})
        return metrics, images

    def __call__(self, params, step: int = 0):
        path = self._cache_path(params)
        if path and os.path.exists(path):  # these params were scored before (e.g. the SFT end)
            with np.load(path) as f:
                return (json.loads(str(f["metrics"])), f["images"],
                        [str(c) for c in f["captions"]])
        metrics, images = {}, []
        for items in self.splits:
            split_metrics, split_images = self.split_metrics(params, items)
            metrics.update(split_metrics)
            images.append(split_images)
        n = min(self.num_images, len(images[0]))
        out = metrics, images[0][:n], self.splits[0].prompts[:n]
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{path}.tmp.npz"
            np.savez(tmp, metrics=json.dumps(metrics), images=out[1], captions=np.array(out[2]))
            os.replace(tmp, path)
        return out

    def _cache_path(self, params) -> str | None:
        """`cache_dir/<digest of params, every setting and item, and the scoring code>.npz`, or
        None."""
        if not self.cache_dir:
            return None
        p = self.processor
        settings = (self.config, self.guidance, self.temperature, self.max_new_tokens,
                    self.und_samples, self.batch_size, self.num_images, self.world_config,
                    p.eos_id, p.pad_id, p.bos_id, p.image_start_id, p.image_placeholder_id)
        chunks = [repr(settings).encode(), np.asarray(jax.random.key_data(self.key)).tobytes()]
        for source in _SCORING_SOURCES:
            with open(source, "rb") as f:
                chunks.append(f.read())
        for it in self.splits:
            chunks.append(repr((it.suffix, it.answers, it.tags, it.asks_heldout,
                                it.prompts)).encode())
            chunks += [a.tobytes() for a in (it.und_pixels, it.und_ids, it.und_mask, it.gen_ids,
                                             it.gen_mask)]
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            chunks += [jax.tree_util.keystr(path).encode(), np.asarray(leaf).tobytes()]
        return os.path.join(self.cache_dir, f"{_digest(chunks)}.npz")


def _digest(chunks: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return h.hexdigest()[:32]
