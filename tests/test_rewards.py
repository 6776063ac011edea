"""Rewards: MC answer extraction on tricky outputs, the generation registry, CLIP/HPSv2-style scores
against transformers' CLIPModel, the same scores on an 8-device mesh, and the Shapes checker."""

from __future__ import annotations

import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_clip import _torch_reference, tiny_hf_model

from pairuni_jax import clip_checkpoints, clip_processing
from pairuni_jax.rl import rewards
from pairuni_jax.train import sharding

# -- understanding ---------------------------------------------------------------------------

CHOICES = [
    # (output, letter it commits to or None)
    ("<answer>B</answer>", "B"),
    ("<think>colour is red so</think><answer>B</answer>", "B"),
    ("<think>A looks wrong</think>\n<answer> c </answer>", "C"),
    ("<answer>(B)</answer>", "B"),
    ("<answer>B.</answer>", "B"),
    ("<answer>**b**</answer>", "B"),
    ("<answer>B. a red circle</answer>", "B"),
    ("<answer>The answer is D</answer>", "D"),
    ("<ANSWER>A</ANSWER>", "A"),
    ("B", "B"),
    ("  b \n", "B"),
    ("(C)", "C"),
    ("A. yes", "A"),
    ("The answer is B.", "B"),
    ("answer: (c)", "C"),
    ("Answer: D", "D"),
    ("The correct option is A because it is red.", "A"),
    ("<think>maybe C</think> B", "B"),  # the think block is not the answer
    ("CHOICES: B", "B"),
    ("Option (B) is correct", "B"),
    ("<answer>b) yes</answer>", "B"),
    # no letter
    ("<answer>B</answer><answer>C</answer>", None),  # two answers
    ("<answer>B</answer> <answer>B</answer>", None),  # two answers, even if equal
    ("<answer>B", None),  # unclosed
    ("B</answer>", None),
    ("<answer></answer>", None),
    ("", None),
    ("Because the circle is red", None),  # a letter inside a word
    ("Blue", None),
    ("I think it is the red one", None),
    ("the answer is a red circle", None),  # lower-case article, not an option
    ("answer is B, no wait, the answer is C", None),  # two different letters
    ("<answer>B or C</answer>", None),
    ("<answer>BC</answer>", None),
    ("<answer>A, B</answer>", None),
    ("choices are red and blue", None),  # a plural keyword followed by a word
    ("<think>The answer is C</think>", None),  # only inside the think block
]


@pytest.mark.parametrize("output, letter", CHOICES)
def test_extract_choice(output, letter):
    assert rewards.extract_choice(output) == letter


def test_letters_outside_the_options_do_not_count():
    assert rewards.extract_choice("<answer>E</answer>", num_options=4) is None
    assert rewards.extract_choice("<answer>D</answer>", num_options=4) == "D"


