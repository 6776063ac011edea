"""Shared test setup: 8 forced CPU devices for the multi-device tests, and the torch reference.

Tests that need the PyTorch reference take the `torch` fixture. It skips when torch is missing on a
developer machine, but fails under CI (CI=true), where the parity tests must run.
"""

import importlib
import os

# Must happen before jax creates its CPU backend; single-device code still runs on device 0.
# The tests compile hundreds of small programs and run each for milliseconds, so LLVM's backend
# runs without its expensive optimisations (a third less compile time; same semantics).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
from reference import missing_reference  # noqa: E402


@pytest.fixture(scope="session")
def torch():
    """The torch module (the PyTorch reference); fails instead of skipping under CI."""
    try:
        return importlib.import_module("torch")
    except ImportError as e:
        missing_reference("torch", f"install requirements-dev.txt: {e}")


# Compiled programs are cached on disk for the whole run (subprocesses too: the notebook's kernel
# and the multi-process workers inherit the variable), so a program compiled by one test is loaded,
# not recompiled, by the next that builds it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    _cache = tempfile.mkdtemp(prefix="jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# Files that share the micro Shapes workdir (tests/micro_job.py) run in one worker under
# `pytest -n`; every other file stays whole in its worker, so its module fixtures build once.
_MICRO = {"test_main_job.py", "test_report.py", "test_ablate.py", "test_notebook.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = os.path.basename(str(item.fspath))
        item.add_marker(pytest.mark.xdist_group("micro" if name in _MICRO else name))
