"""Run a job from its config: `run(config, workdir)`, the whole of `python -m pairuni_jax.main`."""

from __future__ import annotations

import os

import ml_collections


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Dispatch on `config.job`; every job resumes from what `workdir` already holds."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=1))
    if config.job == "shapes":
        from pairuni_jax.train.shapes_job import ShapesJob

        return ShapesJob(config, workdir).run()
    if config.job == "pairug":
        from pairuni_jax.train.pairug_job import run_pairug

        return run_pairug(config, workdir)
    raise ValueError(f"config.job={config.job!r}: expected 'shapes' or 'pairug'")
