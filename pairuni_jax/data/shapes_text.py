"""Shapes world text: generation prompts (GenEval's six categories) with a parser back to a
structured spec, and multiple-choice understanding questions about a scene.

Prompts follow one small grammar, so the reward can recover every constraint from the prompt text
alone:  NP | NP "and" NP | NP RELATION NP,  NP = ("a" | "one" | "two" | "three") [colour] shape.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from pairuni_jax.data.shapes_render import COLORS, SHAPES, Scene, ShapeObject, clear_relation

GEN_CATEGORIES: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr")
QUESTION_TAGS: tuple[str, ...] = ("color", "shape", "count", "position", "existence")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of",
                    "above": "below", "below": "above"}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of",
                    "above": "above", "below": "below"}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_SHUFFLED_OPTIONS = 4  # with shuffled options: the correct one and up to 3 others


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """`count` objects of `shape` (and of `color` when given)."""

    shape: str
    color: str | None = None
    count: int = 1


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A parsed generation prompt. For `position`, objects[0] is `relation` objects[1]."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


# ---------------------------------------------------------------------------------------------
# Prompts


def _noun_phrase(obj: ObjectSpec, counting: bool) -> str:
    det = NUMBER_WORDS[obj.count] if counting else "a"
    noun = obj.shape if obj.count == 1 else obj.shape + "s"
    return " ".join(w for w in (det, obj.color, noun) if w)


def format_prompt(spec: PromptSpec) -> str:
    """The prompt text of a spec (inverse of `parse_prompt`)."""
    phrases = [_noun_phrase(o, spec.category == "counting") for o in spec.objects]
    if spec.relation is not None:
        return f"{phrases[0]} {RELATION_PHRASES[spec.relation]} {phrases[1]}"
    return " and ".join(phrases)


_NP = (r"(a|one|two|three) (?:(" + "|".join(COLORS) + r") )?(" + "|".join(SHAPES) + r")(s?)")
_REL = "|".join(sorted(RELATION_PHRASES.values(), key=len, reverse=True))
_PROMPT_RE = re.compile(rf"^{_NP}(?: (and|{_REL}) {_NP})?$")
_PHRASE_TO_RELATION = {v: k for k, v in RELATION_PHRASES.items()}


def _object(det: str, color: str | None, shape: str, plural: str, prompt: str) -> ObjectSpec:
    count = 1 if det == "a" else NUMBER_WORDS.index(det)
    if (count > 1) != bool(plural) or (det == "a" and plural):
        raise ValueError(f"not a Shapes world prompt (number agreement): {prompt!r}")
    return ObjectSpec(shape, color or None, count)


def parse_prompt(prompt: str) -> PromptSpec:
    """Recover the spec from prompt text; raises ValueError naming the prompt if it is not one.

    Case, surrounding whitespace, repeated spaces and a final period are tolerated.
    """
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    m = _PROMPT_RE.match(text)
    if m is None:
        raise ValueError(f"not a Shapes world prompt: {prompt!r}")
    g = m.groups()
    first = _object(g[0], g[1], g[2], g[3], prompt)
    if g[4] is None:
        if first.count > 1 or g[0] == "one":
            category = "counting"
        else:
            category = "colors" if first.color else "single_object"
        return PromptSpec(category, (first,))
    second = _object(g[5], g[6], g[7], g[8], prompt)
    if g[4] == "and":
        category = "color_attr" if (first.color or second.color) else "two_object"
        return PromptSpec(category, (first, second))
    return PromptSpec("position", (first, second), _PHRASE_TO_RELATION[g[4]])


# ---------------------------------------------------------------------------------------------
# Combination keys (what the held-out split holds back)


def color_shape_key(color: str, shape: str) -> tuple:
    return ("color_shape", color, shape)


def relation_key(shape_a: str, relation: str, shape_b: str) -> tuple:
    """Canonical relation triple: "right of" and "below" are stored as their inverse."""
    if relation in ("right of", "below"):
        return ("relation", shape_b, INVERSE_RELATION[relation], shape_a)
    return ("relation", shape_a, relation, shape_b)


def count_key(shape: str, count: int) -> tuple:
    return ("count", shape, count)


def prompt_keys(spec: PromptSpec) -> frozenset:
    """Combinations a prompt names: colour-shape pairs, relation triples, counted shapes."""
    keys = {color_shape_key(o.color, o.shape) for o in spec.objects if o.color}
    if spec.relation is not None:
        keys.add(relation_key(spec.objects[0].shape, spec.relation, spec.objects[1].shape))
    if spec.category == "counting":
        keys.add(count_key(spec.objects[0].shape, spec.objects[0].count))
    return frozenset(keys)


def scene_keys(scene: Scene) -> frozenset:
    """Colour-shape pairs shown in a scene."""
    return frozenset(color_shape_key(o.color, o.shape) for o in scene)


# ---------------------------------------------------------------------------------------------
# Multiple-choice questions


@dataclasses.dataclass(frozen=True)
class Question:
    """A multiple-choice item: full question text (options and instruction included) and letter."""

    tag: str
    text: str
    answer: str
    keys: frozenset = frozenset()


def mc_text(stem: str, options: list[str]) -> str:
    """Question stem, one "A. option" per line, then the standard instruction."""
    lines = [stem] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + [MC_SUFFIX]
    return "\n".join(lines)


def _mc(rng, tag, stem, options, correct, keys, shuffle: bool) -> Question:
    """The question with `options` in their given (canonical) order, or, with `shuffle`, at most
    four of them (the correct one and random others) in random order."""
    if shuffle:
        others = [o for o in options if o != correct]
        n_others = min(MAX_SHUFFLED_OPTIONS - 1, len(others))
        keep = [correct] + [others[i] for i in rng.choice(len(others), n_others, replace=False)]
        options = [keep[i] for i in rng.permutation(len(keep))]
    return Question(tag, mc_text(stem, options), LETTERS[options.index(correct)], frozenset(keys))


def _unique(scene: Scene, attr: str) -> list[ShapeObject]:
    values = [getattr(o, attr) for o in scene]
    return [o for o in scene if values.count(getattr(o, attr)) == 1]


def color_question(scene: Scene, rng: np.random.Generator, colors=COLORS,
                   shuffle: bool = False) -> Question | None:
    """'What color is the circle?' about a shape that occurs once; options: the world's colours."""
    cands = _unique(scene, "shape")
    if not cands:
        return None
    obj = cands[rng.integers(len(cands))]
    return _mc(rng, "color", f"What color is the {obj.shape}?", options_of("color", colors),
               obj.color, {color_shape_key(obj.color, obj.shape)}, shuffle)


