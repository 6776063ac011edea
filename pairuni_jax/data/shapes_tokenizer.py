"""The Shapes world's word-level tokenizer, saved in the Hugging Face format so the real loading
path (transformers.AutoTokenizer, then JanusProcessor.from_pretrained) reads it unchanged.

    python -m pairuni_jax.data.shapes_tokenizer --out /tmp/shapes/tokenizer

Pre-tokenisation: every "\\n" and every punctuation mark is its own piece; a space becomes a "Ġ"
prefix on the next word (as in SentencePiece or GPT-2), so
"<|User|>: a red circle\\n\\n<|Assistant|>:" is
`<|User|>` `:` `Ġa` `Ġred` `Ġcircle` `\\n` `\\n` `<|Assistant|>` `:`
and decoding restores the exact text. The vocabulary holds each world word, letter, digit and mark
with and without "Ġ"; anything else (free text) becomes <unk>. Janus's special tokens are special
(skipped when decoding with skip_special_tokens); the answer markup (<think>, </think>, <answer>,
</answer>) is matched whole but is not special, so rewards can read it from decoded text.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from pairuni_jax.data.shapes_text import world_words
from pairuni_jax.processing import SPECIAL_TOKENS, SYSTEM_PROMPT

UNK = "<unk>"
# Not "▁": Janus's special tokens contain "▁", which a "▁" decoder would turn into spaces.
SPACE = "Ġ"
ANSWER_MARKUP = ("<think>", "</think>", "<answer>", "</answer>")
PUNCTUATION = tuple(".,:;?!'\"()-")
# Words of common answers and reasoning that are not in prompts or questions.
EXTRA_WORDS = ("Answer", "answer", "The", "the", "it", "is", "are", "There", "there", "of", "so",
               "Yes", "No", "yes", "no", "I", "see", "image", "object", "objects", "color", "shape")
_SPECIALS = (SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"], UNK,
             SPECIAL_TOKENS["user"], SPECIAL_TOKENS["assistant"], SPECIAL_TOKENS["image_start"],
             SPECIAL_TOKENS["image_end"], SPECIAL_TOKENS["image_placeholder"])


def vocabulary() -> list[str]:
    """All token strings in id order: specials, answer markup, then pieces with and without Ġ."""
    words = set(world_words()) | set(EXTRA_WORDS) | set(re.findall(r"\w+", SYSTEM_PROMPT))
    words |= set(string.ascii_uppercase) | set(string.ascii_lowercase) | set(string.digits)
    pieces = sorted(words) + list(PUNCTUATION)
    return list(_SPECIALS) + list(ANSWER_MARKUP) + ["\n", SPACE] + [
        p for w in pieces for p in (w, SPACE + w)]


def build_tokenizer() -> Tokenizer:
    """The `tokenizers` object: WordLevel model, pre-tokeniser and decoder described above."""
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n|[^\w\s" + SPACE + r"]"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    bos = SPECIAL_TOKENS["bos"]
    # Like the real Janus (Llama) tokenizer: BOS first when add_special_tokens=True.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return tok


def save_tokenizer(out_dir: str) -> str:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns out_dir."""
    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ANSWER_MARKUP])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=UNK,
        additional_special_tokens=[SPECIAL_TOKENS[k] for k in
                                   ("user", "assistant", "image_start", "image_end",
                                    "image_placeholder")],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=4096,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    # transformers 5 keeps these in tokenizer_config.json; older readers look here.
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"],
                   "pad_token": SPECIAL_TOKENS["pad"], "unk_token": UNK,
                   "additional_special_tokens": list(_SPECIALS[4:])},
                  f, indent=1, ensure_ascii=False)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the Shapes world tokenizer.")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    print(save_tokenizer(args.out))


if __name__ == "__main__":
    main()
