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
from reference import missing_reference  # noqa: E402


@pytest.fixture(scope="session")
def torch():
    """The torch module (the PyTorch reference); fails instead of skipping under CI."""
    try:
        return importlib.import_module("torch")
    except ImportError as e:
        missing_reference("torch", f"install requirements-dev.txt: {e}")
