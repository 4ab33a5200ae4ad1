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
    return resolve("wkv4", backend, k.device)(k, v, w, u, state)


__all__ = ["wkv4", "wkv5", "wkv6"]
