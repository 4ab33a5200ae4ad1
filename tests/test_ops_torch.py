"""The chunked PyTorch WKV ops against the plain recurrences of `rwkv_train.ops.reference`.

Everything runs on the CPU in float64 (so any difference is a bug, not rounding), at odd
shapes and over the whole decay range d = exp(-exp(w)), w from 3 (d = e^-20: forgets at
once) to -6 (d = 0.9975: remembers for hundreds of steps), including mixtures of both in one
tensor. Each comparison checks the output, the final state and the gradients of every input,
the initial state included, with random cotangents for both outputs.
"""

import re
from collections.abc import Callable

import pytest
import torch

from rwkv_train.ops import chunked, wkv4, wkv5, wkv6
from rwkv_train.ops.reference import wkv4_reference, wkv5_reference, wkv6_reference

F64 = torch.float64


def decays(kind: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Raw decays w of one regime: d = exp(-exp(w))."""
    if kind == "strong":  # d = exp(-e^3) ~ 2e-9: every step forgets the past
        return torch.full(shape, 3.0, dtype=F64)
    if kind == "weak":  # d = exp(-e^-6) ~ 0.9975
        return torch.full(shape, -6.0, dtype=F64)
    if kind == "uniform":
        return torch.rand(shape, generator=g, dtype=F64) * 9 - 6
    if kind == "mixture":  # long weak runs broken by single strong steps, per channel
        w = torch.full(shape, -6.0, dtype=F64)
        strong = torch.rand(shape, generator=g, dtype=F64) < 0.15
        w[strong] = 3.0
        w[..., : shape[-1] // 2] = (
            torch.rand((*shape[:-1], shape[-1] // 2), generator=g, dtype=F64) * 9 - 6
        )
        return w
    raise ValueError(kind)


def inputs6(
    B: int, T: int, H: int, N: int, kind: str, seed: int = 0, state: bool = True
) -> list[torch.Tensor | None]:
    """r, k, v, w, u, state for RWKV-6 (float64)."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=F64) for _ in range(3))
    w = decays(kind, (B, T, H, N), g)
    u = torch.randn(H, N, generator=g, dtype=F64)
    s0 = torch.randn(B, H, N, N, generator=g, dtype=F64) if state else None
    return [r, k, v, w, u, s0]


def outputs_and_grads(
    f: Callable, args: list[torch.Tensor | None], seed: int = 1
) -> list[torch.Tensor]:
    """[y, state, grad of every tensor argument] with fixed random cotangents."""
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    y, s = f(*leaves)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=F64).to(y.dtype)  # same values at any dtype
    gs = torch.randn(s.shape, generator=g, dtype=F64).to(s.dtype)
    used = [x for x in leaves if x is not None]
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), used)
    return [y.detach(), s.detach(), *grads]


NAMES6 = ["y", "state", "dr", "dk", "dv", "dw", "du", "dstate0"]