def shape_question(scene: Scene, rng: np.random.Generator, colors=COLORS,
                   shuffle: bool = False) -> Question | None:
    """'What shape is the red object?' about a colour that occurs once; 3 shape options."""
    cands = _unique(scene, "color")
    if not cands:
        return None
    obj = cands[rng.integers(len(cands))]
    return _mc(rng, "shape", f"What shape is the {obj.color} object?", options_of("shape"),
               obj.shape, {color_shape_key(obj.color, obj.shape)}, shuffle)


def count_question(scene: Scene, rng: np.random.Generator, colors=COLORS,
                   shuffle: bool = False) -> Question:
    """'How many triangles are there?' (or all objects); options zero..three."""
    if rng.random() < 0.25:
        stem, n, keys = "How many objects are there?", len(scene), set()
    else:
        present = sorted({o.shape for o in scene})
        shape = present[rng.integers(len(present))] if rng.random() < 0.85 else \
            SHAPES[rng.integers(len(SHAPES))]
        n = sum(o.shape == shape for o in scene)
        stem, keys = f"How many {shape}s are there?", {count_key(shape, n)}
    return _mc(rng, "count", stem, options_of("count"), NUMBER_WORDS[n], keys, shuffle)


POSITION_OPTIONS = {"left of": "to the left", "right of": "to the right",
                    "above": "above", "below": "below"}


