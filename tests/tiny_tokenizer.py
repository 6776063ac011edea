"""A small byte-level BPE tokenizer with Janus's special tokens, saved like a real checkpoint's."""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pairuni_jax.processing import SPECIAL_TOKENS, SYSTEM_PROMPT

CORPUS = [
    SYSTEM_PROMPT,
    "What colour is the circle? A. red B. blue C. green D. yellow",
    "Answer with the option's letter from the given choices directly.",
    "a photo of a red circle to the left of a blue square",
    "A portrait of young girl. masterpiece, film grained, best quality.",
]


def save_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a few sentences, add the special tokens, save_pretrained to `path`.

    Byte-level BPE decodes back to the exact input text, as the real DeepSeek tokenizer does.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        additional_special_tokens=specials[3:],
    )
    fast.save_pretrained(os.fspath(path))
    return fast
