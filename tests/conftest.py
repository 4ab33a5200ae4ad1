"""Shared test switches.

CI sets REQUIRE_CPP_OPS=1, REQUIRE_NVCC=1 and REQUIRE_SLURM=1: under them a test that
would skip for lack of a compiler, nvcc or Slurm fails instead, so a skip can never hide a
missing part. Only GPU tests may skip in CI.
"""

import os

import pytest


def skip_unless_required(variable: str, reason: str) -> None:
    """Skip with `reason`, or fail with it when the environment variable `variable` is "1"."""
    if os.environ.get(variable) == "1":
        pytest.fail(f"{reason} (and {variable}=1 says it must work here)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the W&B servers."""
    monkeypatch.setenv("WANDB_MODE", "offline")
