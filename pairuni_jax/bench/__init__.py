"""Side-by-side benchmarks: `python -m pairuni_jax.bench SUBCOMMAND [--json PATH]`.

Each subcommand is a module `pairuni_jax.bench.<name>` with `run(args) -> list[Record]`
and an optional `add_args(parser)`; `common.py` holds the record type, timers and the table printer.
"""
