"""The jobs keep compiled programs on disk (`compile_cache`), unless a cache is already chosen."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process per case: the cache directory is process-wide JAX state.
SCRIPT = """
import os, sys
import jax, jax.numpy as jnp, ml_collections
from pairuni_jax.train import run as run_lib

config = ml_collections.ConfigDict({"job": "none", "compile_cache": sys.argv[1]})
try:
    run_lib.run(config, sys.argv[2])  # sets the cache up, then refuses the unknown job
except ValueError as e:
    assert "config.job='none'" in str(e), e
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.ones(7)).block_until_ready()
print(jax.config.jax_compilation_cache_dir)
"""


def _run(tmp_path, env_cache: str | None, compile_cache: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    if env_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = env_cache
    out = subprocess.run([sys.executable, "-c", SCRIPT, compile_cache, str(tmp_path / "work")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()[-1]


def _programs(path) -> list[str]:
    """The cache entries of the script's jitted lambda."""
    names = os.listdir(path) if os.path.isdir(path) else []
    return [n for n in names if n.startswith("jit__lambda")]


@pytest.mark.parametrize("tilde", [False, True])
def test_the_config_names_the_cache_directory(tmp_path, tilde, monkeypatch):
    cache = tmp_path / "cache"
    path = str(cache)
    if tilde:  # "~/..." is the user's home, as in the configs' default
        monkeypatch.setenv("HOME", str(tmp_path))
        path = "~/cache"
    assert _run(tmp_path, None, path) == str(cache)
    assert len(_programs(cache)) == 1


def test_a_cache_chosen_by_the_environment_wins_and_empty_turns_it_off(tmp_path):
    assert _run(tmp_path, str(tmp_path / "env"), str(tmp_path / "cfg")) == str(tmp_path / "env")
    assert len(_programs(tmp_path / "env")) == 1 and not _programs(tmp_path / "cfg")
    assert _run(tmp_path, None, "") == "None"
