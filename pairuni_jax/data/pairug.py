"""PairUG records: schema, strict readers with an error policy, writer, and the `validate` CLI.

A PairUG file is JSONL, one pair per line (formats are fixed, see the project README):

    {"similarity": 0.83, "pair_type": "retrieved" | "aligned",
     "generate_ann":   {"image_path", "prompt", "tag", optional "question", "answer"},
     "understand_ann": {"image_path", "question", "answer", "tag", optional "prompt"}}

`pair_type` decides the pair weight downstream (aligned: 1, retrieved: sqrt(similarity)), so it is
never guessed silently: when a file from the original PairUG lacks it, the documented rule applies
(aligned when both anns share `image_path`, retrieved otherwise) and the reader counts how often.
Understanding sets ({"image_path", "question", "answer", optional "tag"}) and generation sets
({"image_path", "prompt", optional "tag"}) are read by the same machinery.

Every problem becomes a `RecordError` naming file, line and field. Readers take
`on_error="raise"` (stop at the first problem) or `"skip"` (drop the record, count it by reason in
`ReadResult.skipped`, keep the errors for the log): nothing is dropped silently.

CLI: `python -m pairuni_jax.data.pairug validate PATH [--root DIR] [--kind KIND] [--no-images]`
exits 1 when the file has problems, printing each one.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import posixpath
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pairuni_jax import files

PAIR_TYPES = ("aligned", "retrieved")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
OnError = Literal["raise", "skip"]
Kind = Literal["pairug", "understanding", "generation"]

_OPTION_LINE = re.compile(r"^\s*([A-Z])\.\s+\S")


class RecordError(ValueError):
    """A problem with one record: where it is (file, line, field) and a reason code for counting."""

    def __init__(self, path: str, line: int, field: str, reason: str, detail: str):
        self.path, self.line, self.field = path, line, field
        self.reason, self.detail = reason, detail
        super().__init__(f"{path}:{line}: field '{field}': {reason}: {detail}")


@dataclasses.dataclass(frozen=True)
class GenerationAnn:
    image_path: str
    prompt: str
    tag: str = ""
    question: str | None = None
    answer: str | None = None


@dataclasses.dataclass(frozen=True)
class UnderstandingAnn:
    image_path: str
    question: str
    answer: str
    tag: str = ""
    prompt: str | None = None


@dataclasses.dataclass(frozen=True)
class PairRecord:
    similarity: float
    pair_type: str  # "aligned" | "retrieved"
    generate_ann: GenerationAnn
    understand_ann: UnderstandingAnn

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (optional fields that are None are left out)."""

        def ann(a):
            return {k: v for k, v in dataclasses.asdict(a).items() if v is not None}

        return {
            "similarity": self.similarity,
            "pair_type": self.pair_type,
            "generate_ann": ann(self.generate_ann),
            "understand_ann": ann(self.understand_ann),
        }


@dataclasses.dataclass
class ReadResult:
    """Records read from one file, plus what was skipped (by reason) and the errors themselves."""

    records: list
    skipped: collections.Counter
    errors: list[RecordError]
    notes: collections.Counter  # things applied by documented rules, e.g. "pair_type_inferred"
    path: str = ""
    root: str = ""
    lines: list[int] = dataclasses.field(default_factory=list)  # line number of each record

    def summary(self) -> str:
        parts = [f"{len(self.records)} records from {self.path}"]
        if self.skipped:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            parts.append(f"skipped {counts}")
        if self.notes:
            parts.append(", ".join(f"{k}={v}" for k, v in sorted(self.notes.items())))
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Multiple-choice questions


def mc_options(question: str) -> list[str]:
    """Option letters of a multiple-choice question: lines "A. text", letters A, B, C... in order.

    Returns [] when the question lists no options or the letters are not consecutive from A.
    """
    letters = [m.group(1) for line in question.splitlines() if (m := _OPTION_LINE.match(line))]
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    return letters if letters == expected else []


def format_mc_question(stem: str, options: Sequence[str]) -> str:
    """Build a question in the PairUG format: stem, "A. opt" lines, then the fixed instruction."""
    lines = [stem.strip()] + [f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines + [MC_SUFFIX])


# ---------------------------------------------------------------------------------------------
# Field checks


