"""WKV operators: one entry point per RWKV version, several interchangeable backends.

    y, state = wkv6(r, k, v, w, u, state=None, backend="auto")

r, k, v, w: (B, T, H, N); w is the raw decay (d = exp(-exp(w)), per token for v6, (H, N)
for v5); u: (H, N); state: (B, H, N, N) float32 indexed [key, value]; y has the dtype of r.
wkv4(k, v, w, u, state) works per channel: k, v (B, T, C), w and u (C,), state (B, 3, C).
Every backend accepts an initial state, returns the final state and is differentiable with
respect to all inputs, the initial state included.

Backends: "torch" (chunked PyTorch, any device), "cpp" (fused CPU C++), "cuda" (fused CUDA),
"auto" (the fastest that can run here). The plain recurrences in `reference.py` are the
maths the others are tested against.
"""

from torch import Tensor

from rwkv_train.ops.backend import resolve


def _expect(name: str, t: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {what} = {shape}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None, static: bool
) -> None:
    """The shapes of the module docstring, checked once here for every backend: the fused
    ops would stop in C++, and the chunked form fail deep inside or truncate integers.
    `static`: w is RWKV-5's (H, N) decay, else RWKV-6's (B, T, H, N)."""
    if r.dim() != 4:
        raise ValueError(f"r must be (B, T, H, N), got shape {tuple(r.shape)}")
    B, T, H, N = r.shape
    for name, t in (("r", r), ("k", k), ("v", v)):
        _expect(name, t, (B, T, H, N), "(B, T, H, N)")
    if static:
        _expect("w of RWKV-5", w, (H, N), "(H, N)")
    else:
        _expect("w of RWKV-6", w, (B, T, H, N), "(B, T, H, N)")
    _expect("u", u, (H, N), "(H, N)")
    if state is not None:
        _expect("state", state, (B, H, N, N), "(B, H, N, N)")


def wkv6(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV with a data-dependent decay w of shape (B, T, H, N)."""
    _check(r, k, v, w, u, state, static=False)
    return resolve("wkv6", backend, r.device)(r, k, v, w, u, state)


def wkv5(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """RWKV-5 WKV with a static decay w of shape (H, N)."""
    _check(r, k, v, w, u, state, static=True)
    return resolve("wkv5", backend, r.device)(r, k, v, w, u, state)


def wkv4(
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """RWKV-4 channel-wise WKV; state is (aa, bb, pp) stacked as (B, 3, C)."""
    if k.dim() != 3:
        raise ValueError(f"k must be (B, T, C), got shape {tuple(k.shape)}")
    B, T, C = k.shape
    _expect("k", k, (B, T, C), "(B, T, C)")
    _expect("v", v, (B, T, C), "(B, T, C)")
    _expect("w", w, (C,), "(C,)")
    _expect("u", u, (C,), "(C,)")
    if state is not None:
        _expect("state", state, (B, 3, C), "(B, 3, C)")
    return resolve("wkv4", backend, k.device)(k, v, w, u, state)


__all__ = ["wkv4", "wkv5", "wkv6"]
