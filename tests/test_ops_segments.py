"""Time-segmented RWKV-5/6 WKV (`ops/segments.py`) on the CPU C++ op: the same outputs,
final state and gradients as one unsplit call and as the float64 recurrence, and the rule
that picks the segment count on a GPU."""

from __future__ import annotations

import pytest
import torch

from rwkv_train.ops import fused, segments  # noqa: F401 (fused registers the ops)
from rwkv_train.ops.testing import (
    FUSED_BOUNDS,
    assert_within,
    compare,
    make_case,
    rel_err,
    run_with_grads,
)


def _split(n: int, static: bool):
    def fn(r, k, v, w, u, s0=None):
        B, _, H, N = r.shape
        s0 = r.new_zeros(B, H, N, N, dtype=torch.float32) if s0 is None else s0
        return segments.wkv56(r, k, v, w, u, s0, n, static)

    return fn


def _unsplit(static: bool):
    op = torch.ops.rwkv.wkv5 if static else torch.ops.rwkv.wkv6

    def fn(r, k, v, w, u, s0):
        return op(r, k, v, w, u, s0)

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
@pytest.mark.parametrize("n", [2, 4])
def test_matches_reference(cpp_ops, op, n, dtype):
    case = make_case(op, B=2, T=64, H=2, dtype=dtype, seed=n)
    assert_within(compare(case, _split(n, op == "wkv5")), FUSED_BOUNDS[dtype])


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
def test_equals_one_call(cpp_ops, op, with_state):
    """Against the unsplit kernel in float32: every output and gradient, 8 segments of 32."""
    static = op == "wkv5"
    case = make_case(op, B=1, T=256, H=3, seed=7, with_state=with_state)
    args = list(case.args)
    if args[-1] is None:
        args[-1] = torch.zeros(1, 3, 64, 64)
    g = torch.Generator().manual_seed(3)
    gy, gs = torch.randn(1, 256, 3, 64, generator=g), torch.randn(1, 3, 64, 64, generator=g)
    want = run_with_grads(_unsplit(static), args, gy, gs)
    got = run_with_grads(_split(8, static), args, gy, gs)
    errs = {key: rel_err(got[key], want[key]) for key in want}
    assert max(errs.values()) < 2e-5, errs


def test_strong_decay_does_not_overflow(cpp_ops):
    """Decays near 0 over a long segment: a_t underflows to 0, which must stay finite."""
    case = make_case("wkv6", B=1, T=512, H=1, seed=1)
    r, k, v, w, u, s0 = case.args
    w = torch.full_like(w, 2.0)  # d = exp(-e^2), about 6e-4 per step
    y, sT = segments.wkv56(r, k, v, w, u, s0, 2, False)
    y1, sT1 = torch.ops.rwkv.wkv6(r, k, v, w, u, s0)
    assert torch.isfinite(y).all() and torch.isfinite(sT).all()
    assert rel_err(y, y1) < 2e-5 and rel_err(sT, sT1) < 2e-5


def test_rejects_uneven_split(cpp_ops):
    case = make_case("wkv6", B=1, T=30, H=1)
    with pytest.raises(ValueError, match="does not divide"):
        segments.wkv56(*case.args[:5], torch.zeros(1, 1, 64, 64), 4, False)


@pytest.mark.parametrize(
    ("pairs", "T", "sms", "want"),
    [
        (320, 4096, 132, 1),  # B=8, H=40: the GPU is already full
        (160, 4096, 132, 1),  # B=4, H=40: 4 segments would fit; the second pass costs as much
        (80, 4096, 132, 8),  # B=2, H=40: measured fastest in 8 (4 and 16 slower)
        (40, 16384, 132, 16),  # B=1, H=40: measured fastest in 16
        (64, 4096, 132, 8),  # B=1, H=64 (Finch 7B)
        (32, 4096, 132, 16),  # B=1, H=32 (Finch 1.6B)
        (40, 4097, 132, 1),  # odd T cannot split
        (4, 1024, 132, 1),  # segments stay at least 256 steps long, so 4 at most here
        (4, 4096, 132, 16),  # and at most 16
    ],
)
def test_segment_count(pairs, T, sms, want):
    assert segments.choose(pairs, T, sms) == want


def test_cpu_calls_are_not_split():
    assert segments.count(1, 1 << 16, 1, torch.device("cpu")) == 1


def test_torch_compile(cpp_ops):
    """The autograd.Function and its Python scan trace under torch.compile, gradients too."""
    case = make_case("wkv6", B=1, T=64, H=2, seed=5)
    compiled = torch.compile(_split(4, static=False))
    g = torch.Generator().manual_seed(0)
    gy, gs = torch.randn(1, 64, 2, 64, generator=g), torch.randn(1, 2, 64, 64, generator=g)
    got = run_with_grads(compiled, case.args, gy, gs)
    want = run_with_grads(_split(4, static=False), case.args, gy, gs)
    errs = {key: rel_err(got[key], want[key]) for key in want}
    assert max(errs.values()) < 1e-6, errs


def test_autocast_keeps_float32_chain(cpp_ops):
    """Under bf16 autocast (how GPU training runs) the result is the float32 one."""
    case = make_case("wkv6", B=1, T=128, H=2, seed=9)
    g = torch.Generator().manual_seed(0)
    gy, gs = torch.randn(1, 128, 2, 64, generator=g), torch.randn(1, 2, 64, 64, generator=g)
    want = run_with_grads(_split(4, static=False), case.args, gy, gs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_with_grads(_split(4, static=False), case.args, gy, gs)
    errs = {key: rel_err(got[key], want[key]) for key in want}
    assert max(errs.values()) < 1e-6, errs
