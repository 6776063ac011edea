"""Shapes world evaluation: GenEval-style generation accuracy and multiple-choice accuracy, both
by category."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from pairuni_jax.data.shapes_checker import Detection, score_images
from pairuni_jax.data.shapes_render import DEFAULT_WORLD, WorldConfig
from pairuni_jax.data.shapes_text import parse_prompt


def _by_category(correct: Sequence[bool], tags: Sequence[str]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for ok, tag in zip(correct, tags, strict=True):
        groups[tag].append(bool(ok))
    return {tag: float(np.mean(v)) for tag, v in sorted(groups.items())}


def geneval_accuracy(images: np.ndarray | Sequence[Sequence[Detection]], prompts: Sequence[str],
                     cfg: WorldConfig = DEFAULT_WORLD) -> dict[str, float]:
    """Strict accuracy per prompt category, plus "overall" = the mean over categories (as GenEval
    reports it) and "constraints" = the mean fraction of constraints met over all images.
    `images`: uint8 [B, H, W, 3], or their `detect` results (`score_images`)."""
    frac, strict = score_images(images, prompts, cfg)
    result = _by_category(strict, [parse_prompt(p).category for p in prompts])
    result["overall"] = float(np.mean(list(result.values())))
    result["constraints"] = float(frac.mean())
    return result


def mc_accuracy(predictions: Sequence[str | None], answers: Sequence[str],
                tags: Sequence[str]) -> dict[str, float]:
    """Accuracy per question tag plus "overall" over all items (as MMStar/POPE report it).

    `predictions` are letters (`rl.rewards.extract_choice`) or None for an unreadable answer.
    """
    correct = [p is not None and p == a for p, a in zip(predictions, answers, strict=True)]
    result = _by_category(correct, tags)
    result["overall"] = float(np.mean(correct)) if correct else float("nan")
    return result