class _Checker:
    """Validates one JSON object against a field spec; raises RecordError at the first problem."""

    def __init__(self, path: str, line: int, root: str, check_images: bool, image_cache: dict):
        self.path, self.line, self.root = path, line, root
        self.check_images, self.image_cache = check_images, image_cache

    def error(self, field: str, reason: str, detail: str) -> RecordError:
        return RecordError(self.path, self.line, field, reason, detail)

    def fields(self, obj: Any, prefix: str, required: Sequence[str], optional: Sequence[str]):
        where = prefix or "record"
        if not isinstance(obj, dict):
            raise self.error(where, "wrong_type", f"expected a JSON object, got {_tname(obj)}")
        for name in required:
            if name not in obj:
                raise self.error(_join(prefix, name), "missing_field", "required field is absent")
        allowed = set(required) | set(optional)
        for name in obj:
            if name not in allowed:
                raise self.error(
                    _join(prefix, name), "unknown_field", f"allowed fields: {sorted(allowed)}"
                )

    def string(self, obj: dict, prefix: str, name: str, *, allow_empty: bool = False) -> str | None:
        if name not in obj:
            return None
        value, field = obj[name], _join(prefix, name)
        if not isinstance(value, str):
            raise self.error(field, "wrong_type", f"expected a string, got {_tname(value)}")
        if not allow_empty and not value.strip():
            raise self.error(field, "empty_string", "must not be empty")
        return value

    def answer(self, obj: dict, prefix: str, question: str) -> str:
        answer = self.string(obj, prefix, "answer")
        options = mc_options(question)
        if not options:
            raise self.error(
                _join(prefix, "question"),
                "bad_answer",
                "question lists no options as lines 'A. text', 'B. text', ... in order",
            )
        if answer not in options:
            raise self.error(
                _join(prefix, "answer"),
                "bad_answer",
                f"{answer!r} is not one of the question's option letters {options}",
            )
        return answer

    def image(self, obj: dict, prefix: str) -> str:
        rel = self.string(obj, prefix, "image_path")
        field = _join(prefix, "image_path")
        full = resolve_image_path(rel, self.root, lambda r, d: self.error(field, r, d))
        if self.check_images:
            problem = self.image_cache.get(full)
            if full not in self.image_cache:
                problem = self.image_cache[full] = _image_problem(full)
            if problem is not None:
                raise self.error(field, problem[0], f"{rel}: {problem[1]}")
        return rel


def _tname(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), type(v).__name__
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def resolve_image_path(rel: str, root: str, make_error=None) -> str:
    """Absolute path of `rel` under `root`; absolute paths or paths escaping the root are errors."""

    def fail(reason, detail):
        raise (make_error or (lambda r, d: ValueError(f"{r}: {d}")))(reason, detail)

    if os.path.isabs(rel) or files.is_url(rel):
        fail("path_escapes_root", f"{rel!r} is absolute; paths are relative to the dataset root")
    if files.is_url(root):  # a bucket: no links to follow, only '..' to refuse
        inner = posixpath.normpath(rel)
        if inner == ".." or inner.startswith("../"):
            fail("path_escapes_root", f"{rel!r} resolves outside the dataset root {root}")
        return f"{root.rstrip('/')}/{inner}"
    root_abs = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_abs, rel))
    if os.path.commonpath([root_abs, full]) != root_abs:
        fail("path_escapes_root", f"{rel!r} resolves outside the dataset root {root_abs}")
    return full


def relative_image_path(path: str, root: str, what: str) -> str:
    """`path` relative to dataset `root`, for writing records; an error if it lies outside."""
    full, root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([full, root]) != root:
        raise ValueError(
            f"{what}: image {full} is outside the output dataset root {root}; "
            "pass --out-root with a directory containing every image"
        )
    return os.path.relpath(full, root)


def _image_problem(full: str) -> tuple[str, str] | None:
    """(reason, detail) when the image cannot be used, else None. Decodes the full image."""
    from PIL import Image, UnidentifiedImageError

    if not files.exists(full):
        return "missing_image", "file does not exist"
    try:
        with files.open_file(full, "rb") as f, Image.open(f) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "corrupt_image", "image has no pixels"
    except (PermissionError, IsADirectoryError) as e:
        return "unreadable_image", str(e)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return "corrupt_image", f"cannot decode: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# Record parsers (one JSON object -> typed record)


def _parse_pair(obj: Any, c: _Checker, notes: collections.Counter) -> PairRecord:
    c.fields(obj, "", ["generate_ann", "understand_ann", "similarity"], ["pair_type"])
    sim = obj["similarity"]
    if isinstance(sim, bool) or not isinstance(sim, (int, float)):
        raise c.error("similarity", "wrong_type", f"expected a number, got {_tname(sim)}")
    if not (math.isfinite(sim) and 0.0 <= sim <= 1.0):
        raise c.error("similarity", "similarity_range", f"{sim} is outside [0, 1]")

    g = obj["generate_ann"]
    c.fields(g, "generate_ann", ["image_path", "prompt", "tag"], ["question", "answer"])
    g_question = c.string(g, "generate_ann", "question")
    if (g_question is None) != ("answer" not in g):
        raise c.error(
            "generate_ann.answer" if g_question is not None else "generate_ann.question",
            "missing_field",
            "'question' and 'answer' come together",
        )
    gen = GenerationAnn(
        image_path=c.image(g, "generate_ann"),
        prompt=c.string(g, "generate_ann", "prompt"),
        tag=c.string(g, "generate_ann", "tag", allow_empty=True),
        question=g_question,
        answer=c.answer(g, "generate_ann", g_question) if g_question is not None else None,
    )

    u = obj["understand_ann"]
    c.fields(u, "understand_ann", ["image_path", "question", "answer", "tag"], ["prompt"])
    u_question = c.string(u, "understand_ann", "question")
    und = UnderstandingAnn(
        image_path=c.image(u, "understand_ann"),
        question=u_question,
        answer=c.answer(u, "understand_ann", u_question),
        tag=c.string(u, "understand_ann", "tag", allow_empty=True),
        prompt=c.string(u, "understand_ann", "prompt"),
    )

    if "pair_type" in obj:
        pair_type = obj["pair_type"]
        if not isinstance(pair_type, str):
            raise c.error("pair_type", "wrong_type", f"expected a string, got {_tname(pair_type)}")
        if pair_type not in PAIR_TYPES:
            raise c.error("pair_type", "bad_pair_type", f"{pair_type!r} is not one of {PAIR_TYPES}")
    else:
        pair_type = "aligned" if gen.image_path == und.image_path else "retrieved"
        notes["pair_type_inferred"] += 1
    return PairRecord(float(sim), pair_type, gen, und)


