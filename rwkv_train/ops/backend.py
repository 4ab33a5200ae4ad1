"""Choosing a WKV backend: which implementation runs for a given op, backend name and device.

- "torch": the chunked PyTorch form (any device, no compiler needed).
- "cpp":   the fused CPU C++ op (CPU tensors); an error if it cannot be built.
- "cuda":  the fused CUDA op (CUDA tensors); an error if it cannot be built.
- "auto":  CUDA on a GPU, else CPU C++ if it builds, else torch; the choice, and why it fell
           back, is logged once per device type.

Resolution happens at call time, so importing this module (or building a model) never
compiles anything; the first call on a device builds or loads the extension.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from rwkv_train.ops import chunked

BACKENDS = ("auto", "torch", "cpp", "cuda")

log = logging.getLogger("rwkv_train.ops")

# device type -> the backend "auto" settled on there ("cpp" | "cuda" | "torch")
_auto_choice: dict[str, str] = {}


def _fused(op: str) -> Callable:
    from rwkv_train.ops import fused

    return getattr(fused, op)


def _explicit(op: str, backend: str, device: torch.device) -> Callable:
    from rwkv_train.ops import loader

    want = "cpu" if backend == "cpp" else "cuda"
    if device.type != want:
        raise RuntimeError(
            f"wkv_backend={backend!r} runs on {want} tensors, but the inputs are on {device}; "
            f"use wkv_backend='auto' or 'torch', or move the model"
        )
    try:
        loader.load_for(device)
    except loader.ExtensionBuildError as exc:
        raise RuntimeError(f"wkv_backend={backend!r} cannot run here: {exc}") from exc
    return _fused(op)


def _auto(device: torch.device) -> str:
    """The backend "auto" uses on this device type, decided (and logged) once."""
    if device.type in _auto_choice:
        return _auto_choice[device.type]
    from rwkv_train.ops import loader

    if device.type in ("cuda", "cpu"):
        name = "cuda" if device.type == "cuda" else "cpp"
        try:
            loader.load_for(device)
            choice, why = name, "fused kernel built"
        except loader.ExtensionBuildError as exc:
            choice, why = "torch", f"fell back from {name}: {exc}"
    else:
        choice, why = "torch", f"no fused kernel for device type {device.type!r}"
    # a fallback is a slower run than the user may expect: said where it is seen
    level = logging.WARNING if why.startswith("fell back") else logging.INFO
    log.log(level, "WKV backend 'auto' on %s: %s (%s)", device.type, choice, why)
    _auto_choice[device.type] = choice
    return choice


# (op, backend, device type) -> the function resolve() found
_resolved: dict[tuple[str, str, str], Callable] = {}


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The function implementing `op` ("wkv4" | "wkv5" | "wkv6") on `backend` for `device`.

    Found once per op, backend and device type, then looked up: a model under torch.compile
    traces a dictionary lookup here rather than the extension loader (whose first call,
    building or loading the extension, would break the compiled graph).
    """
    key = (op, backend, device.type)
    if key not in _resolved:
        _resolved[key] = _find(op, backend, device)
    return _resolved[key]


def _find(op: str, backend: str, device: torch.device) -> Callable:
    if backend not in BACKENDS:
        raise ValueError(f"wkv_backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = _auto(device)
    if backend == "torch":
        return getattr(chunked, f"{op}_chunked")
    return _explicit(op, backend, device)
