"""What to do when a PyTorch reference package is missing: skip locally, fail under CI."""

import os

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_reference(what: str, hint: str) -> None:
    """Fail (CI) or skip (a developer machine): the parity tests must run in CI."""
    if under_ci():
        pytest.fail(f"{what} is required for the parity tests under CI ({hint})")
    pytest.skip(f"{what} not installed ({hint})")
