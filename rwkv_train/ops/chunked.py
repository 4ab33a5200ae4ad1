"""Chunked PyTorch WKV: parallel inside a chunk, recurrent across chunks, stable for any decay.

The maths (RWKV-6, per head; RWKV-5 is the same with a static decay)
--------------------------------------------------------------------
o_t = r_t^T (diag(u) k_t v_t^T + S_{t-1}),   S_t = diag(d_t) S_{t-1} + k_t v_t^T,
with d_t = exp(a_t) and a_t = -exp(w_t) <= 0 the log decay. Unrolled,

    o_t = sum_{s<t} sum_c r_tc k_sc exp(E_tc - A_sc) v_s  +  r_t^T diag(exp(E_t)) S_in
          + (r_t . u k_t) v_t,

where A_t = a_0 + ... + a_t (inclusive cumulative log decay, counted from the start of the
chunk) and E_t = A_t - a_t (exclusive). For s < t, E_t - A_s = a_{s+1} + ... + a_{t-1} <= 0.

The usual chunked form writes exp(E_t - A_s) = exp(E_t) * exp(-A_s) so the sum over c
becomes a matrix product. That overflows: with w = 3 (a = -20 per step) exp(-A_s) passes
the float32 range (e^88) after five tokens. Here every factor ever exponentiated is <= 0:

* Across chunks (chunk length L): the state entering the chunk is read with
  r_t * exp(E_t) (E_t <= 0), and the chunk's own keys enter the outgoing state as
  k_s * exp(A_{L-1} - A_s) (<= 0); the state itself is decayed by exp(A_{L-1}). A short
  Python loop over chunks carries the state (T/L steps of one fused multiply-add).
* Inside a chunk, by recursive halving: the pairs (s, t) with s < t split, at every level
  of a binary tree over the chunk, into "s in the left half, t in the right half" of
  exactly one block. For that block take the boundary M = A at the last position of the
  left half: exp(E_t - A_s) = exp(E_t - M) * exp(M - A_s), and both exponents are <= 0
  because s <= boundary < t. So every block is a plain product
  (r * exp(E - M)) (k * exp(M - A))^T, without any mask, and log2(L) levels cover all
  pairs; at the last level (halves of one token) the factor is exactly 1. Nothing can
  overflow; a factor that underflows to 0 multiplies a true weight that is even smaller.

Cost per token and head: about 2 N^2 multiply-adds for the state, L N for the blocks,
and N exponentials per level; levels whose contracted size is 1 or 2 use elementwise
products (a batched matmul of 2x2 blocks is very slow on a CPU). L = 32 (CHUNK) and
segments of 512 tokens (SEGMENT, see `_ChunkedWKV`) were the fastest on a 2-core CPU;
chunk 16 and 64 were within the noise.

Accuracy: everything runs in the input precision, float32 for float32/bf16/fp16 inputs
(float64 for float64). The cumulative sums are chunk-local, so an exponent E_t - M has an
absolute rounding error of about eps * |A| <= eps * 20 L (strong decays): a relative error
below 1e-5 of the affected weight in float32. The tests hold float32 within 2e-4 of a
float64 reference over the whole decay range.

Backward is written by hand (a `torch.autograd.Function`) because autograd through the
forward keeps every temporary and was 3-5 times slower. It reuses the same blocks
transposed; the log-decay gradient needs no extra pass over pairs: since E and A enter
only through r_t exp(E_t) and k_s exp(-A_s) (with the boundaries cancelling),
dL/dE_t = r_t * dr_t and dL/dA_s = -k_s * dk_s for the non-bonus parts of dr and dk,
plus the final-state term at the chunk end; dL/da_j is then a reverse cumulative sum
inside the chunk, and dL/dw = dL/da * a. Under strong decays the true dL/da is tiny
(~e^-20) while these terms are O(|r dr|), so dw carries an absolute error of about
eps * |a| * |r dr| (the same trade-off as other chunked kernels, e.g. fla's).

RWKV-4 keeps the per-step recurrence (see `wkv4_chunked`).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 32
SEGMENT = 512
# -log d is clamped here (d >= e^-60 ~ 1e-26, i.e. w <= 4.09; the models' range is w <= 3):
# it keeps |A| <= 60 L, so the rounding of E_t - M stays far below 1 for any w.
MAX_DECAY = 60.0


def _tri(L: int, like: Tensor, upper: bool) -> Tensor:
    """(L, L) ones on and below (or above) the diagonal: a cumulative sum as a matmul."""
    ones = torch.ones(L, L, dtype=like.dtype, device=like.device)
    return ones.triu() if upper else ones.tril()


def _level_factors(E: Tensor, A: Tensor, nb: int, h: int) -> tuple[Tensor, Tensor]:
    """exp(E_t - M) for the right halves and exp(M - A_s) for the left halves of blocks 2h.

    M is A at the last position of the left half; both exponents are <= 0.
    """
    N = E.shape[-1]
    Ev, Av = E.reshape(nb, 2, h, N), A.reshape(nb, 2, h, N)
    M = Av[:, 0, h - 1 :]  # (nb, 1, N)
    return torch.exp(Ev[:, 1] - M), torch.exp(M - Av[:, 0])


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b; when the contracted size is tiny (2), broadcast-and-sum beats a batched matmul."""
    if a.shape[-1] > 2:
        return a @ b
    return (a[..., :, :, None] * b[..., None, :, :]).sum(-2)


