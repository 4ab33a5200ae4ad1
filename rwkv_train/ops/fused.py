"""The fused WKV kernels as `torch.library` custom ops, so autograd, meta/fake tensors and
torch.compile see one opaque op per call instead of a Python loop.

    rwkv::wkv6(r, k, v, w, u, s0) -> (y, sT)       rwkv::wkv6_bwd(..., gy, gsT) -> 6 gradients
    rwkv::wkv5(r, k, v, w, u, s0) -> (y, sT)       w: (H, N)
    rwkv::wkv4(k, v, w, u, s0)    -> (y, sT)       s0: (B, 3, C) = (aa, bb, pp)

One body per op serves both devices: CPU tensors go to the C++ extension (float32 inside,
outputs in the input dtypes), CUDA tensors to the CUDA extension (bf16 or float32 inputs,
float32 state and accumulation). Extensions are built on the first call, never at import.
The functions at the bottom (`wkv6`, `wkv5`, `wkv4`) are what `backend.resolve` hands out:
they fill in a missing initial state, make the inputs contiguous and, on a GPU with room to
spare, run a long call as several time segments at once (`segments.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_train.ops import loader, segments


def _ext(x: Tensor):
    return loader.load_for(x.device)


# ----------------------------------------------------------------------------- RWKV-5/6
def _fwd56(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor, static: bool):
    y, sT = _ext(r).wkv56_forward(r, k, v, w, u, s0, static)
    return y, sT


def _bwd56(r, k, v, w, u, s0, gy, gsT, static: bool):
    return tuple(_ext(r).wkv56_backward(r, k, v, w, u, s0, gy, gsT, static))


@torch.library.custom_op("rwkv::wkv6", mutates_args=())
def _wkv6(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor
) -> tuple[Tensor, Tensor]:
    return _fwd56(r, k, v, w, u, s0, False)


@torch.library.custom_op("rwkv::wkv5", mutates_args=())
def _wkv5(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor
) -> tuple[Tensor, Tensor]:
    return _fwd56(r, k, v, w, u, s0, True)


@torch.library.custom_op("rwkv::wkv6_bwd", mutates_args=())
def _wkv6_bwd(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor, gy: Tensor, gsT: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _bwd56(r, k, v, w, u, s0, gy, gsT, False)


@torch.library.custom_op("rwkv::wkv5_bwd", mutates_args=())
def _wkv5_bwd(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor, gy: Tensor, gsT: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _bwd56(r, k, v, w, u, s0, gy, gsT, True)


def _fake_fwd56(r, k, v, w, u, s0):
    return torch.empty_like(r), torch.empty_like(s0, dtype=torch.float32)


def _fake_bwd56(r, k, v, w, u, s0, gy, gsT):
    return (
        torch.empty_like(r),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(w),
        torch.empty_like(u),
        torch.empty_like(s0),
    )


for _op in (_wkv6, _wkv5):
    _op.register_fake(_fake_fwd56)
for _op in (_wkv6_bwd, _wkv5_bwd):
    _op.register_fake(_fake_bwd56)


def _setup56(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grads(ctx, gy: Tensor | None, gsT: Tensor | None, like_y: Tensor, like_s: Tensor):
    gy = torch.zeros_like(like_y) if gy is None else gy.contiguous()
    gsT = torch.zeros_like(like_s, dtype=torch.float32) if gsT is None else gsT.contiguous()
    return gy, gsT


def _backward6(ctx, gy, gsT):
    r, k, v, w, u, s0 = ctx.saved_tensors
    gy, gsT = _grads(ctx, gy, gsT, r, s0)
    return torch.ops.rwkv.wkv6_bwd(r, k, v, w, u, s0, gy, gsT)


def _backward5(ctx, gy, gsT):
    r, k, v, w, u, s0 = ctx.saved_tensors
    gy, gsT = _grads(ctx, gy, gsT, r, s0)
    return torch.ops.rwkv.wkv5_bwd(r, k, v, w, u, s0, gy, gsT)


_wkv6.register_autograd(_backward6, setup_context=_setup56)
_wkv5.register_autograd(_backward5, setup_context=_setup56)


# ----------------------------------------------------------------------------- RWKV-4
@torch.library.custom_op("rwkv::wkv4", mutates_args=())
def _wkv4(k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    y, sT = _ext(k).wkv4_forward(k, v, w, u, s0)
    return y, sT


@torch.library.custom_op("rwkv::wkv4_bwd", mutates_args=())
def _wkv4_bwd(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor, gy: Tensor, gsT: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_ext(k).wkv4_backward(k, v, w, u, s0, gy, gsT))


@_wkv4.register_fake
def _(k, v, w, u, s0):
    return torch.empty_like(k), torch.empty_like(s0, dtype=torch.float32)


@_wkv4_bwd.register_fake
def _(k, v, w, u, s0, gy, gsT):
    return (
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(w),
        torch.empty_like(u),
        torch.empty_like(s0),
    )


def _backward4(ctx, gy, gsT):
    k, v, w, u, s0 = ctx.saved_tensors
    gy, gsT = _grads(ctx, gy, gsT, k, s0)
    return torch.ops.rwkv.wkv4_bwd(k, v, w, u, s0, gy, gsT)


_wkv4.register_autograd(_backward4, setup_context=_setup56)


# ----------------------------------------------------------------------------- entry points
def zero_state56(r: Tensor) -> Tensor:
    """The empty RWKV-5/6 state for inputs like r: (B, H, N, N) float32 zeros."""
    B, _, H, N = r.shape
    return r.new_zeros(B, H, N, N, dtype=torch.float32)


def zero_state4(k: Tensor) -> Tensor:
    """The empty RWKV-4 state for inputs like k: (aa, bb, pp) = (0, 0, -1e30), float32."""
    B, _, C = k.shape
    s = k.new_zeros(B, 3, C, dtype=torch.float32)
    s[:, 2] = -1e30
    return s


def wkv6(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fused RWKV-6 WKV; shapes as in `rwkv_train.ops.wkv6`."""
    return _wkv56(r, k, v, w, u, state, static=False)


def wkv5(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fused RWKV-5 WKV with a static decay w of shape (H, N)."""
    return _wkv56(r, k, v, w, u, state, static=True)


def _wkv56(r, k, v, w, u, state, static: bool) -> tuple[Tensor, Tensor]:
    """Fill in the state, make inputs contiguous, and split time where the GPU has room."""
    s0 = zero_state56(r) if state is None else state.float().contiguous()
    c = [x.contiguous() for x in (r, k, v, w, u)]
    B, T, H, _ = r.shape
    n = segments.count(B, T, H, r.device)
    if n > 1:
        return segments.wkv56(*c, s0, n, static)
    return (torch.ops.rwkv.wkv5 if static else torch.ops.rwkv.wkv6)(*c, s0)


def wkv4(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fused RWKV-4 WKV; state (B, 3, C) = (aa, bb, pp)."""
    s0 = zero_state4(k) if state is None else state.float().contiguous()
    c = [x.contiguous() for x in (k, v, w, u)]
    return torch.ops.rwkv.wkv4(*c, s0)
