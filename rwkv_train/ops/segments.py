"""Running one long RWKV-5/6 WKV call as several time segments side by side on the GPU.

The fused kernels give each (batch, head) pair one thread block and scan time in order, so a
call with few pairs (micro-batch 1-2, one long sequence) leaves most of a GPU idle: on an
H200 (132 SMs) B=1, T=16384, H=40 runs 40 blocks and takes as long as B=4 would. The state
recurrence is linear, S_t = diag(d_t) S_{t-1} + k_t v_t^T, so a segment's end state is
diag(a_end) S0 + (its end state from a zero start), a_end the product of its decays. So:

1. the kernel scans all S segments from zero at once, as S times as many batch entries (a free
   view of (B, T, H, N) as (B*S, T/S, H, N)), for their end states only;
2. a scan over the S segment ends in PyTorch gives each segment its true start;
3. the kernel scans all segments again from their true starts, for the outputs.

The backward does the same with the state's gradient, which obeys the same recurrence
backwards in time: the forward kernel on time-reversed inputs gives each segment's gradient
at its start from a zero gradient at its end, a scan over segments gives the true end
gradients, and the kernel's backward then runs on all segments at once. Every output and
gradient is then exact, rounded once, as in one unsplit call; the price is a second kernel
pass in each direction.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Blocks the kernels keep busy per SM. On an H200 (132 SMs), B x H = 40 and 80 pairs ran
# fastest forward+backward at 640 blocks (16 and 8 segments: 1.19x and 1.18x 8 and 4
# segments, 3.1x and 1.5x unsplit), and 1280 blocks was slower again; so aim for about 5.
_BLOCKS_PER_SM = 5
# The second pass pays only where most SMs would idle: split 8 or more ways, or not at all.
# Where 2 or 4 segments would fill the GPU, the pairs alone already keep it about a third
# busy, and the second pass costs about what the split saves (B=8, H=40 unsplit: 320 blocks
# at 1.6x the time of 80).
_MIN_SEGMENTS = 8
_MAX_SEGMENTS = 16
# Segments shorter than this spend more on the extra launches and the chain than they save.
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


def _segment_decays(w: Tensor, B: int, S: int, L: int, static: bool) -> Tensor:
    """The product of the decays over each segment: (B, S, H, N), or (H, N) if static."""
    if static:
        return torch.exp(-L * torch.exp(w.float()))
    H, N = w.shape[-2:]
    return torch.exp(-torch.exp(w.float()).view(B, S, L, H, N).sum(2))


def _chain(first: Tensor, local: Tensor, a_end: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """Carry a state across the S segments, x_next = a_end * x + local (diagonal over keys):
    forwards for the state (x enters a segment at its start), backwards for its gradient (x
    enters at the segment's end). Returns x entering each segment (B, S, H, N, N) and the
    value leaving the last one processed."""
    S = local.shape[1]
    dec = a_end.expand(local.shape[:-1]) if a_end.dim() == 2 else a_end
    order = range(S - 1, -1, -1) if reverse else range(S)
    out, cur = [None] * S, first
    for j in order:
        out[j] = cur
        cur = dec[:, j, :, :, None] * cur + local[:, j]
    return torch.stack(out, 1), cur


class _Segmented(torch.autograd.Function):
    """Only kernel calls and elementwise steps, so bf16 autocast changes nothing inside."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, s0, S: int, static: bool):
        B, T, H, N = r.shape
        L = T // S
        seg = [x.view(B * S, L, H, N) for x in (r, k, v)]
        w_seg = w if static else w.view(B * S, L, H, N)
        op = torch.ops.rwkv.wkv5 if static else torch.ops.rwkv.wkv6
        # Pass 1: each segment's end state from a zero start; chained, the true starts.
        _, ends = op(*seg, w_seg, u, s0.new_zeros(B * S, H, N, N))
        a_end = _segment_decays(w, B, S, L, static)
        starts, sT = _chain(s0, ends.view(B, S, H, N, N), a_end, reverse=False)
        # Pass 2: every segment again, from its true start.
        y, _ = op(*seg, w_seg, u, starts.view(B * S, H, N, N))
        ctx.save_for_backward(r, k, v, w, u, starts, a_end)
        ctx.S, ctx.static = S, static
        return y.view(B, T, H, N), sT

    @staticmethod
    def backward(ctx, gy, gsT):
        r, k, v, w, u, starts, a_end = ctx.saved_tensors
        S, static = ctx.S, ctx.static
        B, T, H, N = r.shape
        L = T // S
        gy = torch.zeros_like(r) if gy is None else gy.contiguous()
        g_last = torch.zeros_like(starts[:, 0]) if gsT is None else gsT.float()
        op = torch.ops.rwkv.wkv5 if static else torch.ops.rwkv.wkv6
        w_seg = w if static else w.view(B * S, L, H, N)
        # dL/dS entering each segment with a zero gradient at its end. The gradient obeys
        # G_{t-1} = diag(d_t) G_t + r_t gy_t^T: the forward recurrence run backwards in time
        # with k <- r and v <- gy, so the forward kernel computes it on time-reversed inputs.
        rev = [x.view(B * S, L, H, N).flip(1) for x in (r, gy)]
        w_rev = w if static else w_seg.flip(1)
        zero = starts.new_zeros(B * S, H, N, N)
        _, local = op(rev[0], rev[0], rev[1], w_rev, u, zero)
        g_ends, g_s0 = _chain(g_last, local.view(B, S, H, N, N), a_end, reverse=True)
        # Every segment's backward from its true start and true end gradient: exact BPTT.
        bwd = torch.ops.rwkv.wkv5_bwd if static else torch.ops.rwkv.wkv6_bwd
        seg = [x.view(B * S, L, H, N) for x in (r, k, v, gy)]
        gr, gk, gv, gw, gu, _ = bwd(
            seg[0],
            seg[1],
            seg[2],
            w_seg,
            u,
            starts.view(B * S, H, N, N),
            seg[3],
            g_ends.view(B * S, H, N, N),
        )
        shape = (B, T, H, N)
        return (
            gr.view(shape),
            gk.view(shape),
            gv.view(shape),
            gw.view(w.shape),
            gu,
            g_s0,
            None,
            None,
        )
