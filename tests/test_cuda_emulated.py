"""The CUDA kernels' own source (RWKV-4, 5 and 6), run on CPU threads, against the float64
recurrence.

CI has no GPU, and the GPU tests run only when a GPU is lent, so a mistake in the kernels'
chunking, indexing or barriers would otherwise reach main unseen. tests/cuda_emu compiles
cuda/wkv56_kernels.cuh and cuda/wkv4_kernels.cuh as plain C++ (g++ -std=c++20): each CUDA
thread becomes a std::thread, __syncthreads a std::barrier, __shared__ arrays function
statics, one block at a time. The launch shapes copy cuda/wkv6.cu's and cuda/wkv4.cu's. What
this cannot see: timing, warp-level behaviour (the kernels use none) and the CUDA compiler
itself (tests/test_nvcc.py compiles with nvcc).
Needs g++; under REQUIRE_CPP_OPS=1 (CI) a missing compiler is a failure.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import skip_unless_required

from rwkv_train.ops.fused import zero_state4
from rwkv_train.ops.testing import FUSED_BOUNDS, assert_within, compare, make_case
from rwkv_train.paths import cuda_dir

EMU = Path(__file__).parent / "cuda_emu"
TOL = {torch.float32: 3e-5, torch.bfloat16: 1.2e-2}


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = shutil.which("g++")
    if cxx is None:
        skip_unless_required("REQUIRE_CPP_OPS", "g++ not on PATH")
    out = tmp_path_factory.mktemp("cuda_emu") / "libwkv56_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", f"-I{EMU}", f"-I{cuda_dir()}"]
    cmd += [str(EMU / "harness.cpp"), "-o", str(out), "-lpthread"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"emulation build failed:\n{done.stderr[-3000:]}"
    return ctypes.CDLL(str(out))


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def emulated(lib: ctypes.CDLL, static: bool):
    """wkv6 (static=False) or wkv5 as f(r, k, v, w, u, s0) -> (y, sT) with autograd."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, r, k, v, w, u, s0):
            B, T, H, N = r.shape
            r, k, v = (x.contiguous() for x in (r, k, v))
            w = (w.float() if static else w.to(r.dtype)).contiguous()
            u, s0 = u.float().contiguous(), s0.float().contiguous()
            y, sT = torch.empty_like(r), torch.empty_like(s0)
            bf16 = int(r.dtype == torch.bfloat16)
            args = [_p(x) for x in (r, k, v, w, u, s0, y, sT)]
            assert lib.emu_wkv56_forward(bf16, int(static), B, T, H, N, *args) == 0
            ctx.save_for_backward(r, k, v, w, u, s0)
            return y, sT

        @staticmethod
        def backward(ctx, gy, gsT):
            r, k, v, w, u, s0 = ctx.saved_tensors
            B, T, H, N = r.shape
            gy, gsT = gy.to(r.dtype).contiguous(), gsT.float().contiguous()
            gr, gk, gv = (torch.empty_like(r) for _ in range(3))
            gw = torch.empty(B, H, N) if static else torch.empty_like(w)
            gu, gs0 = torch.empty(B, H, N), torch.empty_like(s0)
            q, acc = torch.empty(r.shape), torch.empty(B, H, N)
            bf16 = int(r.dtype == torch.bfloat16)
            bufs = (r, k, v, w, u, s0, gy, gsT, gr, gk, gv, gw, gu, gs0, q, acc)
            assert lib.emu_wkv56_backward(bf16, int(static), B, T, H, N, *map(_p, bufs)) == 0
            return gr, gk, gv, gw.sum(0) if static else gw, gu.sum(0), gs0

    return Op.apply


# T around the chunk lengths (8 and 16 steps): 1, one short of a chunk, several chunks and a
# remainder; head sizes 32, 64 and 128 (whose chunks are shorter).
SHAPES = [(2, 1, 1, 64), (2, 15, 2, 64), (2, 37, 3, 64), (1, 40, 2, 32), (1, 21, 1, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "T", "H", "N"), SHAPES)
@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
def test_cuda_kernels_emulated_match_reference(lib, op, B, T, H, N, dtype):
    case = make_case(op, B=B, T=T, H=H, N=N, dtype=dtype, seed=T * 10 + H)
    errs = compare(case, emulated(lib, static=op == "wkv5"))
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]}: {bad}"


def emulated4(lib: ctypes.CDLL):
    """wkv4 as f(k, v, w, u, state=None) -> (y, sT) with autograd."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, k, v, w, u, s0):
            B, T, C = k.shape
            k, v = k.contiguous(), v.contiguous()
            w, u, s0 = (x.float().contiguous() for x in (w, u, s0))
            y, sT = torch.empty_like(k), torch.empty_like(s0)
            bf16 = int(k.dtype == torch.bfloat16)
            args = [_p(x) for x in (k, v, w, u, s0, y, sT)]
            assert lib.emu_wkv4_forward(bf16, B, T, C, *args) == 0
            ctx.save_for_backward(k, v, w, u, s0)
            return y, sT

        @staticmethod
        def backward(ctx, gy, gsT):
            k, v, w, u, s0 = ctx.saved_tensors
            B, T, C = k.shape
            gy, gsT = gy.to(k.dtype).contiguous(), gsT.float().contiguous()
            gk, gv = torch.empty_like(k), torch.empty_like(v)
            gw, gu, gs0 = torch.empty(B, C), torch.empty(B, C), torch.empty_like(s0)
            states = torch.empty(B, T, 3, C)
            bf16 = int(k.dtype == torch.bfloat16)
            bufs = (k, v, w, u, s0, gy, gsT, gk, gv, gw, gu, gs0, states)
            assert lib.emu_wkv4_backward(bf16, B, T, C, *map(_p, bufs)) == 0
            return gk, gv, gw.sum(0), gu.sum(0), gs0

    def op(k, v, w, u, state=None):
        return Op.apply(k, v, w, u, zero_state4(k) if state is None else state)

    return op


# B x C = B x H x N threads: one block of 128, or four with a partial last one.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "T", "H", "N"), [(2, 1, 1, 40), (2, 15, 1, 40), (2, 33, 5, 40)])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
def test_wkv4_cuda_kernels_emulated_match_reference(lib, B, T, H, N, dtype, with_state):
    case = make_case("wkv4", B=B, T=T, H=H, N=N, dtype=dtype, with_state=with_state, seed=T)
    assert_within(compare(case, emulated4(lib)), FUSED_BOUNDS[dtype])
