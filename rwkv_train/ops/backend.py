"""Choosing a WKV backend: which implementation runs for a given op, backend name and device."""

from collections.abc import Callable

import torch

from rwkv_train.ops import chunked

BACKENDS = ("auto", "torch", "cpp", "cuda")


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The function implementing `op` ("wkv4" | "wkv5" | "wkv6") on `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv_backend={backend!r} is not one of {BACKENDS}")
    if backend in ("auto", "torch"):
        return getattr(chunked, f"{op}_chunked")
    raise RuntimeError(f"wkv_backend={backend!r} is not available yet")
