"""Helpers for the model tests: tiny configs, moving weights off their init, comparisons."""

import math

import torch
from torch import Tensor, nn

from rwkv_train.model import RWKV, RWKVConfig


def tiny_config(version: int, **overrides: object) -> RWKVConfig:
    """A 2-layer, 128-wide model with a 1000-token vocabulary and the plain torch backend."""
    values: dict[str, object] = dict(
        version=version, n_layer=2, n_embd=128, vocab_size=1000, wkv_backend="torch"
    )
    values.update(overrides)
    return RWKVConfig(**values)  # type: ignore[arg-type]


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter away from its init, so a zero or constant init cannot hide a bug.

    Matrices get noise of std 1/sqrt(fan_in) (keeping activations O(1)); vectors get std 0.2
    around their init, which keeps decays, mixes and bonuses in their working ranges.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if p.dim() == 2 and not name.endswith(("time_decay", "time_faaaa")):
            std = 1.0 if name == "emb.weight" else 1 / math.sqrt(p.shape[1])
            if name.endswith("_w1"):  # LoRA down-projection: keep tanh out of saturation
                std = 0.3 / math.sqrt(p.shape[0])
            p.add_(noise * std)
        elif p.dim() == 3 and name.endswith("_w2"):  # time_maa_w2 (5, m, C)
            p.add_(noise * 0.3 / math.sqrt(p.shape[1]))
        else:
            p.add_(noise * 0.2)
    return model


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|: a relative error that ignores tiny entries of b."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def build(cfg: RWKVConfig, seed: int = 0, perturb: bool = True) -> RWKV:
    """An eval-mode model, seeded, optionally perturbed."""
    torch.manual_seed(seed)
    model = RWKV(cfg).eval()
    return perturb_(model, seed + 1) if perturb else model
