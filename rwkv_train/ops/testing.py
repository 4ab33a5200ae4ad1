"""Checking a WKV implementation against the float64 recurrences of `reference.py`.

Shared by the CPU and GPU kernel tests and by the GPU benchmark, so all three draw inputs the
same way and measure error the same way: ||out - ref|| / ||ref|| for the output, the final
state and every gradient (inputs, u and the initial state), with one random upstream
gradient for y and one for the final state. Needs torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rwkv_train.ops.reference import wkv4_reference, wkv5_reference, wkv6_reference

REFERENCES = {"wkv4": wkv4_reference, "wkv5": wkv5_reference, "wkv6": wkv6_reference}


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, which fails any bound)."""
    out, ref = out.double(), ref.double().to(out.device)
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


@dataclass
class Case:
    """Random inputs of one op: `args` in the op's order, the initial state last (or None)."""

    op: str
    args: list[Tensor | None]
    names: list[str]


def make_case(
    op: str,
    B: int,
    T: int,
    H: int,
    N: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_state: bool = True,
    seed: int = 0,
) -> Case:
    """Inputs on realistic scales: raw decays from strong to near 1, a random initial state.

    For wkv4, C = H * N channels. Inputs are drawn in float32 and rounded to `dtype`; u and the
    state stay float32 (u is a float32 parameter in mixed-precision training).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    if op == "wkv4":
        C = H * N
        k, v = rnd(B, T, C), rnd(B, T, C)
        w, u = rnd(C, scale=1.0, shift=-1.0), rnd(C, scale=0.5)
        s0 = None
        if with_state:
            aa = rnd(B, C)
            bb = torch.rand(B, C, generator=g).to(device) + 0.5
            pp = rnd(B, C)
            s0 = torch.stack([aa, bb, pp], dim=1)
        return Case(op, [k.to(dtype), v.to(dtype), w, u, s0], ["k", "v", "w", "u", "state"])
    r, k, v = (rnd(B, T, H, N, scale=0.5) for _ in range(3))
    wshape = (B, T, H, N) if op == "wkv6" else (H, N)
    # exp(w) in [~0.02, ~2.7]: decays from 0.07 to 0.98 per step
    w = rnd(*wshape, scale=0.8, shift=-1.5).clamp(-4.0, 1.0)
    u = rnd(H, N, scale=0.5)
    s0 = rnd(B, H, N, N, scale=0.3) if with_state else None
    xs = [r.to(dtype), k.to(dtype), v.to(dtype), w.to(dtype) if op == "wkv6" else w]
    return Case(op, [*xs, u, s0], ["r", "k", "v", "w", "u", "state"])


def run_with_grads(
    fn: Callable, args: list[Tensor | None], gy: Tensor, gs: Tensor
) -> dict[str, Tensor]:
    """Outputs and gradients of fn(*args): {"y", "state_out", "g_<name>"...} (positional)."""
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    y, sT = fn(*leaves)
    loss = (y.double() * gy.double()).sum() + (sT.double() * gs.double()).sum()
    want = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, want)
    out = {"y": y.detach(), "state_out": sT.detach()}
    it = iter(grads)
    for i, x in enumerate(leaves):
        if x is not None:
            out[f"g{i}"] = next(it)
    return out


def compare(case: Case, fn: Callable, seed: int = 1) -> dict[str, float]:
    """Relative errors of fn (the op under test) against the float64 reference, per output."""
    ref_args = [a.double() if a is not None else None for a in case.args]
    y, sT = REFERENCES[case.op](*(a.detach() if a is not None else None for a in ref_args))
    g = torch.Generator(device="cpu").manual_seed(seed)
    # the upstream gradient is rounded to the input dtype, so both sides see the same one
    gy = torch.randn(y.shape, generator=g).to(case.args[0].dtype).double().to(y.device)
    gs = torch.randn(sT.shape, generator=g, dtype=torch.float64).to(y.device)
    ref = run_with_grads(REFERENCES[case.op], ref_args, gy, gs)
    got = run_with_grads(fn, case.args, gy.to(case.args[0].dtype), gs.float())
    errs = {}
    for key, val in ref.items():
        name = key if not key.startswith("g") else "g_" + case.names[int(key[1:])]
        errs[name] = rel_err(got[key], val)
    return errs


# Bounds on ||out - ref|| / ||ref|| for the fused ops at the test shapes. float32 compute lands
# near 1e-6 (the decay gradient, a difference of suffix sums, near 1e-5); bf16 outputs and
# gradients are rounded to 8 bits.
FUSED_BOUNDS = {
    torch.float32: {"default": 2e-5, "g_w": 2e-4},
    torch.bfloat16: {"default": 1.2e-2, "g_w": 1.5e-2},
}


def assert_within(errs: dict[str, float], bounds: dict[str, float]) -> None:
    """Every error of `compare` within its bound: bounds[name], else bounds["default"]."""
    bad = {k: v for k, v in errs.items() if not v <= bounds.get(k, bounds["default"])}
    assert not bad, f"relative errors over bounds {bounds}: {bad} (all: {errs})"
