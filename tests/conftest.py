"""Shared test switches.

CI sets REQUIRE_CPP_OPS=1, REQUIRE_NVCC=1 and REQUIRE_SLURM=1: under them a test that
would skip for lack of a compiler, nvcc or Slurm fails instead, so a skip can never hide a
missing part. Only GPU tests may skip in CI.
"""

import os
import time

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


@pytest.fixture(scope="module")
def cpp_ops():
    """The CPU WKV extension, built (or loaded from torch's cache) once per test module."""
    from rwkv_train.ops import loader

    t0 = time.perf_counter()
    try:
        mod = loader.load_cpu()
    except loader.ExtensionBuildError as exc:
        skip_unless_required("REQUIRE_CPP_OPS", f"C++ ops unavailable: {exc}")
    print(f"C++ WKV ops ready in {time.perf_counter() - t0:.1f} s")
    return mod


@pytest.fixture(scope="session")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two-rank ZeRO-2 and ZeRO-3 runs (tests/dist_utils.py), made once for the test
    modules that compare with them."""
    from dist_utils import make_runs

    return make_runs(tmp_path_factory.mktemp("dist"))
