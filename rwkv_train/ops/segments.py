"""Running one long RWKV-5/6 WKV call as several time segments side by side on the GPU.

The fused kernels give each (batch, head) pair one thread block and scan time in order, so a
call with few pairs (micro-batch 1-2, one long sequence) leaves most of a GPU idle: on an
H200 (132 SMs) B=1, T=16384, H=40 runs 40 blocks and takes as long as B=4 would. The state
recurrence is linear, S_t = diag(d_t) S_{t-1} + k_t v_t^T, so a segment scanned from a zero
state differs from the true one by a term linear in its true initial state S0:

    y_t   = y_t^local + (r_t * a_t) S0        a_t = prod of d_s over the segment's s < t
    S_end = diag(a_end) S0 + S_end^local      a_end = prod of d_s over the whole segment

So the kernel runs the S segments as S times as many batch entries (a free view of
(B, T, H, N) as (B*S, T/S, H, N)), a scan over the S segment ends in PyTorch gives every
segment its true S0, and one batched matmul per direction adds the correction. The backward
is written out here rather than left to autograd, so nothing of size (B, T, H, N) is saved
beyond the inputs the kernel's own backward needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Blocks the kernels keep busy per SM: B=8, H=40 (320 blocks on 132 SMs) ran at nearly the
# per-step speed of 40 blocks, so aim for about that many.
_BLOCKS_PER_SM = 2.5
# The correction's elementwise work on (B, T, H, N) pays only where most SMs would idle. On an
# H200, wkv6 forward+backward: B=1, T=16384, H=40 in 8 segments took 11.3 ms against 16.7 ms
# unsplit, but B=2, T=4096, H=40 in 4 segments took 5.9 ms against 4.4 ms. So a call is split
# 8 or more ways, or not at all.
_MIN_SEGMENTS = 8
_MAX_SEGMENTS = 16
# Segments shorter than this spend more on the correction than they save.
_MIN_LENGTH = 256


def count(B: int, T: int, H: int, device: torch.device) -> int:
    """How many segments a fused call of this shape should use on `device` (1 = no split).

    Only CUDA benefits: the CPU op already has more (batch, head) pairs than cores to share.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return choose(B * H, T, sms)


def choose(pairs: int, T: int, sms: int) -> int:
    """The largest power-of-two segment count that divides T, keeps segments at least
    `_MIN_LENGTH` long and keeps pairs x segments within about `_BLOCKS_PER_SM` per SM;
    1 where that is under `_MIN_SEGMENTS`."""
    s = 1
    while (
        2 * s <= _MAX_SEGMENTS
        and T % (2 * s) == 0
        and T // (2 * s) >= _MIN_LENGTH
        and pairs * 2 * s <= _BLOCKS_PER_SM * sms
    ):
        s *= 2
    return s if s >= _MIN_SEGMENTS else 1


def wkv56(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor, segments: int, static: bool
) -> tuple[Tensor, Tensor]:
    """The fused RWKV-6 (or, with `static`, RWKV-5) op over `segments` time segments.

    Inputs contiguous as for `torch.ops.rwkv.wkv6` (registered by `fused`, which calls this);
    T must divide by `segments`.
    """
    T = r.shape[1]
    if T % segments:
        raise ValueError(f"T={T} does not divide into {segments} segments")
    return _Segmented.apply(r, k, v, w, u, s0, segments, static)


