"""Chat templates, CFG prompts and image preprocessing against the original Janus's definitions."""

import numpy as np
import pytest
from PIL import Image
from tiny_tokenizer import save_tiny_tokenizer

from pairuni_jax.processing import (
    SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    JanusProcessor,
    pad_left,
    preprocess_image,
    resized_size,
)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return JanusProcessor.from_pretrained(path, image_size=32, num_image_tokens=4)


def test_special_ids_are_read_from_the_tokenizer(processor):
    tok = processor.tokenizer
    assert processor.bos_id == tok.convert_tokens_to_ids(SPECIAL_TOKENS["bos"])
    assert processor.image_start_id == tok.convert_tokens_to_ids(SPECIAL_TOKENS["image_start"])
    assert len({processor.bos_id, processor.eos_id, processor.pad_id, processor.image_start_id,
                processor.image_end_id, processor.image_placeholder_id}) == 6


def test_understanding_template_matches_the_original(processor):
    question = "What colour is the circle?\nA. red\nB. blue"
    ids = processor.understanding_ids(question)
    assert ids[0] == processor.bos_id and ids.count(processor.bos_id) == 1
    start = ids.index(processor.image_start_id)
    assert ids[start + 1 : start + 5] == [processor.image_placeholder_id] * 4
    assert ids[start + 5] == processor.image_end_id
    assert ids.count(processor.image_placeholder_id) == 4
    # Collapsing the expanded image back to one placeholder gives the original's sft format.
    collapsed = ids[1:start] + [processor.image_placeholder_id] + ids[start + 6 :]
    text = processor.decode(collapsed, skip_special_tokens=False)
    assert text == (
        f"{SYSTEM_PROMPT}\n\n<|User|>: <image_placeholder>\n{question}\n\n<|Assistant|>:"
    )


def test_empty_system_prompt_drops_the_system_turn(processor):
    import dataclasses

    bare = dataclasses.replace(processor, system_prompt="")
    ids = bare.understanding_ids("Q?")
    start = ids.index(bare.image_start_id)
    collapsed = ids[1:start] + [bare.image_placeholder_id] + ids[start + 6 :]
    assert bare.decode(collapsed, skip_special_tokens=False) == (
        "<|User|>: <image_placeholder>\nQ?\n\n<|Assistant|>:"
    )


def test_generation_and_unconditional_prompts(processor):
    ids = processor.generation_ids("a red circle")
    assert ids[0] == processor.bos_id and ids[-1] == processor.image_start_id
    assert processor.decode(ids[1:-1], skip_special_tokens=False) == (
        "<|User|>: a red circle\n\n<|Assistant|>:"
    )
    uncond = processor.unconditional_ids(ids)
    assert len(uncond) == len(ids)
    assert uncond[0] == processor.bos_id and uncond[-1] == processor.image_start_id
    assert set(uncond[1:-1]) == {processor.pad_id}
    with pytest.raises(ValueError, match="BOS"):
        processor.unconditional_ids(ids[1:])


def test_answer_ids_end_with_eos(processor):
    ids = processor.answer_ids("B")
    assert ids[-1] == processor.eos_id
    assert processor.decode(ids[:-1], skip_special_tokens=False) == " B"


def test_missing_special_tokens_are_named(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(ValueError, match="image_start '<begin_of_image>'"):
        JanusProcessor(fast)


def test_pad_left():
    ids, mask = pad_left([[1, 2, 3], [4]], pad_id=0)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])
    ids, mask = pad_left([[7]], pad_id=9, length=3)
    np.testing.assert_array_equal(ids, [[9, 9, 7]])
    with pytest.raises(ValueError, match="shorter"):
        pad_left([[1, 2]], pad_id=0, length=1)


def _odd_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hf_processor():
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    # The real checkpoints' preprocessor_config.json: mean = std = 0.5 (so the pad colour is 127).
    return JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.mark.parametrize("width,height", [(517, 290), (290, 517), (383, 129), (700, 700), (97, 61)])
def test_preprocessing_equals_transformers_where_rounding_agrees(width, height):
    size = resized_size(width, height, 384)
    exact = (width / max(width, height) * 384, height / max(width, height) * 384)
    assert all(round(x) == s for x, s in zip(exact, size, strict=True)), "pick sizes that agree"
    image = _odd_image(width, height, seed=width * height)
    ours = preprocess_image(image, 384)
    theirs = _hf_processor()(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert ours.shape == (384, 384, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("width,height", [(500, 333), (333, 500)])
def test_preprocessing_floors_where_transformers_rounds(width, height):
    # 333 / 500 * 384 = 255.74: the original keeps 255 rows, transformers 256.
    assert sorted(resized_size(width, height, 384)) == [255, 384]
    image = _odd_image(width, height, seed=3)
    ours = preprocess_image(image, 384)
    theirs = _hf_processor()(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    pad = np.float32(127 / 255 - 0.5) / 0.5
    # The original pads (384 - 255) // 2 = 64 rows on top, transformers (384 - 256) // 2 = 64.
    axis = 0 if height < width else 1
    ours_pad = np.take(ours, np.arange(64 + 255, 384), axis=axis)
    theirs_pad = np.take(theirs, np.arange(64 + 256, 384), axis=axis)
    np.testing.assert_allclose(ours_pad, pad, atol=1e-6)
    np.testing.assert_allclose(theirs_pad, pad, atol=1e-6)
    # transformers' extra row is image where the original already pads.
    assert not np.allclose(np.take(theirs, [64 + 255], axis=axis), pad)
    assert not np.allclose(np.take(ours, [64 + 254], axis=axis), pad)


def test_preprocessing_accepts_arrays_and_checks_them():
    array = np.asarray(_odd_image(50, 40, seed=1))
    from_pil = preprocess_image(Image.fromarray(array), 32)
    np.testing.assert_array_equal(preprocess_image(array, 32), from_pil)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(array.astype(np.float32), 32)
