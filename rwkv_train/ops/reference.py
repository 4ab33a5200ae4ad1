"""Plain per-timestep WKV recurrences: the maths every faster backend is tested against.

They run in the dtype of their inputs (tests use float64), one timestep at a time, so
they are slow but obviously right. Shapes follow the public entry points in
`rwkv_train.ops`: r, k, v, w are (B, T, H, N); the v5/v6 state is (B, H, N_key, N_value).
"""

import torch
from torch import Tensor


def wkv6_reference(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RWKV-6: o_t = r_t (diag(u) k_t v_t^T + S_{t-1}); S_t = diag(d_t) S_{t-1} + k_t v_t^T.

    w is the raw decay (d = exp(-exp(w))), per token; u is (H, N).
    """
    B, T, H, N = r.shape
    dtype = r.dtype
    s = r.new_zeros(B, H, N, N) if state is None else state.to(dtype)
    d = torch.exp(-torch.exp(w))  # (B, T, H, N)
    out = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, N, N)
        y = torch.einsum("bhk,bhkv->bhv", r[:, t], u[None, :, :, None] * kv + s)
        out.append(y)
        s = d[:, t, :, :, None] * s + kv
    y = torch.stack(out, dim=1) if out else r.new_zeros(B, 0, H, N)
    return y, s


def wkv5_reference(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RWKV-5: the RWKV-6 recurrence with a static decay w of shape (H, N)."""
    return wkv6_reference(r, k, v, w.expand_as(r), u, state)


def wkv4_reference(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RWKV-4 numerically stable WKV over channels.

    k, v are (B, T, C); w is the raw time_decay (C,) and the per-step log decay is -exp(w);
    u is time_first (C,), a log-space bonus. The state is (B, 3, C) = (aa, bb, pp), starting
    at (0, 0, -1e30).
    """
    B, T, C = k.shape
    if state is None:
        aa = k.new_zeros(B, C)
        bb = k.new_zeros(B, C)
        pp = k.new_full((B, C), -1e30)
    else:
        aa, bb, pp = state.to(k.dtype).unbind(1)
    ew = -torch.exp(w)
    out = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        out.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        ww = ew + pp
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = p
    y = torch.stack(out, dim=1) if out else k.new_zeros(B, 0, C)
    return y, torch.stack([aa, bb, pp], dim=1)
