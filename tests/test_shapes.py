"""The Shapes world: rendering, prompts and their parser, questions, the checker, the held-out
split and the dataset writer."""

import hashlib
import itertools
import json
import os
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from pairuni_jax.data import pairug
from pairuni_jax.data.shapes import (
    HeldOut,
    aligned_item,
    generation_item,
    understanding_item,
    write_world,
)
from pairuni_jax.data.shapes_checker import MIN_FIT, detect, is_scene, score_image, score_images
from pairuni_jax.data.shapes_eval import geneval_accuracy, mc_accuracy
from pairuni_jax.data.shapes_render import (
    BACKGROUND,
    COLORS,
    PALETTE,
    SHAPES,
    ShapeObject,
    WorldConfig,
    clear_relation,
    min_palette_hue_gap,
    render,
)
from pairuni_jax.data.shapes_text import (
    GEN_CATEGORIES,
    LETTERS,
    MC_SUFFIX,
    NUMBER_WORDS,
    POSITION_OPTIONS,
    QUESTION_TAGS,
    RELATIONS,
    ObjectSpec,
    PromptSpec,
    format_prompt,
    parse_prompt,
)
from pairuni_jax.rl.rewards import extract_choice

CFG = WorldConfig()


def _options(text: str) -> dict[str, str]:
    lines = text.split("\n")
    assert lines[-1] == MC_SUFFIX
    opts = {}
    for line in lines[1:-1]:
        letter, option = line.split(". ", 1)
        opts[letter] = option
    assert list(opts) == list(LETTERS[: len(opts)])
    return opts


# ------------------------------------------------------------------------------------ rendering


def test_palette_is_well_separated():
    assert len(COLORS) >= 4
    assert min_palette_hue_gap() >= 45.0


def test_seed_fully_determines_items():
    for i in range(12):
        a, b = generation_item(3, i), generation_item(3, i)
        assert a == b
        np.testing.assert_array_equal(render(a.scene), render(b.scene))
        assert understanding_item(3, i) == understanding_item(3, i)
    assert generation_item(3, 0) != generation_item(4, 0)


def test_render_uses_only_palette_and_background():
    item = generation_item(0, 4)  # a position item: two objects
    img = render(item.scene, CFG.image_size)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    colours = {tuple(int(v) for v in c) for c in img.reshape(-1, 3)}
    assert colours == {BACKGROUND} | {PALETTE[o.color] for o in item.scene}
    # Scenes are resolution independent: the same scene at 48 px reads the same.
    big = WorldConfig(image_size=48)
    assert score_image(render(item.scene, 48), item.prompt, big) == (1.0, True)


def test_objects_do_not_overlap_and_stay_inside():
    for i in range(60):
        scene = generation_item(1, i).scene
        for o in scene:
            assert o.size / 2 + CFG.gap <= o.cx <= 1 - o.size / 2 - CFG.gap + 1e-9
            assert CFG.min_size <= o.size <= CFG.max_size
        for a, b in itertools.combinations(scene, 2):
            gap = max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - (a.size + b.size) / 2
            assert gap >= CFG.gap - 1e-9


# ------------------------------------------------------------------------------------ prompts


def _all_specs():
    for s in SHAPES:
        yield PromptSpec("single_object", (ObjectSpec(s),))
        for n in (1, 2, 3):
            yield PromptSpec("counting", (ObjectSpec(s, count=n),))
        for c in COLORS:
            yield PromptSpec("colors", (ObjectSpec(s, c),))
    for s1, s2 in itertools.permutations(SHAPES, 2):
        yield PromptSpec("two_object", (ObjectSpec(s1), ObjectSpec(s2)))
        yield PromptSpec("color_attr", (ObjectSpec(s1, "red"), ObjectSpec(s2, "blue")))
    for (s1, c1), (s2, c2) in itertools.permutations(itertools.product(SHAPES, COLORS[:2]), 2):
        for rel in RELATIONS:
            yield PromptSpec("position", (ObjectSpec(s1, c1), ObjectSpec(s2, c2)), rel)