def position_question(scene: Scene, rng: np.random.Generator, colors=COLORS,
                      shuffle: bool = False) -> Question | None:
    """'Where is the red circle relative to the blue square?' for a pair with a clear relation."""
    named = [o for o in scene if sum((p.color, p.shape) == (o.color, o.shape) for p in scene) == 1]
    pairs = [(a, b) for a in named for b in named if a is not b and clear_relation(a, b)]
    if not pairs:
        return None
    a, b = pairs[rng.integers(len(pairs))]
    rel = clear_relation(a, b)
    stem = f"Where is the {a.color} {a.shape} relative to the {b.color} {b.shape}?"
    keys = {relation_key(a.shape, rel, b.shape), color_shape_key(a.color, a.shape),
            color_shape_key(b.color, b.shape)}  # the relation, and the two objects it names
    return _mc(rng, "position", stem, options_of("position"), POSITION_OPTIONS[rel],
               keys, shuffle)


def existence_question(scene: Scene, rng: np.random.Generator, colors=COLORS,
                       shuffle: bool = False) -> Question:
    """POPE-style 'Is there a red triangle in the image?' with A. yes / B. no (never shuffled).

    Half present; of the absent half, half adversarial (a present object with its colour or its
    shape changed) and half random absent colour-shape pairs.
    """
    present = {(o.color, o.shape) for o in scene}
    absent = [(c, s) for c in colors for s in SHAPES if (c, s) not in present]
    if rng.random() < 0.5:
        color, shape = sorted(present)[rng.integers(len(present))]
        answer = "A"
    else:
        if rng.random() < 0.5:
            near = {(c, o.shape) for o in scene for c in colors} | \
                {(o.color, s) for o in scene for s in SHAPES}
            pool = sorted(near - present) or absent
        else:
            pool = absent
        color, shape = pool[rng.integers(len(pool))]
        answer = "B"
    text = mc_text(f"Is there a {color} {shape} in the image?", options_of("existence"))
    return Question("existence", text, answer, frozenset({color_shape_key(color, shape)}))


QUESTION_BUILDERS = {
    "color": color_question,
    "shape": shape_question,
    "count": count_question,
    "position": position_question,
    "existence": existence_question,
}


def make_question(scene: Scene, tag: str, rng: np.random.Generator, colors=COLORS,
                  shuffle: bool = False) -> Question | None:
    """A question of category `tag` about the scene, or None if the scene cannot support one.

    Options come in one fixed order per tag (all colours of the world, all shapes, zero..three,
    the four relations), so a letter always names the same answer; `shuffle` draws at most four
    options in random order instead, as MMStar-style benchmarks do, which adds an in-context
    letter lookup on top of reading the image.
    """
    return QUESTION_BUILDERS[tag](scene, rng, colors, shuffle)


def options_of(tag: str, colors=COLORS) -> list[str]:
    """The options of a question of category `tag`, in their canonical order."""
    return {"color": list(colors), "shape": list(SHAPES), "count": list(NUMBER_WORDS),
            "position": list(POSITION_OPTIONS.values()), "existence": ["yes", "no"]}[tag]


def option_count(tag: str, colors=COLORS, shuffle: bool = False) -> int:
    """How many options a question of category `tag` lists (existence is never shuffled)."""
    n = len(options_of(tag, colors))
    return n if tag == "existence" or not shuffle else min(MAX_SHUFFLED_OPTIONS, n)


def world_words() -> list[str]:
    """Every word the prompts, questions and options use (for the tokenizer's vocabulary)."""
    words = set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBER_WORDS)
    texts = [" ".join(RELATION_PHRASES.values()), " ".join(POSITION_OPTIONS.values()),
             MC_SUFFIX, "What color is the", "What shape is the object", "How many are there",
             "objects", "Where is the relative to the", "Is there a in the image yes no and a"]
    for t in texts:
        words.update(re.findall(r"\w+", t))
    return sorted(words)
