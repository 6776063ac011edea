"""Shared benchmark plumbing: result records, a robust timer, the table printer and JSON output."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class Record:
    """One benchmark figure, ours next to the reference (ratio = ours / reference unless stated)."""

    name: str
    ours: float
    reference: float | None
    unit: str
    ratio: float | None = None
    note: str = ""

    def __post_init__(self):
        if self.ratio is None and self.reference not in (None, 0):
            self.ratio = self.ours / self.reference


def time_fn(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of `fn()`; `fn` must block until its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.4g}"
    return f"{x:.3e}"


def print_table(records: Sequence[Record], title: str = "") -> None:
    """Print records as an aligned text table."""
    rows = [("name", "ours", "reference", "unit", "ratio", "note")]
    rows += [
        (r.name, _fmt(r.ours), _fmt(r.reference), r.unit, _fmt(r.ratio), r.note) for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    if title:
        print(f"\n== {title} ==")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(records: Sequence[Record], path: str) -> None:
    """Write records as a JSON list of {"name", "ours", "reference", "unit", "ratio", "note"}."""
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in records], f, indent=1)
