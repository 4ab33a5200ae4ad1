"""RWKV-5 (Eagle): TimeMix with a static token shift and a static per-channel decay.

Same calling convention as rwkv6.py: mixers take the LayerNorm output x (B, T, C), the previous
token's x (B, C) or None and (TimeMix) the WKV state (B, H, N, N) or None, and return the
residual update, the new shift state (float32) and the new WKV state. Keys and shapes follow
the RWKV-5.2 .pth layout (`time_mix_*`, time_decay and time_faaaa of shape [H, N]).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_train.model.common import (
    Linear,
    assign,
    channel_ramp,
    init_matrix_wkv,
    layer_ratios,
    lerp_mix,
    token_shift,
)
from rwkv_train.model.config import RWKVConfig
from rwkv_train.model.rwkv4 import ChannelMix  # Eagle's ChannelMix is RWKV-4's, width 3.5C
from rwkv_train.ops import wkv5

__all__ = ["ChannelMix", "TimeMix"]


class TimeMix(nn.Module):
    """Eagle attention replacement: lerp token shift, WKV5 with static decay, GroupNorm, gate."""

    def __init__(self, cfg: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C = cfg.n_embd
        self.layer_id, self.n_layer, self.backend = layer_id, cfg.n_layer, cfg.wkv_backend
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.head_size_divisor = cfg.head_size_divisor
        for name in ("k", "v", "r", "g"):
            setattr(self, f"time_mix_{name}", nn.Parameter(torch.empty(1, 1, C)))
        self.time_decay = nn.Parameter(torch.empty(self.n_head, self.head_size))
        self.time_faaaa = nn.Parameter(torch.empty(self.n_head, self.head_size))
        self.receptance = Linear(C, C, scale=1.0)
        self.key = Linear(C, C, scale=1.0)
        self.value = Linear(C, C, scale=1.0)
        self.output = Linear(C, C, scale=0.0)
        self.gate = Linear(C, C, scale=1.0)
        self.ln_x = nn.GroupNorm(self.n_head, C, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The x052 init: mixes weight the current token (the lerp is reversed vs Finch)."""
        C = self.time_mix_k.shape[-1]
        r0, r1 = layer_ratios(self.layer_id, self.n_layer)
        dd, _ = channel_ramp(C, self.time_mix_k.device)
        assign(self.time_mix_k, dd**r1)
        assign(self.time_mix_v, dd**r1 + 0.3 * r0)
        assign(self.time_mix_r, dd ** (0.5 * r1))
        assign(self.time_mix_g, dd ** (0.5 * r1))
        init_matrix_wkv(self.time_decay, self.time_faaaa, self.ln_x, self.layer_id, self.n_layer)

    def forward(
        self, x: Tensor, shift: Tensor | None, state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xp = token_shift(x, shift)  # (B, T, C)
        r = self.receptance(lerp_mix(x, xp, self.time_mix_r)).view(B, T, H, N)
        k = self.key(lerp_mix(x, xp, self.time_mix_k)).view(B, T, H, N)
        v = self.value(lerp_mix(x, xp, self.time_mix_v)).view(B, T, H, N)
        g = F.silu(self.gate(lerp_mix(x, xp, self.time_mix_g)))
        w = self.time_decay.float()  # (H, N) raw decay, fp32
        y, state = wkv5(r, k, v, w, self.time_faaaa, state, backend=self.backend)
        y = self.ln_x(y.reshape(B * T, C) / self.head_size_divisor).view(B, T, C)
        return self.output(y * g), x[:, -1].float(), state
