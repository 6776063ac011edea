"""The Shapes world: seeded items (scene + prompt and/or question), the held-out and test splits,
and the dataset writer.

    python -m pairuni_jax.data.shapes --out /tmp/shapes --seed 0

writes images and JSONL files in the shared formats (paths relative to --out):
    images/{split}/{und,gen,pair}_NNNNN.png
    {split}_understanding.jsonl   {"image_path", "question", "answer", "tag"}
    {split}_generation.jsonl      {"image_path", "prompt", "tag"}
    {split}_aligned_pairs.jsonl   PairUG records, pair_type "aligned" (prompt, question: one scene)
    {split}_scenes.jsonl          {"image_path", "objects": [...]}: ground truth for debugging
    world.json                    the config, held-out combinations, seed and file list, and
                                  `asks_heldout`: per split, the understanding items whose
                                  question is about a held-out combination (line indices)
    tokenizer/                    the world's word-level tokenizer (see shapes_tokenizer.py)
with split in {train, heldout, test}. Understanding and generation sets use disjoint scenes, so
the pairing command can build retrieved pairs between them.

Held-out split (compositional generalisation): a set of colour-shape pairs, relation triples and
counted shapes is held back. No training image shows a held-out colour-shape pair and no training
text names a held-out combination; every held-out item shows or names at least one. A question
about one (naming it, or asking for the half it does not name) asks the policy to bind what it
never saw together; one whose image alone shows one, to read a new scene (world.json's
`asks_heldout` tells them apart).

In every split each answer of a question type is right equally often (the item's index fixes
its answer letter), so an answer prior learnt on one split scores chance, not more or less, on
another.

Test split (in-distribution): new scenes drawn by the training rule (no held-out combination),
from their own random streams; it measures what training teaches on the distribution it saw.
It has understanding and generation items and no aligned pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pairuni_jax.data.shapes_render import (
    DEFAULT_WORLD,
    SHAPES,
    Scene,
    WorldConfig,
    clear_relation,
    place,
    render,
)
from pairuni_jax.data.shapes_text import (
    GEN_CATEGORIES,
    LETTERS,
    QUESTION_TAGS,
    ObjectSpec,
    PromptSpec,
    Question,
    color_shape_key,
    count_key,
    format_prompt,
    make_question,
    option_count,
    prompt_keys,
    relation_key,
    scene_keys,
)

SPLITS = ("train", "heldout", "test")
_SPLIT_IDS = {"train": 0, "heldout": 1, "test": 2}
_KIND_IDS = {"und": 0, "gen": 1, "pair": 2}

# For aligned pairs, questions whose answer the prompt states come first.
_PAIR_TAGS = {
    "single_object": ("shape", "existence"),
    "two_object": ("shape", "existence", "count"),
    "counting": ("count",),
    "colors": ("color",),
    "position": ("position", "color"),
    "color_attr": ("color", "shape"),
}


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Combinations kept out of training (relations in canonical form: "left of" / "above")."""

    color_shapes: tuple[tuple[str, str], ...] = (
        ("red", "triangle"), ("blue", "circle"), ("green", "square"))
    relations: tuple[tuple[str, str, str], ...] = (
        ("circle", "above", "square"), ("triangle", "left of", "circle"))
    counts: tuple[tuple[str, int], ...] = (("triangle", 3),)

    def keys(self) -> frozenset:
        return frozenset(
            [color_shape_key(c, s) for c, s in self.color_shapes]
            + [relation_key(a, r, b) for a, r, b in self.relations]
            + [count_key(s, n) for s, n in self.counts])


DEFAULT_HELDOUT = HeldOut()


@dataclasses.dataclass(frozen=True)
class Item:
    """One scene with its generation prompt and/or understanding question."""

    scene: Scene
    spec: PromptSpec | None = None
    question: Question | None = None

    @property
    def prompt(self) -> str | None:
        return None if self.spec is None else format_prompt(self.spec)

    def keys(self) -> frozenset:
        keys = set(scene_keys(self.scene))
        if self.spec is not None:
            keys |= prompt_keys(self.spec)
        if self.question is not None:
            keys |= self.question.keys
        return frozenset(keys)


