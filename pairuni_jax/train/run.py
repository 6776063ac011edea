"""Run a job from its config: `run(config, workdir)`, the whole of `python -m pairuni_jax.main`."""

from __future__ import annotations

import os

import ml_collections


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Dispatch on `config.job`; every job resumes from what `workdir` already holds."""
    if config.job == "shapes":
        from pairuni_jax.train.shapes_job import ShapesJob

        job = ShapesJob(config, workdir)  # checks the config before anything is written
        _write_config(config, workdir)
        return job.run()
    if config.job == "pairug":
        from pairuni_jax.train.pairug_job import run_pairug

        _write_config(config, workdir)
        return run_pairug(config, workdir)
    raise ValueError(f"config.job={config.job!r}: expected 'shapes' or 'pairug'")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=1))