def _parse_understanding(obj: Any, c: _Checker, notes: collections.Counter) -> UnderstandingAnn:
    c.fields(obj, "", ["image_path", "question", "answer"], ["tag"])
    question = c.string(obj, "", "question")
    return UnderstandingAnn(
        image_path=c.image(obj, ""),
        question=question,
        answer=c.answer(obj, "", question),
        tag=c.string(obj, "", "tag", allow_empty=True) or "",
    )


def _parse_generation(obj: Any, c: _Checker, notes: collections.Counter) -> GenerationAnn:
    c.fields(obj, "", ["image_path", "prompt"], ["tag"])
    return GenerationAnn(
        image_path=c.image(obj, ""),
        prompt=c.string(obj, "", "prompt"),
        tag=c.string(obj, "", "tag", allow_empty=True) or "",
    )


_PARSERS = {"pairug": _parse_pair, "understanding": _parse_understanding,
            "generation": _parse_generation}


# ---------------------------------------------------------------------------------------------
# Readers


def read_jsonl(
    path: str,
    kind: Kind,
    *,
    root: str | None = None,
    on_error: OnError = "raise",
    check_images: bool = False,
) -> ReadResult:
    """Read and validate a JSONL file of `kind` records.

    root: dataset root for image paths (default: the file's directory).
    check_images: also open and fully decode every image (what `validate` does; slow on big sets).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if kind not in _PARSERS:
        raise ValueError(f"kind must be one of {sorted(_PARSERS)}, got {kind!r}")
    root = root if root is not None else os.path.dirname(files.absolute(path))
    parse = _PARSERS[kind]
    result = ReadResult([], collections.Counter(), [], collections.Counter(), path, root)
    image_cache: dict = {}
    with files.open_file(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            checker = _Checker(path, line_no, root, check_images, image_cache)
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise checker.error("record", "malformed_json", f"not UTF-8: {e}") from None
                except json.JSONDecodeError as e:
                    raise checker.error("record", "malformed_json", str(e)) from None
                result.records.append(parse(obj, checker, result.notes))
                result.lines.append(line_no)
            except RecordError as e:
                if on_error == "raise":
                    raise
                result.skipped[e.reason] += 1
                result.errors.append(e)
    return result


def read_pairug(path: str, **kwargs) -> ReadResult:
    """Read a PairUG JSONL file (see `read_jsonl` for the options)."""
    return read_jsonl(path, "pairug", **kwargs)


def read_understanding_set(path: str, **kwargs) -> ReadResult:
    """Read an understanding-set JSONL file: image, MC question, letter answer, optional tag."""
    return read_jsonl(path, "understanding", **kwargs)


def read_generation_set(path: str, **kwargs) -> ReadResult:
    """Read a generation-set JSONL file: image, prompt, optional tag."""
    return read_jsonl(path, "generation", **kwargs)


def write_pairug(path: str, records: Iterable[PairRecord]) -> int:
    """Write records as PairUG JSONL atomically (temp file renamed over `path`); returns count."""
    tmp = f"{path}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def detect_kind(path: str) -> Kind:
    """Guess the kind of a JSONL file from the keys of its first parseable line."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                if "generate_ann" in obj or "understand_ann" in obj:
                    return "pairug"
                if "question" in obj:
                    return "understanding"
                if "prompt" in obj:
                    return "generation"
    return "pairug"


def validate(
    path: str, *, root: str | None = None, kind: Kind | None = None, check_images: bool = True
) -> ReadResult:
    """Check every record of a file; the result lists every problem found (never raises on data)."""
    kind = kind or detect_kind(path)
    return read_jsonl(path, kind, root=root, on_error="skip", check_images=check_images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pairuni_jax.data.pairug")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a PairUG / understanding / generation JSONL file")
    v.add_argument("path")
    v.add_argument("--root", help="dataset root for image paths (default: the file's directory)")
    v.add_argument("--kind", choices=sorted(_PARSERS), help="default: detected from the first line")
    v.add_argument("--no-images", action="store_true", help="skip opening the images")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.path):
        print(f"error: {args.path}: no such file", file=sys.stderr)
        return 2
    result = validate(
        args.path, root=args.root, kind=args.kind, check_images=not args.no_images
    )
    for e in result.errors:
        print(str(e), file=sys.stderr)
    print(result.summary())
    if result.errors:
        print(f"INVALID: {len(result.errors)} problem(s)", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