def test_understanding_rewards_accuracy_and_format():
    outputs = [
        "<think>red</think><answer>B</answer>",  # right, well formed
        "<answer>B</answer>",  # right, no think block
        "<think>red</think><answer>C</answer>",  # wrong, well formed
        "<think>x</think><answer>b</answer> trailing",  # right, text after the answer
        "<think>x</think><think>y</think><answer>B</answer>",  # right, two think blocks
        "<think>x</think><answer>maybe</answer>",  # no letter
    ]
    out = rewards.understanding_rewards(outputs, ["B"] * 6, format_weight=0.5)
    np.testing.assert_array_equal(out["accuracy"], [1, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(out["format"], [1, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(out["reward"], [1.5, 1, 0.5, 1, 1, 0])
    assert out["reward"].dtype == np.float32
    plain = rewards.understanding_rewards(outputs, [" b "] * 6)
    np.testing.assert_array_equal(plain["reward"], plain["accuracy"])


def test_understanding_rewards_reject_bad_input():
    with pytest.raises(ValueError, match=r"answers\[1\]: expected one option letter"):
        rewards.understanding_rewards(["A", "B"], ["A", "yes"])
    with pytest.raises(ValueError, match="2 outputs but 1 answers"):
        rewards.understanding_rewards(["A", "B"], ["A"])


# -- registry ----------------------------------------------------------------------------------

def test_parse_generation_spec():
    assert rewards.parse_generation_spec("hpsv2") == {"hpsv2": 1.0}
    assert rewards.parse_generation_spec("hpsv2=0.7, clip=0.3") == {"hpsv2": 0.7, "clip": 0.3}
    assert rewards.parse_generation_spec({"shapes": 2}) == {"shapes": 2.0}
    with pytest.raises(ValueError, match=r"unknown rewards \['pickscore'\]"):
        rewards.parse_generation_spec("hpsv2,pickscore")
    with pytest.raises(ValueError, match="bad weight"):
        rewards.parse_generation_spec("clip=high")
    with pytest.raises(ValueError, match="unknown rewards"):
        rewards.parse_generation_spec("")


# -- CLIP scores on the accelerator -----------------------------------------------------------

MERGES = ["#version: 0.2", "a t</w>", "c at</w>", "r e", "re d</w>", "b l", "bl u", "blu e</w>"]
PROMPTS = ["a red cat", "a blue square", "two cats"]


@pytest.fixture(scope="module")
def clip_scorer_parts(torch, tmp_path_factory):
    """A tiny transformers CLIPModel over a locally built BPE vocabulary, loaded by our loader."""
    tmp = tmp_path_factory.mktemp("clip")
    bpe = tmp / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("\n".join(MERGES))
    tok = clip_processing.load_tokenizer(str(bpe))
    vocab_size = len(tok.get_vocab())
    model = tiny_hf_model(torch, eos_token_id=tok.eos_token_id, vocab_size=vocab_size)
    model.save_pretrained(tmp / "model")
    config, params = clip_checkpoints.load_hf_clip(str(tmp / "model"))
    return model, config, params, tok


@pytest.fixture(scope="module")
def scorer(clip_scorer_parts):
    _, config, params, tok = clip_scorer_parts
    return rewards.ClipScore(config, params, tok)  # one instance: compiled once per input shape


def _torch_pixels(torch, images):
    """HPSv2's preprocessing in torch of images [B, G, H, W, 3] -> [B*G, 32, 32, 3]."""
    flat = images.reshape(-1, *images.shape[-3:])
    return np.stack([_torch_reference(torch, im, size=32) for im in flat])


def _reference_scores(torch, model, tok, images, prompts):
    """transformers CLIPModel on HPSv2's preprocessing: diag(norm(img) @ norm(txt).T) per row."""
    b, g = images.shape[:2]
    pixels = _torch_pixels(torch, images)
    ids = clip_processing.tokenize(tok, prompts, context_length=16)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        txt = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    img = torch.nn.functional.normalize(img.pooler_output, dim=-1).reshape(b, g, -1)
    txt = torch.nn.functional.normalize(txt.pooler_output, dim=-1)
    return torch.einsum("bge,be->bg", img, txt).numpy()


def _images(b=3, g=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, g, 48, 48, 3), dtype=np.uint8)


def test_clip_score_matches_transformers(torch, clip_scorer_parts, scorer):
    model, _, _, tok = clip_scorer_parts
    images = _images()
    ours = np.asarray(scorer(jnp.asarray(images), PROMPTS))
    assert ours.shape == (3, 2)
    ref = _reference_scores(torch, model, tok, images, PROMPTS)
    assert np.abs(ours - ref).max() < 1e-5
    # [B, H, W, 3] (one image per prompt) of float [-1, 1] pixels gives the same scores
    as_float = jnp.asarray(images[:, 0], jnp.float32) / 127.5 - 1
    assert np.abs(np.asarray(scorer(as_float, PROMPTS)) - ours[:, 0]).max() < 1e-5
    with pytest.raises(ValueError, match="len\\(prompts\\) = 2"):
        scorer(jnp.asarray(images), PROMPTS[:2])


def test_clip_score_on_an_8_device_mesh_equals_one_device(clip_scorer_parts, scorer):
    _, config, params, tok = clip_scorer_parts
    images = _images(b=8, g=2, seed=1)
    prompts = PROMPTS + ["red", "cat", "blue cat", "a", "at"]
    single = np.asarray(scorer(jnp.asarray(images), prompts))
    mesh = sharding.make_mesh(data=4, fsdp=2)
    scorer = rewards.ClipScore(config, params, tok, mesh=mesh, param_rules=((r".*", "fsdp"),))
    batch = jax.device_put(jnp.asarray(images), sharding.batch_sharding(mesh))
    sharded = scorer(batch, prompts)
    assert len(sharded.sharding.device_set) == 8
    assert np.abs(np.asarray(sharded) - single).max() < 1e-5


def test_generation_reward_combines_weighted_scores(scorer):
    images = jnp.asarray(_images())
    clip_score = scorer
    constant = lambda imgs, prompts: np.full(imgs.shape[:2], 0.25, np.float32)  # noqa: E731
    reward = rewards.build_generation_reward(
        {"generation": "clip=2,shapes=4"}, instances={"clip": clip_score, "shapes": constant}
    )
    total, parts = reward(images, PROMPTS)
    np.testing.assert_allclose(total, 2 * np.asarray(clip_score(images, PROMPTS)) + 1, rtol=1e-6)
    assert set(parts) == {"clip", "shapes"} and total.shape == (3, 2)


def test_hpsv2_end_to_end_matches_open_clip(torch, tmp_path):
    """HPSv2 path: open_clip checkpoint saved like HPS_v2.1_compressed.pt, open_clip tokenizer and
    HPSv2's preprocessing in torch, score = diag(image_features @ text_features.T)."""
    from test_clip import _simple_tokenizer_cls, tiny_open_clip_model

    from pairuni_jax.models import clip

    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("\n".join(MERGES))
    vocab_size = 512 + len(MERGES) - 1 + 2
    model = tiny_open_clip_model(torch, vocab_size=vocab_size)
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)

    images = _images()
    pixels = _torch_pixels(torch, images)
    ids = _simple_tokenizer_cls()(bpe_path=str(bpe))(PROMPTS, context_length=16)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), ids)  # normalised features
    ref = torch.einsum("bge,be->bg", out[0].reshape(3, 2, -1), out[1]).numpy()

    scorer = rewards.hpsv2_score(str(ckpt), str(bpe), config=clip.tiny(vocab_size=vocab_size))
    ours = np.asarray(scorer(jnp.asarray(images), PROMPTS))
    assert np.abs(ours - ref).max() < 1e-5

    small = rewards.hpsv2_score(str(ckpt), str(bpe), config=clip.tiny(vocab_size=vocab_size))
    small.config = clip.tiny(vocab_size=99)
    with pytest.raises(ValueError, match="token ids up to 5.. but the CLIP has vocab_size 99"):
        small.tokenize(PROMPTS)
    # the registry entry reads its fields from the config; ViT-H-14 is the default architecture
    cfg = {"generation": "hpsv2", "hpsv2_checkpoint": str(ckpt), "hpsv2_tokenizer": str(bpe)}
    with pytest.raises(clip_checkpoints.CheckpointError, match="problems"):
        rewards.build_generation_reward(cfg)


# -- Shapes -----------------------------------------------------------------------------------

def test_shapes_reward_scores_rendered_scenes():
    shapes = pytest.importorskip("pairuni_jax.data.shapes")
    from pairuni_jax.data.shapes_render import render

    items = [shapes.generation_item(seed=0, index=i) for i in range(6)]  # one per category
    images = np.stack([render(it.scene, 32) for it in items])  # [6, 32, 32, 3] uint8
    prompts = [it.prompt for it in items]
    score = rewards.ShapesScore()
    np.testing.assert_array_equal(score(images, prompts), np.ones(6, np.float32))
    blank = np.full_like(images, 255)
    assert (score(blank, prompts) < 1).all()
    # [B, G, ...] layout: G images per prompt, scored against that prompt
    grouped = np.stack([images, blank], axis=1)  # [6, 2, 32, 32, 3]
    out = score(grouped, prompts)
    assert out.shape == (6, 2) and (out[:, 0] == 1).all() and (out[:, 1] < 1).all()
    strict = rewards.ShapesScore(strict=True)(blank, prompts)
    np.testing.assert_array_equal(strict, np.zeros(6, np.float32))
