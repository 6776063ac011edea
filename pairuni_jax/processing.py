"""Tokenizer, chat templates and image preprocessing, as the original Janus does them.

Prompts (REFERENCE.md §1, template "deepseek"):
  understanding  BOS "{system}\\n\\n<|User|>: <image_placeholder>\\n{question}\\n\\n<|Assistant|>:"
                 with the placeholder expanded to <begin_of_image> + N x <image_placeholder> +
                 <end_of_image> (N = 576 for the real model);
  generation     BOS "<|User|>: {prompt}\\n\\n<|Assistant|>:" + <begin_of_image>;
  answers        " {answer}" + EOS (the template writes "<|Assistant|>: {answer}" + EOS).
Every special-token id is read from the tokenizer (the 1B and 7B vocabularies differ).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)

SPECIAL_TOKENS = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "pad": "<｜▁pad▁｜>",
    "user": "<|User|>",
    "assistant": "<|Assistant|>",
    "image_start": "<begin_of_image>",
    "image_end": "<end_of_image>",
    "image_placeholder": "<image_placeholder>",
}

# The original pads images to a square with the normalisation mean as a byte: int(0.5 * 255).
PAD_COLOUR = (127, 127, 127)
MIN_SIDE = 14


def resized_size(width: int, height: int, target: int) -> tuple[int, int]:
    """(width, height) after scaling the long side to `target`, flooring as the original does; no
    side below MIN_SIDE (or `target`, when smaller).

    transformers' Janus image processor rounds instead, so the two differ by one pixel on the short
    side whenever its fractional part is >= 0.5.
    """
    long_side, min_side = max(width, height), min(MIN_SIDE, target)
    return (
        max(int(width / long_side * target), min_side),
        max(int(height / long_side * target), min_side),
    )


def letterbox(image: Image.Image | np.ndarray, image_size: int) -> np.ndarray:
    """RGB, long side to `image_size` (bicubic, antialiased, short side floored), centred on a
    square of PAD_COLOUR: uint8 [image_size, image_size, 3]."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 array [H, W, 3], got {image.dtype} {tuple(image.shape)}"
            )
        image = Image.fromarray(image)
    image = image.convert("RGB")
    width, height = resized_size(*image.size, image_size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    square = Image.new("RGB", (image_size, image_size), PAD_COLOUR)
    square.paste(image, ((image_size - width) // 2, (image_size - height) // 2))
    return np.asarray(square)


def preprocess_image(image: Image.Image | np.ndarray, image_size: int) -> np.ndarray:
    """Understanding preprocessing: `letterbox`, then scaled to [-1, 1].

    Returns float32 [image_size, image_size, 3].
    """
    pixels = letterbox(image, image_size).astype(np.float32) / 255.0  # [S, S, 3]
    return (pixels - 0.5) / 0.5


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Left-pad token lists to one length.

    Returns (ids int32 [B, L], mask bool [B, L]); mask is True on real tokens. `length` defaults to
    the longest sequence and must not be shorter than it.
    """
    longest = max((len(s) for s in seqs), default=0)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"pad length {length} is shorter than the longest sequence ({longest})")
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=bool)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = True
    return ids, mask


@dataclasses.dataclass
class JanusProcessor:
    """Tokenizer + chat templates + understanding image preprocessing of the original Janus."""

    tokenizer: object  # transformers.PreTrainedTokenizerBase
    image_size: int = 384
    num_image_tokens: int = 576
    system_prompt: str = SYSTEM_PROMPT

    def __post_init__(self):
        ids = {}
        missing = []
        for name, token in SPECIAL_TOKENS.items():
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            unk = getattr(self.tokenizer, "unk_token_id", None)
            if token_id is None or (unk is not None and token_id == unk and token != "unk"):
                missing.append(f"{name} {token!r}")
            ids[name] = token_id
        if missing:
            raise ValueError(f"tokenizer lacks Janus special tokens: {', '.join(missing)}")
        self.bos_id = ids["bos"]
        self.eos_id = ids["eos"]
        self.pad_id = ids["pad"]
        self.image_start_id = ids["image_start"]
        self.image_end_id = ids["image_end"]
        self.image_placeholder_id = ids["image_placeholder"]

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, image_size: int = 384, num_image_tokens: int = 576
    ) -> JanusProcessor:
        """Load a checkpoint directory's tokenizer (either Janus format) through transformers."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(os.fspath(path)), image_size, num_image_tokens)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def understanding_ids(self, question: str) -> list[int]:
        """BOS + system + user turn with the image placeholder expanded + "<|Assistant|>:".

        An empty `system_prompt` drops the system turn and its separator, as the original does.
        """
        user, assistant = SPECIAL_TOKENS["user"], SPECIAL_TOKENS["assistant"]
        marker = SPECIAL_TOKENS["image_placeholder"]
        system = f"{self.system_prompt}\n\n" if self.system_prompt else ""  # as the original
        text = f"{system}{user}: {marker}\n{question}\n\n{assistant}:"
        ids = [self.bos_id] + self._encode(text)
        if ids.count(self.image_placeholder_id) != 1:
            raise ValueError(f"the question must not contain {marker!r}: {question!r}")
        at = ids.index(self.image_placeholder_id)
        image = [self.image_start_id] + [self.image_placeholder_id] * self.num_image_tokens
        return ids[:at] + image + [self.image_end_id] + ids[at + 1 :]

    def generation_ids(self, prompt: str) -> list[int]:
        """BOS + "<|User|>: {prompt}\\n\\n<|Assistant|>:" + <begin_of_image> (no system prompt)."""
        user, assistant = SPECIAL_TOKENS["user"], SPECIAL_TOKENS["assistant"]
        return [self.bos_id] + self._encode(f"{user}: {prompt}\n\n{assistant}:") + [
            self.image_start_id
        ]

    def unconditional_ids(self, ids: Sequence[int]) -> list[int]:
        """The CFG unconditional prompt: every id but BOS and the final <begin_of_image> -> pad."""
        if len(ids) < 2 or ids[0] != self.bos_id or ids[-1] != self.image_start_id:
            raise ValueError("expected generation ids: BOS ... <begin_of_image>")
        return [ids[0]] + [self.pad_id] * (len(ids) - 2) + [ids[-1]]

    def answer_ids(self, answer: str) -> list[int]:
        """The assistant's answer as the template writes it: " {answer}" + EOS."""
        return self._encode(f" {answer}") + [self.eos_id]

    def preprocess_image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Understanding preprocessing at this processor's size: float32 [S, S, 3] in [-1, 1]."""
        return preprocess_image(image, self.image_size)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids back to text."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