def item_rng(seed: int, split: str, kind: str, index: int) -> np.random.Generator:
    """The generator that fully determines item `index` of a (split, kind)."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], _KIND_IDS[kind], index])


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[rng.integers(len(seq))]


def sample_prompt_scene(category: str, rng: np.random.Generator,
                        cfg: WorldConfig = DEFAULT_WORLD) -> tuple[Scene, PromptSpec]:
    """A prompt of the category and a scene that satisfies it (the ground truth)."""
    colors = cfg.colors

    def two_shapes():
        i, j = rng.choice(len(SHAPES), 2, replace=False)
        return SHAPES[i], SHAPES[j]

    if category == "single_object":
        shape = _pick(rng, SHAPES)
        return place(rng, [(shape, _pick(rng, colors))], cfg), PromptSpec(
            category, (ObjectSpec(shape),))
    if category == "two_object":
        s1, s2 = two_shapes()
        attrs = [(s1, _pick(rng, colors)), (s2, _pick(rng, colors))]
        return place(rng, attrs, cfg), PromptSpec(category, (ObjectSpec(s1), ObjectSpec(s2)))
    if category == "counting":
        shape, n = _pick(rng, SHAPES), int(rng.integers(2, cfg.max_objects + 1))
        attrs = [(shape, _pick(rng, colors)) for _ in range(n)]
        if n < cfg.max_objects and rng.random() < 0.5:
            attrs.append((_pick(rng, [s for s in SHAPES if s != shape]), _pick(rng, colors)))
        return place(rng, attrs, cfg), PromptSpec(category, (ObjectSpec(shape, count=n),))
    if category == "colors":
        shape, color = _pick(rng, SHAPES), _pick(rng, colors)
        attrs = [(shape, color)]
        if rng.random() < 0.5:
            attrs.append((_pick(rng, [s for s in SHAPES if s != shape]), _pick(rng, colors)))
        return place(rng, attrs, cfg), PromptSpec(category, (ObjectSpec(shape, color),))
    if category == "position":
        while True:
            (s1, c1), (s2, c2) = [(_pick(rng, SHAPES), _pick(rng, colors)) for _ in range(2)]
            if (s1, c1) != (s2, c2):
                break
        rel = _pick(rng, ("left of", "right of", "above", "below"))
        scene = _with_relation(rng, [(s1, c1), (s2, c2)], rel, cfg)
        return scene, PromptSpec(category, (ObjectSpec(s1, c1), ObjectSpec(s2, c2)), rel)
    if category == "color_attr":
        s1, s2 = two_shapes()
        i, j = rng.choice(len(colors), 2, replace=False)
        attrs = [(s1, colors[i]), (s2, colors[j])]
        return place(rng, attrs, cfg), PromptSpec(
            category, (ObjectSpec(s1, colors[i]), ObjectSpec(s2, colors[j])))
    raise ValueError(f"unknown generation category {category!r}; known: {GEN_CATEGORIES}")


def _with_relation(rng: np.random.Generator, attrs, rel: str, cfg: WorldConfig) -> Scene:
    """Two objects where the first is clearly `rel` the second.

    Any layout with a clear relation is turned into the asked one by a symmetry of the square
    (mirrors and the transpose keep sizes, gaps and bounds), which is much cheaper than waiting
    for the asked relation by rejection.
    """
    symmetries = list(itertools.product((False, True), repeat=3))  # transpose, mirror x, mirror y
    for _ in range(100):
        scene = place(rng, attrs, cfg, accept=lambda sc: clear_relation(sc[0], sc[1]) is not None)
        for transpose, mirror_x, mirror_y in symmetries:
            moved = []
            for o in scene:
                cx, cy = (o.cy, o.cx) if transpose else (o.cx, o.cy)
                cx, cy = (1.0 - cx if mirror_x else cx), (1.0 - cy if mirror_y else cy)
                moved.append(dataclasses.replace(o, cx=cx, cy=cy))
            if clear_relation(moved[0], moved[1]) == rel:
                return tuple(moved)
    raise RuntimeError(f"no layout with {attrs[0]} {rel} {attrs[1]}")


def sample_random_scene(rng: np.random.Generator, cfg: WorldConfig = DEFAULT_WORLD,
                        min_objects: int = 1) -> Scene:
    """A scene of min_objects..max_objects objects with random shapes and colours."""
    n = int(rng.integers(min_objects, cfg.max_objects + 1))
    return place(rng, [(_pick(rng, SHAPES), _pick(rng, cfg.colors)) for _ in range(n)], cfg)


def _in_split(item: Item, split: str, held: frozenset) -> bool:
    touches = bool(item.keys() & held)
    return touches if split == "heldout" else not touches


def _rejection(draw, split: str, held: frozenset, what: str, max_tries: int = 10_000) -> Item:
    for _ in range(max_tries):
        item = draw()
        if item is not None and _in_split(item, split, held):
            return item
    raise RuntimeError(f"could not draw a {split} {what} in {max_tries} tries; "
                       "the held-out combinations may exclude every candidate")


def generation_item(seed: int, index: int, split: str = "train", cfg: WorldConfig = DEFAULT_WORLD,
                    heldout: HeldOut = DEFAULT_HELDOUT) -> Item:
    """Generation item `index`: category GEN_CATEGORIES[index % 6], a prompt and its scene."""
    rng = item_rng(seed, split, "gen", index)
    category = GEN_CATEGORIES[index % len(GEN_CATEGORIES)]

    def draw():
        return Item(*sample_prompt_scene(category, rng, cfg))

    return _rejection(draw, split, heldout.keys(), f"{category} prompt")


def understanding_item(seed: int, index: int, split: str = "train",
                       cfg: WorldConfig = DEFAULT_WORLD,
                       heldout: HeldOut = DEFAULT_HELDOUT) -> Item:
    """Understanding item `index`: tag QUESTION_TAGS[index % 5] about a random scene, with its
    answer letter fixed by the index so that every letter of a tag is equally often right.

    Balanced answers make a split's accuracy measure reading: without them the answers would
    follow the split's filter (training text never names a held-out combination, held-out items
    must touch one): 65% of the training "How many ...?" would be "one" and 65% of the held-out
    "Is there ...?" "no", so a prior learnt on one split would be wrong on the other.
    """
    rng = item_rng(seed, split, "und", index)
    tag = QUESTION_TAGS[index % len(QUESTION_TAGS)]
    n_options = option_count(tag, cfg.colors, cfg.shuffle_options)
    answer = LETTERS[(index // len(QUESTION_TAGS)) % n_options]

    def draw():
        scene = sample_random_scene(rng, cfg, min_objects=2 if tag == "position" else 1)
        q = make_question(scene, tag, rng, cfg.colors, cfg.shuffle_options)
        return None if q is None or q.answer != answer else Item(scene, question=q)

    return _rejection(draw, split, heldout.keys(), f"{tag} question")


def aligned_item(seed: int, index: int, split: str = "train", cfg: WorldConfig = DEFAULT_WORLD,
                 heldout: HeldOut = DEFAULT_HELDOUT) -> Item:
    """Aligned pair `index`: a prompt of GEN_CATEGORIES[index % 6] and a question on its scene,
    preferring questions whose answer the prompt states."""
    rng = item_rng(seed, split, "pair", index)
    category = GEN_CATEGORIES[index % len(GEN_CATEGORIES)]

    def draw():
        scene, spec = sample_prompt_scene(category, rng, cfg)
        preferred = [_PAIR_TAGS[category][i] for i in rng.permutation(len(_PAIR_TAGS[category]))]
        rest = [QUESTION_TAGS[i] for i in rng.permutation(len(QUESTION_TAGS))]
        for tag in preferred + [t for t in rest if t not in preferred]:
            q = make_question(scene, tag, rng, cfg.colors, cfg.shuffle_options)
            if q is not None:
                return Item(scene, spec, q)
        return None

    return _rejection(draw, split, heldout.keys(), f"{category} aligned pair")


# ---------------------------------------------------------------------------------------------
# Writing the dataset


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _save_image(root: str, rel_path: str, item: Item, cfg: WorldConfig) -> None:
    Image.fromarray(render(item.scene, cfg.image_size)).save(os.path.join(root, rel_path))


def write_world(
    out_dir: str,
    *,
    train_size: int = 1200,
    train_pairs: int = 600,
    heldout_size: int = 1200,
    heldout_pairs: int = 150,
    test_size: int = 300,
    cfg: WorldConfig = DEFAULT_WORLD,
    heldout: HeldOut = DEFAULT_HELDOUT,
    seed: int = 0,
    tokenizer: bool = True,
) -> dict[str, str]:
    """Write the world under `out_dir` (see the module docstring); returns {name: path}.

    `*_size` is the number of understanding items and of generation items per split; `*_pairs`
    the number of aligned pairs. The output is a pure function of the arguments.
    """
    sizes = {"train": (train_size, train_pairs), "heldout": (heldout_size, heldout_pairs),
             "test": (test_size, 0)}
    files: dict[str, str] = {}
    asks_heldout: dict[str, list[int]] = {}
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        n_items, n_pairs = sizes[split]
        und, gen, pairs, scenes = [], [], [], []
        for i in range(n_items):
            item = understanding_item(seed, i, split, cfg, heldout)
            path = f"images/{split}/und_{i:05d}.png"
            _save_image(out_dir, path, item, cfg)
            q = item.question
            und.append({"image_path": path, "question": q.text, "answer": q.answer, "tag": q.tag})
            if q.keys & heldout.keys():
                asks_heldout.setdefault(split, []).append(i)
            scenes.append({"image_path": path, "objects": [o.to_json() for o in item.scene]})
        for i in range(n_items):
            item = generation_item(seed, i, split, cfg, heldout)
            path = f"images/{split}/gen_{i:05d}.png"
            _save_image(out_dir, path, item, cfg)
            gen.append({"image_path": path, "prompt": item.prompt, "tag": item.spec.category})
            scenes.append({"image_path": path, "objects": [o.to_json() for o in item.scene]})
        for i in range(n_pairs):
            item = aligned_item(seed, i, split, cfg, heldout)
            path = f"images/{split}/pair_{i:05d}.png"
            _save_image(out_dir, path, item, cfg)
            q, prompt, category = item.question, item.prompt, item.spec.category
            pairs.append({
                "similarity": 1.0,
                "pair_type": "aligned",
                "generate_ann": {"image_path": path, "prompt": prompt, "tag": category,
                                 "question": q.text, "answer": q.answer},
                "understand_ann": {"image_path": path, "question": q.text, "answer": q.answer,
                                   "tag": q.tag, "prompt": prompt},
            })
            scenes.append({"image_path": path, "objects": [o.to_json() for o in item.scene]})
        for name, records in (("understanding", und), ("generation", gen),
                              ("aligned_pairs", pairs), ("scenes", scenes)):
            files[f"{split}_{name}"] = os.path.join(out_dir, f"{split}_{name}.jsonl")
            _write_jsonl(files[f"{split}_{name}"], records)
    if tokenizer:
        from pairuni_jax.data.shapes_tokenizer import save_tokenizer

        files["tokenizer"] = save_tokenizer(os.path.join(out_dir, "tokenizer"))
    files["world"] = os.path.join(out_dir, "world.json")
    with open(files["world"], "w") as f:
        json.dump({"seed": seed, "config": dataclasses.asdict(cfg),
                   "heldout": dataclasses.asdict(heldout),
                   "sizes": {s: {"items": n, "aligned_pairs": p} for s, (n, p) in sizes.items()},
                   "files": {k: os.path.relpath(v, out_dir) for k, v in files.items()},
                   "asks_heldout": asks_heldout},
                  f, indent=1)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the Shapes world dataset.")
    parser.add_argument("--out", required=True, help="output directory (the dataset root)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=WorldConfig.image_size)
    parser.add_argument("--train_size", type=int, default=1200)
    parser.add_argument("--train_pairs", type=int, default=600)
    parser.add_argument("--heldout_size", type=int, default=1200)
    parser.add_argument("--heldout_pairs", type=int, default=150)
    parser.add_argument("--test_size", type=int, default=300)
    parser.add_argument("--shuffle_options", action="store_true",
                        help="draw <= 4 multiple-choice options in random order (default: all "
                             "options of a question type in one fixed order)")
    args = parser.parse_args(argv)
    files = write_world(args.out, train_size=args.train_size, train_pairs=args.train_pairs,
                        heldout_size=args.heldout_size, heldout_pairs=args.heldout_pairs,
                        test_size=args.test_size,
                        cfg=WorldConfig(image_size=args.image_size,
                                        shuffle_options=args.shuffle_options),
                        seed=args.seed)
    for name, path in files.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
