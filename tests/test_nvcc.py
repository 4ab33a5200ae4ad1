"""Every CUDA source compiles with nvcc for sm_80 and sm_90, without torch headers.

The .cu files hold only kernels and their launchers (the torch binding is wkv_cuda.cpp), so
this needs nvcc alone, no GPU. Skipped without nvcc, except under REQUIRE_NVCC=1 (CI), where a
missing nvcc is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from rwkv_train.paths import cuda_dir

ARCHS = ("80", "90")
SOURCES = sorted(p.name for p in cuda_dir().glob("*.cu"))


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        if os.environ.get("REQUIRE_NVCC") == "1":
            pytest.fail("REQUIRE_NVCC=1 but nvcc is not on PATH")
        pytest.skip("nvcc not on PATH")
    return path


def test_sources_found():
    assert {"wkv6.cu", "wkv4.cu"} <= set(SOURCES)


def test_nvcc_compiles_every_source(nvcc, tmp_path):
    """One nvcc per file (both architectures in it), all files at once."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    procs = {}
    for name in SOURCES:
        cmd = [nvcc, "-c", "-O3", "-std=c++17", *gencode, f"-I{cuda_dir()}"]
        cmd += [str(cuda_dir() / name), "-o", str(tmp_path / f"{name}.o")]
        procs[name] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    failures = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures[name] = out[-4000:]
        elif "warning" in out.lower():
            print(f"{name}: {out}")
    assert not failures, "\n".join(f"--- {n}\n{o}" for n, o in failures.items())
    for name in SOURCES:
        assert (tmp_path / f"{name}.o").stat().st_size > 0
