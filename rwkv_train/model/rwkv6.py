"""RWKV-6 (Finch): TimeMix with data-dependent token shift and decay, and its ChannelMix.

Each mixer takes the LayerNorm output x (B, T, C), the previous token's x (B, C) or None, and
for TimeMix the WKV state (B, H, N, N) or None; it returns the residual update, the new shift
state (x of the last token, float32) and the new WKV state. Parameter names and shapes are the
reference .pth layout, so state_dicts load into RWKV-LM, ChatRWKV and the `rwkv` package.
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
    token_shift,
    uniform,
)
from rwkv_train.model.config import RWKVConfig
from rwkv_train.ops import wkv6


class TimeMix(nn.Module):
    """Finch attention replacement: ddlerp token shift, LoRA decay, WKV6, GroupNorm, SiLU gate."""

    def __init__(self, cfg: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C, m, d = cfg.n_embd, cfg.mix_lora_dim, cfg.decay_lora_dim
        self.layer_id, self.n_layer, self.backend = layer_id, cfg.n_layer, cfg.wkv_backend
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.empty(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * m))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, m, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, d))
        self.time_decay_w2 = nn.Parameter(torch.empty(d, C))
        self.time_faaaa = nn.Parameter(torch.empty(self.n_head, self.head_size))
        self.receptance = Linear(C, C, scale=1.0)
        self.key = Linear(C, C, scale=0.1)
        self.value = Linear(C, C, scale=1.0)
        self.output = Linear(C, C, scale=0.0)
        self.gate = Linear(C, C, scale=0.1)
        # GroupNorm(x / divisor, eps 1e-5) == GroupNorm(x, eps 1e-5 * divisor^2)
        self.ln_x = nn.GroupNorm(self.n_head, C, eps=1e-5 * cfg.head_size_divisor**2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The Finch-era (mid-2024) init of the reference trainer; see the module docstring."""
        C = self.time_decay.shape[-1]
        r0, r1 = layer_ratios(self.layer_id, self.n_layer)
        dd, _ = channel_ramp(C, self.time_decay.device)
        for name in ("x", "w", "k"):
            assign(getattr(self, f"time_maa_{name}"), 1 - dd**r1)
        assign(self.time_maa_v, 1 - (dd**r1 + 0.3 * r0))
        assign(self.time_maa_r, 1 - dd ** (0.5 * r1))
        assign(self.time_maa_g, 1 - dd ** (0.5 * r1))
        init_matrix_wkv(self.time_decay, self.time_faaaa, self.ln_x, self.layer_id, self.n_layer)
        for lora in (self.time_maa_w1, self.time_decay_w1):
            assign(lora, 0.0)
        for lora in (self.time_maa_w2, self.time_decay_w2):
            uniform(lora, -0.01, 0.01)

    def forward(
        self, x: Tensor, shift: Tensor | None, state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        dx = token_shift(x, shift) - x  # (B, T, C): x_{t-1} - x_t
        z = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1)  # (B, T, 5m)
        z = z.view(B * T, 5, -1).transpose(0, 1)  # (5, B*T, m)
        mw, mk, mv, mr, mg = torch.bmm(z, self.time_maa_w2).view(5, B, T, C).unbind(0)
        xw = x + dx * (self.time_maa_w + mw)
        r = self.receptance(x + dx * (self.time_maa_r + mr)).view(B, T, H, N)
        k = self.key(x + dx * (self.time_maa_k + mk)).view(B, T, H, N)
        v = self.value(x + dx * (self.time_maa_v + mv)).view(B, T, H, N)
        g = F.silu(self.gate(x + dx * (self.time_maa_g + mg)))
        lora = torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2  # (B, T, C)
        w = (self.time_decay.float() + lora.float()).view(B, T, H, N)  # raw decay, fp32
        y, state = wkv6(r, k, v, w, self.time_faaaa, state, backend=self.backend)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g), x[:, -1].float(), state


class ChannelMix(nn.Module):
    """Finch feed-forward: sigmoid(W_r x^r) * W_v relu(W_k x^k)^2 with a static token shift."""

    def __init__(self, cfg: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C, F_ = cfg.n_embd, cfg.ffn_dim
        self.layer_id, self.n_layer = layer_id, cfg.n_layer
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, F_, scale=1.0)
        self.receptance = Linear(C, C, scale=0.0)
        self.value = Linear(F_, C, scale=0.0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _, r1 = layer_ratios(self.layer_id, self.n_layer)
        dd, _ = channel_ramp(self.time_maa_k.shape[-1], self.time_maa_k.device)
        assign(self.time_maa_k, 1 - dd**r1)
        assign(self.time_maa_r, 1 - dd**r1)

    def forward(self, x: Tensor, shift: Tensor | None) -> tuple[Tensor, Tensor]:
        dx = token_shift(x, shift) - x  # (B, T, C)
        k = torch.relu(self.key(x + dx * self.time_maa_k)) ** 2  # (B, T, F)
        r = torch.sigmoid(self.receptance(x + dx * self.time_maa_r))
        return r * self.value(k), x[:, -1].float()
