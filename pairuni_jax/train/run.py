"""Run a job from its config: `run(config, workdir)`, the whole of `python -m pairuni_jax.main`."""

from __future__ import annotations

import os

import jax
import ml_collections

from pairuni_jax import files


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Dispatch on `config.job`; every job resumes from what `workdir` already holds."""
    use_compilation_cache(config.get("compile_cache", ""))
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
    files.makedirs(workdir)
    with files.open_file(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=1))


def use_compilation_cache(path: str) -> str | None:
    """Keep compiled XLA programs on disk at `path` ("" for none), so that a later process (a
    rerun, a resume, an ablation of the job's workdir, a run with other settings) loads the
    programs compiled before instead of compiling them again (about 40 s of the Shapes smoke run
    on 2 CPU cores). A cache directory already chosen (JAX_COMPILATION_CACHE_DIR, or jax.config)
    is kept. Returns the directory in use, if any."""
    current = jax.config.jax_compilation_cache_dir
    if current or not path:
        return current or None
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path