def _log_decays(w: Tensor, B: int, S: int, L: int, static: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(log d, a, a_end): log d as w's layout, a_t per segment step (B, S, L, H, N) or
    (L, H, N) for a static decay, a_end per segment (B, S, H, N) or (H, N); all float32."""
    lw = -torch.exp(w.float())
    if static:
        steps = torch.arange(L, device=w.device, dtype=torch.float32)[:, None, None]
        return lw, torch.exp(steps * lw), torch.exp(L * lw)
    H, N = w.shape[-2:]
    inclusive = lw.view(B, S, L, H, N).cumsum(2)
    return lw, torch.exp(inclusive - lw.view(B, S, L, H, N)), torch.exp(inclusive[:, :, -1])


def _starts(s0: Tensor, ends: Tensor, a_end: Tensor) -> tuple[Tensor, Tensor]:
    """Each segment's true initial state (B, S, H, N, N) and the final state, from the
    zero-start segment ends (B, S, H, N, N) and their total decays."""
    S = ends.shape[1]
    full = a_end.expand(ends.shape[:-1]) if a_end.dim() == 2 else a_end
    out, cur = [], s0
    for j in range(S):
        out.append(cur)
        cur = full[:, j, :, :, None] * cur + ends[:, j]
    return torch.stack(out, 1), cur


class _Segmented(torch.autograd.Function):
    """Autocast is off inside: under bf16 autocast (GPU training) the correction's matmuls
    would otherwise round the segment states to 8 bits."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, s0, S: int, static: bool):
        with torch.autocast(r.device.type, enabled=False):
            return _Segmented._forward(ctx, r, k, v, w, u, s0, S, static)

    @staticmethod
    def backward(ctx, gy, gsT):
        with torch.autocast(gsT.device.type if gsT is not None else gy.device.type, enabled=False):
            return _Segmented._backward(ctx, gy, gsT)

    @staticmethod
    def _forward(ctx, r, k, v, w, u, s0, S: int, static: bool):
        B, T, H, N = r.shape
        L = T // S
        seg = [x.view(B * S, L, H, N) for x in (r, k, v)]
        w_seg = w if static else w.view(B * S, L, H, N)
        zero = s0.new_zeros(B * S, H, N, N)
        op = torch.ops.rwkv.wkv5 if static else torch.ops.rwkv.wkv6
        y_loc, ends = op(*seg, w_seg, u, zero)
        _, a, a_end = _log_decays(w, B, S, L, static)
        starts, sT = _starts(s0, ends.view(B, S, H, N, N), a_end)
        ra = r.float().view(B, S, L, H, N) * a
        y = y_loc.view(B, S, L, H, N).float() + torch.einsum("bslhk,bshkv->bslhv", ra, starts)
        ctx.save_for_backward(r, k, v, w, u, starts)
        ctx.S, ctx.static = S, static
        return y.view(B, T, H, N).to(r.dtype), sT

    @staticmethod
    def _backward(ctx, gy, gsT):
        r, k, v, w, u, starts = ctx.saved_tensors
        S, static = ctx.S, ctx.static
        B, T, H, N = r.shape
        L = T // S
        gy = torch.zeros_like(r) if gy is None else gy.contiguous()
        g_cur = torch.zeros_like(starts[:, 0]) if gsT is None else gsT.float()
        lw, a, a_end = _log_decays(w, B, S, L, static)
        gy5 = gy.float().view(B, S, L, H, N)
        r5 = r.float().view(B, S, L, H, N)
        # y_t += (r_t * a_t) S0 of its segment
        g_starts = torch.einsum("bslhk,bslhv->bshkv", r5 * a, gy5)
        g_ra = torch.einsum("bslhv,bshkv->bslhk", gy5, starts)
        # cur_{j+1} = a_end_j * S0_j + end_j, walked backwards
        full = a_end.expand(B, S, H, N) if static else a_end
        g_ends, g_a_end = [None] * S, [None] * S
        for j in reversed(range(S)):
            g_ends[j] = g_cur
            g_a_end[j] = (g_cur * starts[:, j]).sum(-1)
            g_cur = g_starts[:, j] + full[:, j, :, :, None] * g_cur
        g_a_end = torch.stack(g_a_end, 1)  # (B, S, H, N)
        # the segments' own backward, all at once
        seg = [x.view(B * S, L, H, N) for x in (r, k, v, gy)]
        w_seg = w if static else w.view(B * S, L, H, N)
        zero = starts.new_zeros(B * S, H, N, N)
        bwd = torch.ops.rwkv.wkv5_bwd if static else torch.ops.rwkv.wkv6_bwd
        g_ends = torch.stack(g_ends, 1).view(B * S, H, N, N)
        gr, gk, gv, gw, gu, _ = bwd(seg[0], seg[1], seg[2], w_seg, u, zero, seg[3], g_ends)
        # the decays enter through a and a_end; d(log d)/dw = log d
        q = g_ra * r5 * a  # dL/d(log a_t), per step
        if static:
            steps = torch.arange(L, device=w.device, dtype=torch.float32)[:, None, None]
            g_lw = (q * steps).sum((0, 1, 2)) + (g_a_end * full).sum((0, 1)) * L
        else:
            later = q.flip(2).cumsum(2).flip(2) - q  # sum over the segment's t > s
            g_lw = (later + (g_a_end * a_end)[:, :, None]).view(B, T, H, N)
        g_w = (gw.float().view(w.shape) + g_lw * lw).to(w.dtype)
        g_r = (gr.float().view(B, S, L, H, N) + g_ra * a).view(B, T, H, N).to(r.dtype)
        return g_r, gk.view(B, T, H, N), gv.view(B, T, H, N), g_w, gu, g_cur, None, None