def _forward(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunked WKV on chunk-major inputs (nc, G, L, N), G = B*H; u is (G, N), s0 (G, N, N).

    Chunk-major keeps every per-chunk slice of the scan contiguous. Returns y (nc, G, L, N),
    the states entering every chunk (nc, G, N, N), which the backward reads instead of
    repeating the scan, the final state (G, N, N) and the log decay a (nc, G, L, N).
    """
    nc, G, L, N = r.shape
    a = -torch.exp(w).clamp_(max=MAX_DECAY)
    A = _tri(L, a, upper=False) @ a  # inclusive cumulative sum over the chunk
    E = A - a  # exclusive
    Aend = A[:, :, -1:]  # (nc, G, 1, N)
    U = (k * torch.exp(Aend - A)).transpose(-1, -2) @ v  # (nc, G, N, N): the chunk's kv
    decay = torch.exp(Aend).transpose(-1, -2)  # (nc, G, N, 1): scales the key rows
    states = torch.empty_like(U)
    states[0] = s0
    for c in range(nc - 1):
        torch.addcmul(U[c], decay[c], states[c], out=states[c + 1])
    s_out = torch.addcmul(U[-1], decay[-1], states[-1])
    y = (r * torch.exp(E)) @ states  # (nc, G, L, N): read the incoming state
    h = L // 2
    while h >= 1:
        nb = nc * G * L // (2 * h)
        rv, kv, vv, yv = (x.reshape(nb, 2, h, N) for x in (r, k, v, y))  # (nb, 2, h, N)
        if h > 1:
            fq, fk = _level_factors(E, A, nb, h)
            att = (rv[:, 1] * fq) @ (kv[:, 0] * fk).transpose(-1, -2)  # (nb, h, h)
            yv[:, 1] += _bmm(att, vv[:, 0])  # a strided view: bmm + add, not baddbmm_
        else:  # neighbours: no decay between them, one dot product per pair
            yv[:, 1].addcmul_((rv[:, 1] * kv[:, 0]).sum(-1, keepdim=True), vv[:, 0])
        h //= 2
    y.addcmul_((r * u[:, None] * k).sum(-1, keepdim=True), v)  # bonus of the current token
    return y, states, s_out, a


def _backward(
    dy: Tensor,
    dsT: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    u: Tensor,
    states: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dr, dk, dv, dw, du per G, ds0) of `_forward`, in the same layouts."""
    nc, G, L, N = r.shape
    A = _tri(L, a, upper=False) @ a
    E = A - a
    Aend = A[:, :, -1:]
    eK, eE = torch.exp(Aend - A), torch.exp(E)
    decay = torch.exp(Aend).transpose(-1, -2)  # (nc, G, N, 1)
    # Reverse scan: dS[c] is the gradient of the state leaving chunk c.
    P = (r * eE).transpose(-1, -2) @ dy  # (nc, G, N, N)
    dS = torch.empty_like(P)
    dS[-1] = dsT
    for c in range(nc - 1, 0, -1):
        torch.addcmul(P[c], decay[c], dS[c], out=dS[c - 1])
    ds0 = torch.addcmul(P[0], decay[0], dS[0])
    dr = (dy @ states.transpose(-1, -2)) * eE  # non-bonus part of dr
    dk = (v @ dS.transpose(-1, -2)) * eK  # non-bonus part of dk
    dv = (k * eK) @ dS
    # Chunk-end log decay, through the keys' decay and through the carried state
    # (P is free now: its memory takes the product).
    dAend = (k * dk).sum(2) + torch.mul(dS, states, out=P).sum(-1) * decay[..., 0]
    h = L // 2
    while h >= 1:
        nb = nc * G * L // (2 * h)
        rv, kv, vv, dyv, drv, dkv, dvv = (x.reshape(nb, 2, h, N) for x in (r, k, v, dy, dr, dk, dv))
        if h == 1:  # neighbours, as in the forward
            q, kk = rv[:, 1], kv[:, 0]
            att = (q * kk).sum(-1, keepdim=True)
            datt = (dyv[:, 1] * vv[:, 0]).sum(-1, keepdim=True)
            dvv[:, 0].addcmul_(att, dyv[:, 1])
            drv[:, 1].addcmul_(datt, kk)
            dkv[:, 0].addcmul_(datt, q)
            break
        fq, fk = _level_factors(E, A, nb, h)
        q, kk = rv[:, 1] * fq, kv[:, 0] * fk
        att = q @ kk.transpose(-1, -2)  # (nb, h, h)
        datt = dyv[:, 1] @ vv[:, 0].transpose(-1, -2)
        dvv[:, 0] += _bmm(att.transpose(-1, -2), dyv[:, 1])
        drv[:, 1].addcmul_(_bmm(datt, kk), fq)
        dkv[:, 0].addcmul_(_bmm(datt.transpose(-1, -2), q), fk)
        h //= 2
    # Log decay: E enters only as r exp(E), A only as k exp(-A) and at the chunk end.
    dE = r * dr
    dA = -(k * dk)
    dA[:, :, -1] += dAend
    # a_j is in A_t for t >= j and in E_t for t > j: a reverse cumulative sum.
    da = _tri(L, dA, upper=True) @ (dA + dE) - dE
    dw = torch.where(a > -MAX_DECAY, da * a, 0.0)  # clamped decays have no gradient
    # Bonus of the current token.
    b = (dy * v).sum(-1, keepdim=True)
    dr.addcmul_(b * u[:, None], k)
    dk.addcmul_(b * u[:, None], r)
    du = (b * r * k).sum((0, 2))  # (G, N)
    dv.addcmul_((r * u[:, None] * k).sum(-1, keepdim=True), dy)
    return dr, dk, dv, dw, du, ds0


class _ChunkedWKV(torch.autograd.Function):
    """Autograd wrapper: forward and hand-written backward on chunk-major tensors.

    Long inputs are processed a segment of SEGMENT tokens at a time (the state carried
    between segments), so every temporary stays cache-sized; on a CPU this is worth about
    a quarter of the time at T = 2048.
    """

    @staticmethod
    def forward(ctx, r, k, v, w, u, s0):  # type: ignore[override]
        nc, _, L, _ = r.shape
        step = max(1, SEGMENT // L)
        ys, states, a, s = [], [], [], s0
        for c in range(0, nc, step):
            y_, states_, s, a_ = _forward(
                r[c : c + step], k[c : c + step], v[c : c + step], w[c : c + step], u, s
            )
            ys.append(y_)
            states.append(states_)
            a.append(a_)
        ctx.save_for_backward(r, k, v, torch.cat(a), u, torch.cat(states))
        ctx.step = step
        return torch.cat(ys), s

    @staticmethod
    def backward(ctx, dy, dsT):  # type: ignore[override]
        r, k, v, a, u, states = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        ds = torch.zeros_like(states[0]) if dsT is None else dsT
        nc, step = r.shape[0], ctx.step
        parts, du = [], torch.zeros_like(u)
        for c in reversed(range(0, nc, step)):
            sl = slice(c, c + step)
            dr, dk, dv, dw, du_, ds = _backward(
                dy[sl], ds, r[sl], k[sl], v[sl], a[sl], u, states[sl]
            )
            parts.append((dr, dk, dv, dw))
            du += du_
        dr, dk, dv, dw = (torch.cat(x[::-1]) for x in zip(*parts, strict=True))
        return dr, dk, dv, dw, du, ds


def wkv6_chunked(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV, chunked; same contract as `reference.wkv6_reference`.

    Computes in float32 (float64 when r is float64); y has r's dtype, the state is float32
    (float64 for float64 inputs). Autocast is switched off inside: under bf16 autocast the
    chunk matmuls would otherwise run in bf16, losing precision and mixing dtypes in the
    hand-written backward.
    """
    with torch.autocast(r.device.type, enabled=False):
        return _wkv6_chunked(r, k, v, w, u, state)


def _wkv6_chunked(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    s0 = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
    if T == 0:
        return r.new_zeros(B, 0, H, N), s0.clone()
    L = CHUNK if T >= CHUNK else 1 << (T - 1).bit_length()  # short inputs: one small chunk
    Tp = -(-T // L) * L
    nc = Tp // L

    def chunk_major(x: Tensor, fill: float = 0.0) -> Tensor:
        x = F.pad(x.to(dt), (0, 0, 0, 0, 0, Tp - T), value=fill) if Tp != T else x.to(dt)
        x = x.view(B, nc, L, H, N).permute(1, 0, 3, 2, 4)  # (nc, B, H, L, N)
        return x.reshape(nc, B * H, L, N)

    # Padded steps have r = k = v = 0 and d = exp(-exp(-inf)) = 1: they change nothing.
    r_, k_, v_ = chunk_major(r), chunk_major(k), chunk_major(v)
    w_ = chunk_major(w, fill=-torch.inf)
    u_ = u.to(dt).expand(B, H, N).reshape(B * H, N)
    y, s = _ChunkedWKV.apply(r_, k_, v_, w_, u_, s0.reshape(B * H, N, N))
    y = y.view(nc, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, Tp, H, N)  # (B, Tp, H, N)
    return y[:, :T].to(r.dtype), s.view(B, H, N, N)


def wkv5_chunked(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RWKV-5 WKV: the RWKV-6 kernel with the static decay w (H, N) broadcast over time.

    A static decay would allow precomputing the factors per head, but the exponentials are
    a small part of the cost, so one kernel serves both versions.
    """
    return wkv6_chunked(r, k, v, w.expand_as(r), u, state)


def wkv4_chunked(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RWKV-4 WKV as a per-step recurrence (autograd through the loop).

    Why not chunked: RWKV-4 carries a running maximum pp to keep exp(k) in range; a
    chunked form needs a per-pair max (L^2 C exponentials) and buys little, since RWKV-4
    is mostly used to load and fine-tune released models. The loop runs in float32
    (float64 for float64 inputs), does the minimum of work per step, and returns y in k's
    dtype and the state (aa, bb, pp) as (B, 3, C).
    """
    B, T, C = k.shape
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    kf, vf, u = k.to(dt), v.to(dt), u.to(dt)
    if state is None:
        aa, bb = kf.new_zeros(B, C), kf.new_zeros(B, C)
        pp = kf.new_full((B, C), -1e30)
    else:
        aa, bb, pp = state.to(dt).unbind(1)
    ew = -torch.exp(w.to(dt))
    uk = u + kf  # log weight of the current token, all steps at once
    out = []
    for t in range(T):
        kt, vt = kf[:, t], vf[:, t]
        p = torch.maximum(pp, uk[:, t])
        e1, e2 = torch.exp(pp - p), torch.exp(uk[:, t] - p)
        out.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        ww = ew + pp
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = p
    y = torch.stack(out, dim=1) if out else kf.new_zeros(B, 0, C)
    return y.to(k.dtype), torch.stack([aa, bb, pp], dim=1)


__all__ = ["CHUNK", "wkv4_chunked", "wkv5_chunked", "wkv6_chunked"]
