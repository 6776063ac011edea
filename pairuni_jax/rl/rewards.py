"""Rewards for Pair-GRPO: multiple-choice accuracy for understanding, a registry for generation.

Understanding (host side, strings in, float32 arrays out). `extract_choice` reads the chosen letter:
1. Span. If the output has `<answer>...</answer>`, the span is the text inside; more than one
   answer block, or an unclosed one, gives no letter (hedging is never rewarded). Without answer
   tags the span is the whole output minus any `<think>...</think>` block.
2. Bare letter: the span is one letter with only whitespace/punctuation around it
   ("B", "b", " (B) ", "B.", "[b]", "**B**") -> that letter.
3. Option echo: the span starts with a letter followed by ".", ")" or ":" and text
   ("B. red circle", "(b) yes") -> that letter.
4. Phrase: "answer(s)/option(s)/choice(s) (is) (:) X" anywhere in the span, X an upper-case
   letter or any letter in brackets ("The answer is B", "answer: (c)", "CHOICES: B"),
   case-insensitive keyword; every such phrase must name the same letter, else no letter.
5. Anything else (no letter, a letter inside a word like "Because", two different letters)
   -> no letter. Only letters among the question's options count when `num_options` is given.
accuracy = 1 if the letter equals the reference answer (case-insensitive) else 0.
format = 1 if the output is exactly `<think>...</think>` then `<answer>...</answer>` (whitespace
around allowed, one of each tag) and the answer block yields a letter; else 0.
understanding reward = accuracy + format_weight * format.

Generation: `build_generation_reward(spec, ...)` combines named image rewards with weights,
`hpsv2` (open_clip ViT-H-14 + HPS v2.1 weights; score = cosine of the normalised image and text
features, the diagonal of image @ text.T, no logit scale: exactly what HPSv2's `score` and
T2I-R1's HPS reward return; typically 0.2-0.35 on real images), `clip` (the same on any CLIP, e.g.
transformers' openai/clip-vit-large-patch14), and `shapes` (the Shapes world's rule-based checker:
fraction of the prompt's constraints met). The CLIP scores run jitted on the accelerator (decode ->
preprocess -> both towers -> dot, no host round trip) and shard the image batch over a mesh.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pairuni_jax import clip_checkpoints, clip_processing
from pairuni_jax.models import clip
from pairuni_jax.train import sharding

# -- understanding -------------------------------------------------------------------------------

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_BARE = re.compile(r"^[\W_]*([A-Za-z])[\W_]*$")
_ECHO = re.compile(r"^[\W_]*([A-Za-z])\s*[.):]\s+\S")
_PHRASE = re.compile(
    r"\b(?:answer|option|choice)s?\b(?:\s+is)?\s*[:\-]?\s*"
    r"(?:([A-Z])(?![A-Za-z])|[(\[]([A-Za-z])[)\]])",
    re.IGNORECASE,
)
_FORMAT = re.compile(
    r"^\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*"
    r"<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*$",
    re.DOTALL | re.IGNORECASE,
)


def _answer_span(text: str) -> str | None:
    lower = text.lower()
    opens, closes = lower.count("<answer>"), lower.count("</answer>")
    if opens == 0 and closes == 0:
        return _THINK_BLOCK.sub(" ", text)
    blocks = _ANSWER_BLOCK.findall(text)
    if opens != 1 or closes != 1 or len(blocks) != 1:
        return None
    return blocks[0]


def _phrase_letters(span: str) -> set[str]:
    letters = set()
    for m in _PHRASE.finditer(span):
        upper = m.group(1)
        # group 1 must be upper case as written (the keyword match is case-insensitive)
        if upper is not None and not upper.isupper():
            continue
        letters.add((upper or m.group(2)).upper())
    return letters


def extract_choice(text: str, num_options: int | None = None) -> str | None:
    """The multiple-choice letter an output commits to (upper case), or None. Rules: module doc."""
    span = _answer_span(text)
    if span is None:
        return None
    span = span.strip()
    letter = None
    if m := _BARE.match(span):
        letter = m.group(1).upper()
    elif m := _ECHO.match(span):
        letter = m.group(1).upper()
    else:
        found = _phrase_letters(span)
        letter = found.pop() if len(found) == 1 else None
    if letter is not None and num_options is not None and ord(letter) - ord("A") >= num_options:
        return None
    return letter


def _check_answer(answer: str, index: int) -> str:
    a = answer.strip().upper()
    if len(a) != 1 or not "A" <= a <= "Z":
        raise ValueError(f"answers[{index}]: expected one option letter A-Z, got {answer!r}")
    return a


def format_ok(text: str) -> bool:
    """Exactly `<think>...</think><answer>...</answer>` (whitespace around), a readable letter."""
    return bool(_FORMAT.match(text)) and extract_choice(text) is not None


def understanding_rewards(
    outputs: Sequence[str],
    answers: Sequence[str],
    *,
    format_weight: float = 0.0,
    num_options: Sequence[int | None] | None = None,
) -> dict[str, np.ndarray]:
    """Rewards for N decoded answers -> {"accuracy", "format", "reward"}, each float32 [N].

    reward = accuracy + format_weight * format. `num_options[i]`, when given, restricts the
    letters that count for output i to its options (A.. the n-th letter).
    """
    if len(outputs) != len(answers):
        raise ValueError(f"{len(outputs)} outputs but {len(answers)} answers")
    n_opts = list(num_options) if num_options is not None else [None] * len(outputs)
    if len(n_opts) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(n_opts)} num_options")
    acc = np.zeros(len(outputs), np.float32)
    fmt = np.zeros(len(outputs), np.float32)
    for i, (out, ans, k) in enumerate(zip(outputs, answers, n_opts, strict=True)):
        acc[i] = float(extract_choice(out, k) == _check_answer(ans, i))
        fmt[i] = float(format_ok(out))
    return {"accuracy": acc, "format": fmt, "reward": acc + np.float32(format_weight) * fmt}


# -- generation: CLIP-similarity scores on the accelerator ----------------------------------------

@dataclasses.dataclass
class ClipScore:
    """cos(image, text) with a CLIP: images [B, H, W, 3] or [B, G, H, W, 3] + B prompts -> [B(, G)].

    Images may be uint8 or float [-1, 1] (the VQ decoder's output) and stay on device. With a mesh,
    the image batch is sharded over ('data', 'fsdp') like the rollout's, and params are
    replicated, or placed by `param_rules` (train/sharding.py rules, e.g. ((".*", "fsdp"),) to
    spread ViT-H over the fsdp axis). `prompts` is the global batch's list (the same on every host).
    """

    config: clip.CLIPConfig
    params: Any
    tokenizer: Any
    mesh: Mesh | None = None
    param_rules: Sequence[tuple[str, Any]] | None = None
    image_size: int | None = None  # default: the config's

    def __post_init__(self):
        if self.mesh is not None:
            rules = self.param_rules or ((r".*", "replicate"),)
            self.params = sharding.shard_params(self.params, rules, self.mesh)
        self._jitted = jax.jit(self._scores)

    def _scores(self, params, images: jax.Array, ids: jax.Array) -> jax.Array:
        lead = images.shape[:-3]  # [B] or [B, G]
        flat = images.reshape((-1, *images.shape[-3:]))  # [N, H, W, 3]
        if self.mesh is not None:
            flat = jax.lax.with_sharding_constraint(flat, _batch_sharding(self.mesh, len(flat)))
        pixels = clip_processing.preprocess_images(flat, self.image_size or self.config.image_size)
        img = clip.image_features(self.config, params, pixels).reshape(*lead, -1)  # [B(, G), E]
        txt = clip.text_features(self.config, params, ids)  # [B, E]
        if len(lead) == 2:
            txt = txt[:, None, :]
        return jnp.sum(img * txt, axis=-1)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        ids = clip_processing.tokenize(self.tokenizer, prompts, self.config.context_length)
        if ids.max(initial=0) >= self.config.vocab_size:
            raise ValueError(
                f"the tokenizer gives token ids up to {ids.max()} but the CLIP has vocab_size "
                f"{self.config.vocab_size}: tokenizer and checkpoint do not belong together"
            )
        return ids

    def __call__(self, images: jax.Array, prompts: Sequence[str]) -> jax.Array:
        images = jnp.asarray(images) if isinstance(images, np.ndarray) else images
        if images.ndim not in (4, 5) or images.shape[0] != len(prompts):
            raise ValueError(
                f"images: expected [B, H, W, 3] or [B, G, H, W, 3] with B = len(prompts) = "
                f"{len(prompts)}, got shape {tuple(images.shape)}"
            )
        return self._jitted(self.params, images, jnp.asarray(self.tokenize(prompts)))


def _batch_sharding(mesh: Mesh, n: int) -> NamedSharding:
    """Leading dim over ('data', 'fsdp') when it divides their size; else replicated."""
    size = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    return sharding.batch_sharding(mesh) if n % size == 0 else NamedSharding(mesh, PartitionSpec())


ARCHITECTURES = {"vit_h_14": clip.vit_h_14, "vit_l_14": clip.vit_l_14, "tiny": clip.tiny}


def hpsv2_score(
    checkpoint: str,
    tokenizer: str | None = None,
    *,
    config: clip.CLIPConfig | str = "vit_h_14",
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    param_rules: Sequence[tuple[str, Any]] | None = None,
) -> ClipScore:
    """HPSv2: open_clip weights (`HPS_v2.1_compressed.pt`) on `config` (default ViT-H-14), with
    open_clip's tokenizer (`tokenizer`: bpe file or tokenizer dir; default: the installed
    open_clip_torch's)."""
    config = ARCHITECTURES[config]() if isinstance(config, str) else config
    config, params = clip_checkpoints.load_open_clip(checkpoint, config, dtype=dtype)
    tok = clip_processing.load_tokenizer(tokenizer)
    return ClipScore(config, params, tok, mesh=mesh, param_rules=param_rules)


def clip_score(
    path: str,
    tokenizer: str | None = None,
    *,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    param_rules: Sequence[tuple[str, Any]] | None = None,
) -> ClipScore:
    """CLIP score with a transformers CLIPModel directory (tokenizer: that directory by default)."""
    config, params = clip_checkpoints.load_hf_clip(path, dtype=dtype)
    tok = clip_processing.load_tokenizer(tokenizer or path)
    return ClipScore(config, params, tok, mesh=mesh, param_rules=param_rules)


# -- generation: the Shapes world checker ------------------------------------------------------

@dataclasses.dataclass
class ShapesScore:
    """The Shapes world's rule-based checker: fraction of the prompt's constraints met (or 0/1
    GenEval-strict correctness with `strict=True`). Runs on the host: pixels are fetched."""

    strict: bool = False
    world_config: Any = None  # pairuni_jax.data.shapes WorldConfig; None -> the world's default

    def __call__(self, images: jax.Array, prompts: Sequence[str]) -> np.ndarray:
        score_image = _shapes_score_image()
        pixels = np.asarray(images)
        if pixels.dtype != np.uint8:
            pixels = np.asarray(jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5).astype(jnp.uint8))
        lead = pixels.shape[:-3]
        if pixels.ndim not in (4, 5) or lead[0] != len(prompts):
            raise ValueError(
                f"images: expected [B, H, W, 3] or [B, G, H, W, 3] with B = len(prompts) = "
                f"{len(prompts)}, got shape {pixels.shape}"
            )
        per_row = int(np.prod(lead[1:])) if len(lead) > 1 else 1
        flat = pixels.reshape((-1, *pixels.shape[-3:]))
        kw = {} if self.world_config is None else {"cfg": self.world_config}
        out = np.zeros(len(flat), np.float32)
        for i, img in enumerate(flat):
            fraction, strict = score_image(img, prompts[i // per_row], **kw)
            out[i] = float(strict) if self.strict else fraction
        return out.reshape(lead)


def _shapes_score_image() -> Callable:
    """`score_image(pixels uint8 [H, W, 3], prompt) -> (fraction, strict)` of the Shapes world,
    imported on first use so the other rewards do not depend on the world module."""
    from pairuni_jax.data.shapes_checker import score_image

    return score_image


# -- the registry -------------------------------------------------------------------------------

def parse_generation_spec(spec: str | Mapping[str, float]) -> dict[str, float]:
    """"hpsv2" | "hpsv2,clip" | "hpsv2=0.7,clip=0.3" | {"hpsv2": 0.7, ...} -> {name: weight}."""
    if hasattr(spec, "items"):  # dict or ml_collections ConfigDict
        weights = {str(k): float(v) for k, v in spec.items()}
    else:
        weights = {}
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            name, _, w = part.partition("=")
            try:
                weights[name.strip()] = float(w) if w else 1.0
            except ValueError:
                raise ValueError(f"reward.generation: bad weight in {part!r} of {spec!r}") from None
    unknown = sorted(set(weights) - set(GENERATION_REWARDS))
    if not weights or unknown:
        raise ValueError(
            f"reward.generation: {spec!r} names unknown rewards {unknown}; "
            f"known: {sorted(GENERATION_REWARDS)}"
        )
    return weights


def _make_hpsv2(cfg: Mapping[str, Any], mesh: Mesh | None) -> ClipScore:
    return hpsv2_score(
        cfg["hpsv2_checkpoint"], cfg.get("hpsv2_tokenizer") or None,
        config=cfg.get("hpsv2_arch", "vit_h_14"), dtype=jnp.dtype(cfg.get("dtype", "float32")),
        mesh=mesh, param_rules=cfg.get("param_rules"),
    )


def _make_clip(cfg: Mapping[str, Any], mesh: Mesh | None) -> ClipScore:
    return clip_score(
        cfg["clip_path"], cfg.get("clip_tokenizer") or None,
        dtype=jnp.dtype(cfg.get("dtype", "float32")), mesh=mesh, param_rules=cfg.get("param_rules"),
    )


def _make_shapes(cfg: Mapping[str, Any], mesh: Mesh | None) -> ShapesScore:
    return ShapesScore(strict=bool(cfg.get("shapes_strict", False)))


# name -> factory(reward config mapping, mesh) -> callable(images, prompts) -> scores [B(, G)]
GENERATION_REWARDS: dict[str, Callable[[Mapping[str, Any], Mesh | None], Callable]] = {
    "hpsv2": _make_hpsv2,
    "clip": _make_clip,
    "shapes": _make_shapes,
}


@dataclasses.dataclass
class GenerationReward:
    """Weighted sum of named image rewards; returns (total, {name: score}) as float32 arrays."""

    rewards: dict[str, Callable]
    weights: dict[str, float]

    def __call__(self, images, prompts: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        parts = {n: np.asarray(fn(images, prompts), np.float32) for n, fn in self.rewards.items()}
        total = sum(np.float32(self.weights[n]) * s for n, s in parts.items())
        return np.asarray(total, np.float32), parts


def build_generation_reward(
    reward_config: Mapping[str, Any],
    *,
    mesh: Mesh | None = None,
    instances: Mapping[str, Callable] | None = None,
) -> GenerationReward:
    """The generation reward from the config's `reward` section.

    Fields: `generation` (spec, see `parse_generation_spec`); `hpsv2_checkpoint` (path to
    HPS_v2.1_compressed.pt), `hpsv2_tokenizer` (open_clip bpe file or tokenizer dir; default: the
    one inside an installed open_clip_torch), `hpsv2_arch` (a name in ARCHITECTURES, default
    "vit_h_14"); `clip_path` (transformers CLIP directory), `clip_tokenizer` (default: clip_path);
    `shapes_strict`; `dtype` ("float32" | "bfloat16"); `param_rules` (CLIP param placement).
    `instances` supplies already-built rewards by name (tests, notebooks) instead of loading them.
    """
    weights = parse_generation_spec(reward_config["generation"])
    instances = dict(instances or {})
    rewards = {
        name: instances[name] if name in instances else GENERATION_REWARDS[name](
            reward_config, mesh
        )
        for name in weights
    }
    return GenerationReward(rewards, weights)
