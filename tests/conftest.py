"""Shared test setup: 8 forced CPU devices for the multi-device tests, and the torch reference.

Tests that need the PyTorch reference take the `torch` fixture. It skips when torch is missing on a
developer machine, but fails under CI (CI=true), where the parity tests must run.
"""

import importlib
import os

# Must happen before jax creates its CPU backend; single-device code still runs on device 0.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def _import_or_fail(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{name} is required for the parity tests under CI: {e}")
        pytest.skip(f"{name} not installed (install requirements-dev.txt)")


@pytest.fixture(scope="session")
def torch():
    """The torch module (the PyTorch reference); fails instead of skipping under CI."""
    return _import_or_fail("torch")
