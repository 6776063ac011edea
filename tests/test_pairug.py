"""PairUG schema and validation: every error of the spec on real malformed files, and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pairuni_jax.data import pairug

QUESTION = pairug.format_mc_question("What colour is the circle?", ["red", "blue", "green"])


def _image(path, size=(20, 10), colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)


def _good_pair(**overrides):
    rec = {
        "similarity": 0.83,
        "pair_type": "retrieved",
        "generate_ann": {"image_path": "img/g.png", "prompt": "a red circle", "tag": "color"},
        "understand_ann": {
            "image_path": "img/u.png", "question": QUESTION, "answer": "A", "tag": "color"
        },
    }
    rec.update(overrides)
    return rec


@pytest.fixture
def root(tmp_path):
    _image(str(tmp_path / "img/g.png"))
    _image(str(tmp_path / "img/u.png"), colour=(10, 10, 220))
    return tmp_path


def _write(root, lines, name="pairs.jsonl"):
    path = root / name
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    )
    return str(path)


def test_good_file_reads_and_round_trips(root):
    path = _write(root, [_good_pair(), _good_pair(similarity=1, pair_type="aligned")])
    res = pairug.read_pairug(path, check_images=True)
    assert len(res.records) == 2 and not res.skipped and not res.errors
    r = res.records[0]
    assert r.pair_type == "retrieved" and r.similarity == pytest.approx(0.83)
    assert r.understand_ann.answer == "A" and r.generate_ann.question is None
    out = str(root / "copy.jsonl")
    assert pairug.write_pairug(out, res.records) == 2
    again = pairug.read_pairug(out, root=str(root))
    assert again.records == res.records


def test_missing_pair_type_follows_documented_rule(root):
    same = _good_pair()
    del same["pair_type"]
    same["understand_ann"]["image_path"] = "img/g.png"
    other = _good_pair()
    del other["pair_type"]
    res = pairug.read_pairug(_write(root, [same, other]))
    assert [r.pair_type for r in res.records] == ["aligned", "retrieved"]
    assert res.notes["pair_type_inferred"] == 2


def test_mc_options():
    assert pairug.mc_options(QUESTION) == ["A", "B", "C"]
    assert pairug.mc_options("Is it red?\nA. yes\nB. no") == ["A", "B"]
    assert pairug.mc_options("Pick\nA. x\nC. y") == []  # letters must be consecutive from A
    assert pairug.mc_options("no options here") == []


def _bad_cases():
    """(name, line, expected field, expected reason) for every error class of the spec."""
    def pair_with(path, value):
        rec = _good_pair()
        obj = rec
        *head, last = path.split(".")
        for k in head:
            obj = obj[k]
        if value is _DELETE:
            del obj[last]
        else:
            obj[last] = value
        return rec

    return [
        ("malformed_json", '{"similarity": 0.5, "generate_ann": ', "record", "malformed_json"),
        ("not_an_object", "[1, 2]", "record", "wrong_type"),
        ("missing_top", pair_with("understand_ann", _DELETE), "understand_ann", "missing_field"),
        ("missing_nested", pair_with("generate_ann.prompt", _DELETE), "generate_ann.prompt",
         "missing_field"),
        ("unknown_top", pair_with("extra", 1), "extra", "unknown_field"),
        ("unknown_nested", pair_with("understand_ann.options", "A"), "understand_ann.options",
         "unknown_field"),
        ("sim_type", pair_with("similarity", "0.5"), "similarity", "wrong_type"),
        ("sim_bool", pair_with("similarity", True), "similarity", "wrong_type"),
        ("prompt_type", pair_with("generate_ann.prompt", 3), "generate_ann.prompt", "wrong_type"),
        ("ann_type", pair_with("generate_ann", "x"), "generate_ann", "wrong_type"),
        ("empty_prompt", pair_with("generate_ann.prompt", "  "), "generate_ann.prompt",
         "empty_string"),
        ("empty_question", pair_with("understand_ann.question", ""), "understand_ann.question",
         "empty_string"),
        ("answer_not_option", pair_with("understand_ann.answer", "D"), "understand_ann.answer",
         "bad_answer"),
        ("answer_word", pair_with("understand_ann.answer", "red"), "understand_ann.answer",
         "bad_answer"),
        ("question_without_options", pair_with("understand_ann.question", "What colour?"),
         "understand_ann.question", "bad_answer"),
        ("gen_question_without_answer", pair_with("generate_ann.question", QUESTION),
         "generate_ann.answer", "missing_field"),
        ("missing_image", pair_with("generate_ann.image_path", "img/nope.png"),
         "generate_ann.image_path", "missing_image"),
        ("corrupt_image", pair_with("understand_ann.image_path", "img/corrupt.jpg"),
         "understand_ann.image_path", "corrupt_image"),
        ("truncated_image", pair_with("understand_ann.image_path", "img/truncated.png"),
         "understand_ann.image_path", "corrupt_image"),
        ("image_is_a_directory", pair_with("understand_ann.image_path", "img/dir.png"),
         "understand_ann.image_path", "unreadable_image"),
        ("escapes_root", pair_with("generate_ann.image_path", "../outside.png"),
         "generate_ann.image_path", "path_escapes_root"),
        ("absolute_path", pair_with("generate_ann.image_path", "/etc/passwd"),
         "generate_ann.image_path", "path_escapes_root"),
        ("sim_high", pair_with("similarity", 1.5), "similarity", "similarity_range"),
        ("sim_negative", pair_with("similarity", -0.1), "similarity", "similarity_range"),
        ("bad_pair_type", pair_with("pair_type", "random"), "pair_type", "bad_pair_type"),
        ("pair_type_type", pair_with("pair_type", 1), "pair_type", "wrong_type"),
    ]


_DELETE = object()


@pytest.fixture
def bad_images(root):
    (root / "img/corrupt.jpg").write_bytes(b"this is not a jpeg at all")
    _image(str(root / "img/full.png"), size=(64, 64))
    data = (root / "img/full.png").read_bytes()
    (root / "img/truncated.png").write_bytes(data[: len(data) // 2])
    _image(str(root.parent / "outside.png"))
    (root / "img/dir.png").mkdir()
    return root


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_each_error_names_file_line_field(bad_images, case):
    name, bad, field, reason = case
    path = _write(bad_images, [_good_pair(), bad, _good_pair()])
    with pytest.raises(pairug.RecordError) as info:
        pairug.read_pairug(path, check_images=True)
    e = info.value
    assert (e.path, e.line, e.field, e.reason) == (path, 2, field, reason)
    assert f"{path}:2:" in str(e) and field in str(e)
    # skip policy: the bad line is counted by reason, the good ones are kept
    res = pairug.read_pairug(path, check_images=True, on_error="skip")
    assert len(res.records) == 2
    assert dict(res.skipped) == {reason: 1}
    assert [x.line for x in res.errors] == [2]


def test_invalid_utf8_line(root):
    path = root / "pairs.jsonl"
    path.write_bytes(json.dumps(_good_pair()).encode() + b"\n" + b'{"similarity": "\xff"}\n')
    res = pairug.read_pairug(str(path), on_error="skip")
    assert len(res.records) == 1 and dict(res.skipped) == {"malformed_json": 1}
    assert res.errors[0].line == 2 and "UTF-8" in str(res.errors[0])


def test_understanding_and_generation_sets(root):
    u = _write(root, [
        {"image_path": "img/u.png", "question": QUESTION, "answer": "B"},
        {"image_path": "img/u.png", "question": QUESTION, "answer": "Z", "tag": "t"},
        {"image_path": "img/u.png", "question": QUESTION, "answer": "C", "prompt": "x"},
    ], "und.jsonl")
    res = pairug.read_understanding_set(u, on_error="skip")
    assert [r.answer for r in res.records] == ["B"]
    assert dict(res.skipped) == {"bad_answer": 1, "unknown_field": 1}
    g = _write(root, [
        {"image_path": "img/g.png", "prompt": "a dog", "tag": "animal"},
        {"image_path": "img/g.png"},
    ], "gen.jsonl")
    res = pairug.read_generation_set(g, on_error="skip")
    assert [r.prompt for r in res.records] == ["a dog"]
    assert dict(res.skipped) == {"missing_field": 1}
    assert pairug.detect_kind(u) == "understanding" and pairug.detect_kind(g) == "generation"


def test_root_option(tmp_path):
    data = tmp_path / "data"
    _image(str(data / "img/g.png"))
    _image(str(data / "img/u.png"))
    meta = tmp_path / "meta"
    meta.mkdir()
    path = _write(meta, [_good_pair()])
    assert pairug.validate(path).skipped == {"missing_image": 1}
    assert not pairug.validate(path, root=str(data)).errors


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pairuni_jax.data.pairug", "validate", *args],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )


def test_cli_exit_codes(bad_images):
    good = _write(bad_images, [_good_pair()], "good.jsonl")
    out = _cli(good)
    assert out.returncode == 0 and "OK" in out.stdout
    bad = _write(bad_images, [_good_pair(), _bad_cases()[-3][1]], "bad.jsonl")
    out = _cli(bad, "--root", str(bad_images))
    assert out.returncode == 1
    assert f"{bad}:2: field 'similarity': similarity_range" in out.stderr
    assert _cli(str(bad_images / "absent.jsonl")).returncode == 2
