"""The Shapes world tokenizer: saved in the Hugging Face format, loaded through AutoTokenizer and
JanusProcessor, covering every prompt and question of the world without <unk>."""

import os

import pytest
from transformers import AutoTokenizer

from pairuni_jax.data.shapes import aligned_item, generation_item, understanding_item
from pairuni_jax.data.shapes_tokenizer import ANSWER_MARKUP, UNK, save_tokenizer
from pairuni_jax.processing import SPECIAL_TOKENS, JanusProcessor


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_tokenizer(str(tmp_path_factory.mktemp("shapes_tok")))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_saved_files(tok_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.exists(os.path.join(tok_dir, name)), name


def test_special_tokens_are_single_distinct_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in list(SPECIAL_TOKENS.values()) + [UNK]]
    assert len(set(ids)) == len(ids)
    assert tok.bos_token == SPECIAL_TOKENS["bos"] and tok.eos_token == SPECIAL_TOKENS["eos"]
    assert tok.pad_token == SPECIAL_TOKENS["pad"]
    for t in list(SPECIAL_TOKENS.values()) + list(ANSWER_MARKUP):
        assert tok.encode(t, add_special_tokens=False) == [tok.convert_tokens_to_ids(t)], t
    assert tok.encode("a", add_special_tokens=True)[0] == tok.bos_token_id  # like Llama's


def test_generation_template_tokenises_cleanly(tok):
    text = "<|User|>: a red circle to the left of a blue square\n\n<|Assistant|>:"
    pieces = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    assert pieces == ["<|User|>", ":", "Ġa", "Ġred", "Ġcircle", "Ġto", "Ġthe", "Ġleft", "Ġof",
                      "Ġa", "Ġblue", "Ġsquare", "\n", "\n", "<|Assistant|>", ":"]


def test_world_text_round_trips_without_unk(tok):
    texts = []
    for i in range(60):
        texts += [generation_item(0, i).prompt, understanding_item(0, i).question.text,
                  aligned_item(0, i, "heldout").prompt]
    texts.append("<think>the circle is red</think><answer>B</answer>")
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    assert tok.unk_token_id in tok.encode("a zebra", add_special_tokens=False)


def test_janus_processor_loads_it(tok_dir):
    proc = JanusProcessor.from_pretrained(tok_dir, image_size=32, num_image_tokens=64)
    tok = proc.tokenizer
    question = understanding_item(0, 3).question.text
    ids = proc.understanding_ids(question)
    assert ids[0] == proc.bos_id and ids.count(proc.image_placeholder_id) == 64
    assert tok.unk_token_id not in ids  # the system prompt is in the vocabulary too
    assert question in proc.decode(ids, skip_special_tokens=False)
    gen = proc.generation_ids("two circles")
    assert gen[0] == proc.bos_id and gen[-1] == proc.image_start_id
    answer = proc.answer_ids("<answer>C</answer>")
    assert answer[-1] == proc.eos_id
    assert proc.decode(answer) == " <answer>C</answer>"  # markup survives skip_special_tokens
