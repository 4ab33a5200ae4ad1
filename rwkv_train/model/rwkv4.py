"""RWKV-4: TimeMix with a per-channel (vector) WKV state, and its ChannelMix.

Same calling convention as rwkv6.py, except that the WKV state is (B, 3, C) = (aa, bb, pp), the
numerically stable running numerator, denominator and exponent of the channel-wise WKV.
time_decay enters the op raw (per-step log decay -exp(time_decay)) and time_first is a log-space
bonus, as in the reference .pth files (time_decay, time_first of shape [C]).
"""

import math

import torch
from torch import Tensor, nn

from rwkv_train.model.common import (
    Linear,
    assign,
    channel_ramp,
    layer_ratios,
    lerp_mix,
    token_shift,
    zigzag,
)
from rwkv_train.model.config import RWKVConfig
from rwkv_train.ops import wkv4


class TimeMix(nn.Module):
    """RWKV-4 attention replacement: out = W_o(sigmoid(W_r x^r) * wkv(W_k x^k, W_v x^v))."""

    def __init__(self, cfg: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C = cfg.n_embd
        self.layer_id, self.n_layer, self.backend = layer_id, cfg.n_layer, cfg.wkv_backend
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_first = nn.Parameter(torch.empty(C))
        for name in ("k", "v", "r"):
            setattr(self, f"time_mix_{name}", nn.Parameter(torch.empty(1, 1, C)))
        self.key = Linear(C, C, scale=0.0)
        self.value = Linear(C, C, scale=1.0)
        self.receptance = Linear(C, C, scale=0.0)
        self.output = Linear(C, C, scale=0.0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The RWKV-4 (v4neo) init: decays from -5 to 3 (log-log), zigzag bonus around ln 0.3."""
        C = self.time_decay.shape[-1]
        r0, r1 = layer_ratios(self.layer_id, self.n_layer)
        dd, e = channel_ramp(C, self.time_decay.device)
        assign(self.time_decay, -5 + 8 * e ** (0.7 + 1.3 * r0))
        assign(self.time_first, math.log(0.3) + 0.5 * zigzag(C, e.device))
        assign(self.time_mix_k, dd**r1)
        assign(self.time_mix_v, dd**r1 + 0.3 * r0)
        assign(self.time_mix_r, dd ** (0.5 * r1))

    def forward(
        self, x: Tensor, shift: Tensor | None, state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        xp = token_shift(x, shift)  # (B, T, C)
        r = torch.sigmoid(self.receptance(lerp_mix(x, xp, self.time_mix_r)))
        k = self.key(lerp_mix(x, xp, self.time_mix_k)).float()  # exp-heavy: fp32
        v = self.value(lerp_mix(x, xp, self.time_mix_v)).float()
        w, u = self.time_decay.float(), self.time_first.float()
        y, state = wkv4(k, v, w, u, state, backend=self.backend)  # (B, T, C), (B, 3, C)
        return self.output(r * y.to(r.dtype)), x[:, -1].float(), state


class ChannelMix(nn.Module):
    """RWKV-4 feed-forward: sigmoid(W_r x^r) * W_v relu(W_k x^k)^2, width 4C by default."""

    def __init__(self, cfg: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C, F_ = cfg.n_embd, cfg.ffn_dim
        self.layer_id, self.n_layer = layer_id, cfg.n_layer
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, F_, scale=1.0)
        self.receptance = Linear(C, C, scale=0.0)
        self.value = Linear(F_, C, scale=0.0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _, r1 = layer_ratios(self.layer_id, self.n_layer)
        dd, _ = channel_ramp(self.time_mix_k.shape[-1], self.time_mix_k.device)
        assign(self.time_mix_k, dd**r1)
        assign(self.time_mix_r, dd**r1)

    def forward(self, x: Tensor, shift: Tensor | None) -> tuple[Tensor, Tensor]:
        xp = token_shift(x, shift)  # (B, T, C)
        k = torch.relu(self.key(lerp_mix(x, xp, self.time_mix_k))) ** 2  # (B, T, F)
        r = torch.sigmoid(self.receptance(lerp_mix(x, xp, self.time_mix_r)))
        return r * self.value(k), x[:, -1].float()