def assert_all_close(
    got: list[torch.Tensor],
    want: list[torch.Tensor],
    names: list[str],
    rtol: float,
    atol: float = 0.0,
) -> None:
    """Each tensor within rtol of the largest magnitude of its reference, plus atol.

    atol matters for dw under strong decays: the true value is ~e^-20 while the terms it
    is made of are O(1), so a relative test of it alone would test rounding noise.
    """
    assert len(got) == len(want)
    for name, a, b in zip(names, got, want, strict=False):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err = (a.to(F64) - b).abs().max().item()
        scale = b.abs().max().item() + 1e-30
        assert err <= rtol * scale + atol, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk 16 and segments of 64 tokens, so modest T crosses many chunks and segments."""
    monkeypatch.setattr(chunked, "CHUNK", 16)
    monkeypatch.setattr(chunked, "SEGMENT", 64)


@pytest.mark.parametrize("kind", ["strong", "weak", "uniform", "mixture"])
@pytest.mark.parametrize("T", [1, 15, 129])
def test_wkv6_matches_reference(T: int, kind: str) -> None:
    args = inputs6(2, T, 3, 16, kind, seed=T)
    want = outputs_and_grads(wkv6_reference, args)
    got = outputs_and_grads(chunked.wkv6_chunked, args)
    assert_all_close(got, want, NAMES6, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["uniform", "mixture"])
def test_wkv6_many_chunks_and_segments(small_chunks: None, kind: str) -> None:
    """T = 201 with chunk 16 and segment 64: 13 chunks, 4 segments, a ragged last chunk."""
    args = inputs6(2, 201, 2, 8, kind, seed=3)
    want = outputs_and_grads(wkv6_reference, args)
    got = outputs_and_grads(chunked.wkv6_chunked, args)
    assert_all_close(got, want, NAMES6, rtol=1e-10, atol=1e-10)


def test_wkv6_without_initial_state() -> None:
    args = inputs6(1, 40, 2, 8, "uniform", state=False)
    want = outputs_and_grads(wkv6_reference, args)
    got = outputs_and_grads(chunked.wkv6_chunked, args)
    assert_all_close(got, want, NAMES6[:-1], rtol=1e-10, atol=1e-10)


def test_wkv6_split_call_carries_the_state() -> None:
    """Two calls passing the state equal one call over the whole sequence."""
    r, k, v, w, u, s0 = inputs6(2, 70, 2, 8, "mixture")
    y, s = chunked.wkv6_chunked(r, k, v, w, u, s0)
    y1, s1 = chunked.wkv6_chunked(r[:, :33], k[:, :33], v[:, :33], w[:, :33], u, s0)
    y2, s2 = chunked.wkv6_chunked(r[:, 33:], k[:, 33:], v[:, 33:], w[:, 33:], u, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(s2, s)


def test_wkv6_empty_sequence() -> None:
    r, k, v, w, u, s0 = inputs6(2, 0, 2, 4, "uniform")
    y, s = chunked.wkv6_chunked(r, k, v, w, u, s0)
    assert y.shape == (2, 0, 2, 4)
    torch.testing.assert_close(s, s0)


def test_public_entry_point_uses_chunked() -> None:
    args = inputs6(1, 20, 2, 8, "uniform")
    for a, b in zip(wkv6(*args, backend="torch"), chunked.wkv6_chunked(*args), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["strong", "weak", "uniform", "mixture"])
def test_wkv6_float32_accuracy(kind: str) -> None:
    """float32 compute (the CPU/GPU training path) stays close to float64 and finite."""
    args = inputs6(2, 200, 2, 16, kind, seed=7)
    want = outputs_and_grads(wkv6_reference, args)
    got = outputs_and_grads(chunked.wkv6_chunked, [a.float() for a in args])
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    keep = [i for i, n in enumerate(NAMES6) if n != "dw"]
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    assert_all_close(pick(got), pick(want), pick(NAMES6), rtol=2e-4, atol=1e-4)
    # dw = d(loss)/d(log d) * log d comes from sums of O(|log d| |r dr|) terms that cancel
    # (to ~e^-20 under strong decays), so its error is measured against those terms.
    r, w, dr = args[0], args[3], want[2]
    terms = (torch.exp(w) * (r * dr).abs()).max().item()
    assert (got[5].to(F64) - want[5]).abs().max().item() <= 1e-6 * terms


def test_wkv6_decays_beyond_the_range_stay_finite() -> None:
    """w up to 30 (d = exp(-e^30)): clamped to d = e^-60 inside, results still match."""
    args = inputs6(1, 70, 2, 8, "uniform", seed=2)
    args[3] = args[3] * 4  # w in [-24, 12]
    args[3][0, 5:9] = 30.0
    want = outputs_and_grads(wkv6_reference, args)
    got = outputs_and_grads(chunked.wkv6_chunked, [a.float() for a in args])
    assert_all_close(got[:5], want[:5], NAMES6[:5], rtol=2e-4, atol=1e-4)


def test_wkv6_bfloat16_inputs() -> None:
    """bf16 in: fp32 inside, bf16 y (one bf16 rounding, ~2^-8 relative), fp32 state."""
    args = inputs6(2, 100, 2, 32, "mixture", seed=5)
    r, k, v, w, u = (a.bfloat16() for a in args[:5])
    s0 = args[5].float()
    y, s = chunked.wkv6_chunked(r, k, v, w, u, s0)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, s_ref = wkv6_reference(*(a.to(F64) for a in (r, k, v, w, u, s0)))
    assert_all_close([y, s], [y_ref, s_ref], ["y", "state"], rtol=8e-3)
    # The gradients flow back into the bf16 leaves in their own dtype.
    leaves = [a.detach().requires_grad_() for a in (r, k, v, w, u)]
    y, s = chunked.wkv6_chunked(*leaves, s0)
    (y.float().sum() + s.sum()).backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in leaves)


@pytest.mark.parametrize("kind", ["strong", "uniform", "mixture"])
@pytest.mark.parametrize("T", [15, 129])
def test_wkv5_matches_reference(T: int, kind: str) -> None:
    r, k, v, w, u, s0 = inputs6(2, T, 3, 16, kind, seed=T)
    args = [r, k, v, w[0, 0], u, s0]  # static decay (H, N)
    want = outputs_and_grads(wkv5_reference, args)
    got = outputs_and_grads(chunked.wkv5_chunked, args)
    assert_all_close(got, want, NAMES6, rtol=1e-10, atol=1e-10)
    got_public = outputs_and_grads(lambda *a: wkv5(*a, backend="torch"), args)
    assert_all_close(got_public, want, NAMES6, rtol=1e-10, atol=1e-10)


def inputs4(B: int, T: int, C: int, seed: int = 0) -> list[torch.Tensor]:
    """k, v, w, u and a realistic (aa, bb, pp) state: the reference's state after 10 steps."""
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, T + 10, C, generator=g, dtype=F64) for _ in range(2))
    w = torch.rand(C, generator=g, dtype=F64) * 9 - 6  # per-step log decay -exp(w)
    u = torch.randn(C, generator=g, dtype=F64)
    _, s0 = wkv4_reference(k[:, :10], v[:, :10], w, u)
    return [k[:, 10:], v[:, 10:], w, u, s0]


