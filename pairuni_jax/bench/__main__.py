"""Dispatch `python -m pairuni_jax.bench NAME [options] [--json PATH]` to pairuni_jax.bench.NAME."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import pairuni_jax.bench as bench_pkg
from pairuni_jax.bench.common import print_table, write_json


def _subcommands() -> list[str]:
    skip = {"common", "__main__"}
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name not in skip)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = _subcommands()
    if not argv or argv[0] not in names:
        print(f"usage: python -m pairuni_jax.bench {{{','.join(names)}}} [--json PATH] ...")
        return 2
    module = importlib.import_module(f"pairuni_jax.bench.{argv[0]}")
    parser = argparse.ArgumentParser(prog=f"python -m pairuni_jax.bench {argv[0]}")
    parser.add_argument("--json", help="also write the records to this JSON file")
    if hasattr(module, "add_args"):
        module.add_args(parser)
    args = parser.parse_args(argv[1:])
    records = module.run(args)
    print_table(records, title=argv[0])
    if args.json:
        write_json(records, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