def test_prompt_parser_inverts_formatting():
    specs = list(_all_specs())
    assert {s.category for s in specs} == set(GEN_CATEGORIES)
    for spec in specs:
        assert parse_prompt(format_prompt(spec)) == spec, format_prompt(spec)
    assert format_prompt(specs[-1]) == "a yellow triangle below a red triangle"
    assert parse_prompt("  A red Circle to the LEFT of a blue square. ") == PromptSpec(
        "position", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of")


@pytest.mark.parametrize("bad", ["", "a dog", "a red circle next to a square", "two circle",
                                 "a circles", "a circle and", "four circles", "a pink circle"])
def test_prompt_parser_rejects_other_text(bad):
    with pytest.raises(ValueError, match="not a Shapes world prompt"):
        parse_prompt(bad)


# ------------------------------------------------------------------------------------ checker


def test_checker_accuracy_on_ground_truth_per_category():
    """Fixed seeds, 100 rendered ground-truth images per category and split: >= 99% each."""
    images, prompts = [], []
    for split in ("train", "heldout"):
        for i in range(600):
            item = generation_item(11, i, split)
            images.append(render(item.scene, CFG.image_size))
            prompts.append(item.prompt)
    acc = geneval_accuracy(np.stack(images), prompts)
    print("checker accuracy on ground truth:", acc)
    for category in GEN_CATEGORIES:
        assert acc[category] >= 0.99, (category, acc)
    assert acc["constraints"] >= 0.99


def _obj(shape, color, cx, cy, size=0.3):
    return ShapeObject(shape, color, cx, cy, size)


def test_checker_reads_objects_back():
    scene = (_obj("circle", "red", 0.25, 0.25), _obj("square", "blue", 0.75, 0.25),
             _obj("triangle", "yellow", 0.5, 0.75, 0.35))
    dets = sorted(detect(render(scene)), key=lambda d: d.centroid)
    assert [(d.shape, d.color) for d in dets] == [
        ("circle", "red"), ("triangle", "yellow"), ("square", "blue")]
    np.testing.assert_allclose(dets[0].centroid, (0.25, 0.25), atol=1.0 / 32)
    np.testing.assert_allclose(dets[1].centroid, (0.5, 0.75 + 0.35 / 6), atol=1.0 / 32)
    assert detect(render(())) == []
    # Touching objects of different colours are one foreground component, split by colour.
    touching = (_obj("square", "red", 0.35, 0.5), _obj("square", "blue", 0.65, 0.5))
    dets = sorted(detect(render(touching)), key=lambda d: d.centroid)
    assert [(d.shape, d.color) for d in dets] == [("square", "red"), ("square", "blue")]


def test_checker_scores_partial_and_wrong_images():
    red_left = (_obj("circle", "red", 0.25, 0.5), _obj("square", "blue", 0.75, 0.5))
    img = render(red_left)
    assert score_image(img, "a red circle to the left of a blue square") == (1.0, True)
    # present, coloured (x2), relation: 5 constraints
    assert score_image(img, "a red circle to the right of a blue square") == (4 / 5, False)
    assert score_image(img, "a blue circle above a blue square") == (3 / 5, False)
    assert score_image(img, "a red circle and a blue square") == (1.0, True)
    assert score_image(img, "a green circle and a blue triangle") == (1 / 4, False)
    assert score_image(img, "a triangle") == (0.0, False)
    assert score_image(img, "two circles") == (0.5, False)  # one is present, the count is wrong
    for prompt in ("two circles", "one circle", "a red circle", "a circle above a square"):
        assert score_image(render(()), prompt) == (0.0, False)  # an empty canvas meets nothing
    three = red_left + (_obj("circle", "green", 0.5, 0.15, 0.25),)
    assert score_image(render(three), "one circle") == (0.5, False)
    assert score_image(render(three), "two circles") == (1.0, True)
    assert score_image(render(three), "three circles") == (0.5, False)
    frac, ok = score_images(np.stack([img, img]), ["a red circle", "a red square"])
    np.testing.assert_allclose(frac, [1.0, 0.5])
    np.testing.assert_array_equal(ok, [True, False])
    frac, ok = score_images([img, img], ["a red circle", "a red square"])  # a list of images too
    np.testing.assert_allclose(frac, [1.0, 0.5])
    np.testing.assert_array_equal(ok, [True, False])
    dets = [detect(img), detect(render(three))]  # detected once, scored against any prompts
    for prompts in (["a red circle", "two circles"], ["a triangle", "three circles"]):
        frac, ok = score_images(dets, prompts)
        want = [score_image(x, p) for x, p in zip((img, render(three)), prompts, strict=True)]
        assert list(zip(frac.tolist(), ok.tolist(), strict=True)) == want


def test_checker_gives_nothing_for_an_image_that_is_no_scene():
    """Clutter of blobs, each read as its nearest shape, used to meet "at least one X"
    constraints (a policy learned to draw it); an image that is no scene of the world now meets
    none: a blob that fits no shape, one too small to be an object, or more objects than a scene
    holds."""
    scene = (_obj("circle", "red", 0.25, 0.25), _obj("square", "blue", 0.75, 0.25))
    img = render(scene)
    assert score_image(img, "a red circle and a blue square") == (1.0, True)
    blob = img.copy()
    blob[18:30, 4:8] = blob[26:30, 4:16] = PALETTE["green"]  # an L: fits no template
    dets = detect(blob)
    assert len(dets) == 3 and min(d.fit for d in dets) < MIN_FIT and not is_scene(dets)
    assert score_image(blob, "a red circle and a blue square") == (0.0, False)
    four = scene + (_obj("triangle", "green", 0.25, 0.75), _obj("circle", "yellow", 0.75, 0.75))
    assert len(detect(render(four))) == 4
    assert score_image(render(four), "a green triangle") == (0.0, False)
    # A 4 px block fits the circle template perfectly, but is no object of the world.
    dot = render(())
    dot[10:14, 10:14] = PALETTE["red"]
    assert [(d.shape, d.color, d.fit) for d in detect(dot)] == [("circle", "red", 1.0)]
    assert score_image(dot, "a red circle") == (0.0, False)
    # Random palette cells over the background: many such blobs.
    rng = np.random.default_rng(0)
    colours = np.array(list(PALETTE.values()), np.uint8)
    cells = np.where(rng.random((8, 8, 1)) < 0.5, colours[rng.integers(0, 6, (8, 8))],
                     np.array(BACKGROUND, np.uint8))
    clutter = np.repeat(np.repeat(cells, 4, 0), 4, 1)  # [32, 32, 3]
    assert len(detect(clutter)) > 3
    for prompt in ("a circle", "two circles", "a red circle and a blue circle"):
        assert score_image(clutter, prompt) == (0.0, False)


def test_checker_survives_blur_and_noise():
    """Reconstructions are soft: a light blur plus noise must not change what is read."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    ok = []
    for i in range(120):
        item = generation_item(5, i)
        img = ndimage.gaussian_filter(render(item.scene).astype(np.float32), (0.5, 0.5, 0))
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        ok.append(score_image(img, item.prompt)[1])
    assert np.mean(ok) >= 0.97


# ------------------------------------------------------------------------------------ questions


def _truth(scene, question: str) -> str:
    """The right option text, recomputed from the scene and the question stem."""
    stem = question.split("\n")[0]
    words = stem.rstrip("?").split()
    if stem.startswith("What color is the"):
        return next(o.color for o in scene if o.shape == words[-1])
    if stem.startswith("What shape is the"):
        return next(o.shape for o in scene if o.color == words[-2])
    if stem == "How many objects are there?":
        return NUMBER_WORDS[len(scene)]
    if stem.startswith("How many"):
        return NUMBER_WORDS[sum(o.shape + "s" == words[2] for o in scene)]
    if stem.startswith("Where is the"):
        a = next(o for o in scene if (o.color, o.shape) == (words[3], words[4]))
        b = next(o for o in scene if (o.color, o.shape) == (words[-2], words[-1]))
        return POSITION_OPTIONS[clear_relation(a, b)]
    if stem.startswith("Is there a"):
        return "yes" if any((o.color, o.shape) == (words[3], words[4]) for o in scene) else "no"
    raise AssertionError(stem)


CANONICAL_OPTIONS = {"color": list(COLORS), "shape": list(SHAPES), "count": list(NUMBER_WORDS),
                     "position": list(POSITION_OPTIONS.values()), "existence": ["yes", "no"]}


@pytest.mark.parametrize("shuffle", [False, True])
def test_questions_are_answered_by_their_scene(shuffle):
    cfg = WorldConfig(shuffle_options=shuffle)
    tags, answers, yes, orders = Counter(), Counter(), Counter(), defaultdict(set)
    for i in range(250):
        item = understanding_item(2, i, cfg=cfg)
        q = item.question
        opts = _options(q.text)
        assert q.answer in opts
        assert opts[q.answer] == _truth(item.scene, q.text), q.text
        assert len(set(opts.values())) == len(opts)
        tags[q.tag] += 1
        answers[q.answer] += 1
        orders[q.tag].add(tuple(opts.values()))
        if q.tag == "existence":
            assert list(opts.values()) == ["yes", "no"]
            yes[opts[q.answer]] += 1
    assert set(tags) == set(QUESTION_TAGS) and min(tags.values()) == 50
    assert 15 <= yes["yes"] <= 35
    if shuffle:  # <= 4 options drawn from the canonical ones, in many orders
        for tag in ("color", "count", "position"):
            assert len(orders[tag]) > 10, tag
            assert all(len(o) == 4 and set(o) <= set(CANONICAL_OPTIONS[tag]) for o in orders[tag])
        assert min(answers[x] for x in "ABC") > 30  # letters are balanced by shuffling
    else:  # one order per tag: a letter always names the same answer
        assert {t: sorted(o) for t, o in orders.items()} == {
            t: [tuple(o)] for t, o in CANONICAL_OPTIONS.items()}


@pytest.mark.parametrize("split", ["train", "heldout", "test"])
def test_every_answer_is_equally_often_right_in_every_split(split):
    letters = defaultdict(Counter)
    for i in range(120):
        q = understanding_item(1, i, split).question
        letters[q.tag][q.answer] += 1
    for tag, n in zip(QUESTION_TAGS, (6, 3, 4, 4, 2), strict=True):
        assert len(letters[tag]) == n and max(letters[tag].values()) - min(
            letters[tag].values()) <= 1, (tag, letters[tag])


def test_aligned_pairs_share_a_scene_that_satisfies_the_prompt():
    for i in range(24):
        item = aligned_item(0, i)
        assert score_image(render(item.scene), item.prompt) == (1.0, True)
        assert _options(item.question.text)[item.question.answer] == _truth(
            item.scene, item.question.text)
    assert {aligned_item(0, i).spec.category for i in range(6)} == set(GEN_CATEGORIES)


# ------------------------------------------------------------------------------------ splits


def test_heldout_combinations_never_reach_training():
    held = HeldOut().keys()
    assert any(k[0] == "relation" for k in held) and any(k[0] == "count" for k in held)
    seen = defaultdict(set)
    for i in range(150):
        for make in (generation_item, understanding_item, aligned_item):
            train, heldout = make(0, i, "train"), make(0, i, "heldout")
            assert not train.keys() & held
            assert heldout.keys() & held
            for o in train.scene:
                assert (o.color, o.shape) not in HeldOut().color_shapes
            for k in heldout.keys() & held:
                seen[k[0]].add(k)
    assert len(seen["color_shape"]) == 3 and len(seen["relation"]) == 2 and seen["count"]


def test_the_test_split_is_new_scenes_from_the_training_distribution():
    held = HeldOut().keys()
    for make in (generation_item, understanding_item):
        train = [make(0, i, "train") for i in range(60)]
        test = [make(0, i, "test") for i in range(60)]
        assert not any(item.keys() & held for item in test)
        # Own random streams: item i of the test split is not item i of the training split.
        assert sum(a.scene == b.scene for a, b in zip(train, test, strict=True)) < 3


# ------------------------------------------------------------------------------------ writer


def _digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_write_world_outputs_valid_deterministic_files(tmp_path):
    kw = dict(train_size=30, train_pairs=12, heldout_size=10, heldout_pairs=6, test_size=8,
              seed=7, tokenizer=False)
    files = write_world(str(tmp_path / "a"), **kw)
    write_world(str(tmp_path / "b"), **kw)
    assert _digest(str(tmp_path / "a")) == _digest(str(tmp_path / "b"))

    expected = {"train": {"understanding": 30, "generation": 30, "aligned_pairs": 12},
                "heldout": {"understanding": 10, "generation": 10, "aligned_pairs": 6},
                "test": {"understanding": 8, "generation": 8, "aligned_pairs": 0}}
    for split, counts in expected.items():
        for name, n in counts.items():
            result = pairug.validate(files[f"{split}_{name}"])
            assert not result.errors, result.errors[:3]
            assert len(result.records) == n
    with open(files["train_aligned_pairs"]) as f:
        rec = json.loads(f.readline())
    assert rec["pair_type"] == "aligned" and rec["similarity"] == 1.0
    assert rec["generate_ann"]["image_path"] == rec["understand_ann"]["image_path"]
    assert rec["understand_ann"]["prompt"] == rec["generate_ann"]["prompt"]
    # The image on disk is the rendering of the recorded scene, and satisfies its prompt.
    with open(files["train_scenes"]) as f:
        scenes = {r["image_path"]: r["objects"] for r in map(json.loads, f)}
    path = rec["generate_ann"]["image_path"]
    pixels = np.asarray(Image.open(tmp_path / "a" / path))
    scene = tuple(ShapeObject(**o) for o in scenes[path])
    np.testing.assert_array_equal(pixels, render(scene))
    assert score_image(pixels, rec["generate_ann"]["prompt"]) == (1.0, True)
    world = json.loads((tmp_path / "a" / "world.json").read_text())
    assert world["seed"] == 7 and world["config"]["image_size"] == 32
    # world.json lists the held-out questions that name a held-out combination; no other split
    # has any, and a question naming a held-out colour-shape pair is among them.
    assert set(world["asks_heldout"]) == {"heldout"}
    named = set(world["asks_heldout"]["heldout"])
    held_names = [" ".join(pair) for pair in HeldOut().color_shapes]  # e.g. "red triangle"
    with open(files["heldout_understanding"]) as f:
        questions = [r["question"].split("\n")[0] for r in map(json.loads, f)]
    assert 0 < len(named) < len(questions)
    for i, question in enumerate(questions):
        if any(name in question for name in held_names):
            assert i in named, question


# ------------------------------------------------------------------------------------ eval


def test_eval_helpers():
    assert extract_choice("<think>red</think><answer> B </answer>") == "B"
    assert extract_choice("C. blue") == "C"
    assert extract_choice("(A)") == "A"
    assert extract_choice("I think so") is None
    acc = mc_accuracy(["A", None, "B", "B"], ["A", "A", "B", "C"], ["color", "color", "count",
                                                                    "count"])
    assert acc == {"color": 0.5, "count": 0.5, "overall": 0.5}
    blank = np.full((2, 32, 32, 3), 245, np.uint8)
    item = generation_item(0, 0)
    images = np.stack([render(item.scene), blank[0]])
    acc = geneval_accuracy(images, [item.prompt, "a red circle"])
    assert acc["single_object"] == 1.0 and acc["colors"] == 0.0 and acc["overall"] == 0.5
