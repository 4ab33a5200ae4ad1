"""The fused CUDA WKV ops against the float64 recurrences (run on the GPU), at the CPU test
shapes and at T = 4096 and 16384, fp32 and bf16 inputs; and the whole model with backend
"cuda" against backend "torch". Marked `gpu`; skipped with a reason without CUDA.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from rwkv_train.ops import fused, loader, segments
from rwkv_train.ops.testing import FUSED_BOUNDS, assert_within, compare, make_case

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU available", allow_module_level=True)

# The CPU tests' bounds (FUSED_BOUNDS), and a little wider for bf16 at long T (more
# rounding of y).
LONG_TOL = {
    torch.float32: {"default": 1e-4, "g_w": 1e-3},
    torch.bfloat16: {"default": 1.5e-2, "g_w": 2e-2},
}


@pytest.fixture(scope="module")
def cuda_ops():
    t0 = time.perf_counter()
    try:
        mod = loader.load_cuda()
    except loader.ExtensionBuildError as exc:
        pytest.fail(f"a GPU is present but the CUDA ops did not build: {exc}")
    print(f"CUDA WKV ops ready in {time.perf_counter() - t0:.1f} s")
    return mod


def _check(errs: dict[str, float], tol: dict[str, float]) -> None:
    print({k: f"{v:.2e}" for k, v in errs.items()})
    assert_within(errs, tol)


SHAPES = [(T, H) for T in (1, 15, 257) for H in (1, 2, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("T", "H"), SHAPES)
@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
def test_wkv56_matches_reference(cuda_ops, op, T, H, dtype):
    case = make_case(op, B=2, T=T, H=H, dtype=dtype, device="cuda", seed=T * 10 + H)
    _check(compare(case, getattr(fused, op)), FUSED_BOUNDS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [4096, 16384])
def test_wkv6_long(cuda_ops, T, dtype):
    case = make_case("wkv6", B=2, T=T, H=2, dtype=dtype, device="cuda", seed=T)
    _check(compare(case, fused.wkv6), LONG_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wkv5_long(cuda_ops, dtype):
    case = make_case("wkv5", B=2, T=4096, H=2, dtype=dtype, device="cuda", seed=3)
    _check(compare(case, fused.wkv5), LONG_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
@pytest.mark.parametrize("n", [4, 16])
def test_time_segments_match_reference(cuda_ops, op, n, dtype):
    """ops/segments.py's two kernel passes each way, forced into n segments (the tuned rule
    may choose none at a shape): output, final state and every gradient against float64."""
    case = make_case(op, B=1, T=4096, H=2, dtype=dtype, device="cuda", seed=n)

    def split(r, k, v, w, u, s0):
        return segments.wkv56(r, k, v, w, u, s0, n, op == "wkv5")

    _check(compare(case, split), LONG_TOL[dtype])


@pytest.mark.parametrize("N", [32, 128])
def test_other_head_sizes(cuda_ops, N):
    case = make_case("wkv6", B=2, T=33, H=2, N=N, device="cuda")
    _check(compare(case, fused.wkv6), FUSED_BOUNDS[torch.float32])


def test_bf16_inputs_fp32_decay(cuda_ops):
    """The model may form w in float32 while r, k, v are bf16."""
    case = make_case("wkv6", B=2, T=65, H=2, dtype=torch.bfloat16, device="cuda")
    case.args[3] = case.args[3].float()
    _check(compare(case, fused.wkv6), FUSED_BOUNDS[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 15, 257, 4096])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
def test_wkv4_matches_reference(cuda_ops, T, dtype, with_state):
    case = make_case(
        "wkv4", B=2, T=T, H=3, N=40, dtype=dtype, device="cuda", with_state=with_state, seed=T
    )
    _check(compare(case, fused.wkv4), (FUSED_BOUNDS if T < 1000 else LONG_TOL)[dtype])


def test_matches_cpu_op(cuda_ops):
    """CUDA and CPU C++ ops agree (both float32 inside)."""
    try:
        loader.load_cpu()
    except loader.ExtensionBuildError as exc:
        pytest.skip(f"C++ ops unavailable: {exc}")
    case = make_case("wkv6", B=2, T=300, H=3, device="cuda")
    y, s = fused.wkv6(*case.args)
    yc, sc = fused.wkv6(*(a.cpu() for a in case.args))
    torch.testing.assert_close(y.cpu(), yc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.cpu(), sc, rtol=1e-4, atol=1e-4)


def test_torch_compile_cuda(cuda_ops):
    case = make_case("wkv6", B=1, T=9, H=1, device="cuda")

    def f(r, k, v, w, u, s0):
        y, s = fused.wkv6(r, k, v, w, u, s0)
        return y.sum() + s.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*case.args), f(*case.args))


_HAS_MODEL = importlib.util.find_spec("rwkv_train.model") is not None


@pytest.mark.skipif(not _HAS_MODEL, reason="rwkv_train.model is not there")
@pytest.mark.parametrize("version", [4, 5, 6])
def test_model_cuda_equals_torch(cuda_ops, version):
    try:
        from rwkv_train.model import RWKV, RWKVConfig
    except ImportError as exc:
        pytest.skip(f"rwkv_train.model does not import here: {exc}")
    torch.manual_seed(0)
    cfg = dict(version=version, n_layer=2, n_embd=128, vocab_size=97)
    ref = RWKV(RWKVConfig(**cfg, wkv_backend="torch")).cuda()
    fast = RWKV(RWKVConfig(**cfg, wkv_backend="cuda")).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 97, (2, 65), device="cuda")
    logits_ref, logits = ref(idx), fast(idx)
    torch.testing.assert_close(logits, logits_ref, rtol=2e-4, atol=2e-4)
    logits_ref.float().logsumexp(-1).mean().backward()
    logits.float().logsumexp(-1).mean().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-3, atol=2e-5, msg=name)
