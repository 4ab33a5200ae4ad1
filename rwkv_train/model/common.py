"""Pieces every RWKV version shares: token shift, the init formulas, bias-free Linear, Embedding.

Initialisation contract (what makes meta-device construction work): every module creates its
parameters with `torch.empty` and fills them in its own `reset_parameters()`, called at the end
of its `__init__`, after its children were built (and so initialised). `RWKV.init_weights()`
replays the same calls in the same order (children before parents), so a model built on the
meta device, moved with `to_empty()` and initialised gets exactly the weights of an eager build
under the same random seed. Every `reset_parameters` does nothing on meta tensors.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """x_{t-1} for every t: x (B, T, C) shifted right by one, `prev` (B, C) or zeros in front."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)  # (B, T, C)


def layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """(r0, r1) of the init formulas: r0 = l / (L - 1) (0 when L = 1), r1 = 1 - l / L."""
    r0 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    return r0, 1.0 - layer_id / n_layer


def channel_ramp(n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(d, e) as float64 vectors of length n: d_i = i / n and e_i = i / (n - 1) (0 when n = 1)."""
    i = torch.arange(n, dtype=torch.float64, device=device)
    return i / n, i / max(n - 1, 1)


def float32_empty(*shape: int, device: torch.device | None = None) -> Tensor:
    """An uninitialised float32 tensor, also inside `deepspeed.zero.Init`.

    Under bf16 training ZeRO-3 builds bf16 parameters (zero.Init turns every floating tensor
    a constructor makes into bf16; a conversion such as `.float()` it leaves alone). Random
    draws made into a bf16 tensor differ from the eager float32 build's by more than one
    rounding, and QR has no bf16 kernel, so the random inits draw into float32 and copy.
    """
    return torch.empty(*shape, device=device).float()


def uniform(param: Tensor, low: float, high: float) -> None:
    """nn.init.uniform_ with the draws of a float32 tensor, whatever param's dtype."""
    if not param.is_meta:
        assign(param, float32_empty(*param.shape, device=param.device).uniform_(low, high))


def zigzag(n: int, device: torch.device | None = None) -> Tensor:
    """((i + 1) mod 3) - 1 for i < n: the -1, 0, 1 pattern the bonus inits add."""
    return (torch.arange(n, device=device) + 1) % 3 - 1.0


@torch.no_grad()
def assign(param: Tensor, value: Tensor | float) -> None:
    """Fill `param` in place (any dtype, broadcast to its shape); a no-op on meta tensors."""
    if param.is_meta:
        return
    if isinstance(value, Tensor):
        param.copy_(value.reshape(param.shape) if value.numel() == param.numel() else value)
    else:
        param.fill_(value)


def init_matrix_wkv(
    time_decay: Tensor, time_faaaa: Tensor, ln_x: nn.GroupNorm, layer_id: int, n_layer: int
) -> None:
    """The decay, bonus and ln_x init that Eagle (v5) and Finch (v6) share, in one place.

    time_decay_n = -6 + 5 e_n^(0.7 + 1.3 r0); time_faaaa_n = r0 (1 - e_n) + 0.1 zigzag_n;
    ln_x.weight = ((l + 1) / L)^0.7, bias 0. Works for the v5 [H, N] and v6 [1, 1, C] shapes.
    """
    C = time_decay.numel()
    r0, _ = layer_ratios(layer_id, n_layer)
    _, e = channel_ramp(C, time_decay.device)
    assign(time_decay, -6 + 5 * e ** (0.7 + 1.3 * r0))
    assign(time_faaaa, r0 * (1 - e) + 0.1 * zigzag(C, e.device))
    assign(ln_x.weight, ((1 + layer_id) / n_layer) ** 0.7)
    assign(ln_x.bias, 0.0)


def orthogonal(rows: int, cols: int, gain: float, device: torch.device) -> Tensor:
    """nn.init.orthogonal_'s matrix (the same random draws and values), in float32."""
    flat = float32_empty(rows, cols, device=device).normal_(0, 1)
    if rows < cols:
        flat = flat.t()
    q, r = torch.linalg.qr(flat)
    q = q * torch.diagonal(r).sign()
    return (q.t() if rows < cols else q) * gain


class Linear(nn.Module):
    """y = x W^T without bias; W initialised orthogonal with gain scale * sqrt(max(1, out/in)).

    scale = 0 gives zeros. The sqrt(out/in) factor for tall matrices is the rule of every RWKV
    reference trainer (it is where the head's 0.5 * sqrt(V / C) comes from).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        if self.scale == 0:
            nn.init.zeros_(self.weight)
            return
        gain = self.scale * math.sqrt(max(1.0, self.out_features / self.in_features))
        assign(
            self.weight, orthogonal(self.out_features, self.in_features, gain, self.weight.device)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, scale={self.scale}"


class Embedding(nn.Module):
    """Token embedding initialised U(-1e-4, 1e-4): tiny, so ln0 sees nearly pure bias at first."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        uniform(self.weight, -1e-4, 1e-4)

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.weight)


def lerp_mix(x: Tensor, prev: Tensor, mix: Tensor) -> Tensor:
    """RWKV-4/5 static token shift: x * mix + x_{t-1} * (1 - mix) (mix = 1 keeps x)."""
    return x * mix + prev * (1 - mix)