@pytest.mark.parametrize("T", [1, 15, 129])
def test_wkv4_matches_reference(T: int) -> None:
    args = inputs4(2, T, 24, seed=T)
    names = ["y", "state", "dk", "dv", "dw", "du", "dstate0"]
    want = outputs_and_grads(wkv4_reference, args)
    got = outputs_and_grads(chunked.wkv4_chunked, args)
    assert_all_close(got, want, names, rtol=1e-10)
    got_public = outputs_and_grads(lambda *a: wkv4(*a, backend="torch"), args)
    assert_all_close(got_public, want, names, rtol=1e-10)
    # Without a state: starts from (0, 0, -1e30) like the reference.
    torch.testing.assert_close(chunked.wkv4_chunked(*args[:4])[0], wkv4_reference(*args[:4])[0])


def test_gradcheck_references() -> None:
    """The references' autograd gradients are the true derivatives (tiny sizes)."""
    a6 = [x.requires_grad_() for x in inputs6(1, 4, 1, 2, "uniform")]
    assert torch.autograd.gradcheck(wkv6_reference, a6)
    r, k, v, w, u, s0 = inputs6(1, 4, 1, 2, "uniform", seed=1)
    a5 = [x.requires_grad_() for x in (r, k, v, w[0, 0], u, s0)]
    assert torch.autograd.gradcheck(wkv5_reference, a5)
    a4 = [x.requires_grad_() for x in inputs4(1, 4, 3)]
    assert torch.autograd.gradcheck(wkv4_reference, a4)


def test_gradcheck_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-written backward against finite differences, across chunks and segments."""
    monkeypatch.setattr(chunked, "CHUNK", 4)  # levels of 2 and 1 tokens
    monkeypatch.setattr(chunked, "SEGMENT", 8)
    a6 = [x.requires_grad_() for x in inputs6(1, 10, 1, 2, "mixture")]  # 3 chunks, 2 segments
    assert torch.autograd.gradcheck(chunked.wkv6_chunked, a6)


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda x, w5, u: wkv6(x.long(), x, x, x, u), "r must be a floating-point"),
        (lambda x, w5, u: wkv6(x[0], x, x, x, u), "r must be (B, T, H, N)"),
        (lambda x, w5, u: wkv6(x, x, x, w5, u), "w of RWKV-6 must be (B, T, H, N)"),
        (lambda x, w5, u: wkv5(x, x, x, x, u), "w of RWKV-5 must be (H, N)"),
        (lambda x, w5, u: wkv6(x, x, x, x, u[0]), "u must be (H, N) = (3, 8)"),
        (lambda x, w5, u: wkv6(x, x[:, :4], x, x, u), "k must be (B, T, H, N)"),
        (lambda x, w5, u: wkv5(x, x, x, w5, u, torch.zeros(1, 3, 8, 8)), "state must be"),
        (lambda x, w5, u: wkv4(x[..., 0], x[..., 0], u[0], u[0]), "w must be (C,) = (3,)"),
    ],
)
def test_bad_shapes_and_dtypes_are_named_for_every_backend(call: Callable, problem: str) -> None:
    """The chunked form failed deep inside (or truncated integer inputs) where the fused ops
    stopped in C++: one check in front of every backend names the argument."""
    x = torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match=re.escape(problem)):
        call(x, torch.randn(3, 8), torch.randn(3, 8))
