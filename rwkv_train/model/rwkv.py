"""The RWKV language model: embedding, L residual blocks, output LayerNorm and head.

    x = emb(idx); x = ln0(x) (block 0 only); per block: x += att(ln1(x)); x += ffn(ln2(x))
    logits = head(ln_out(x))

The version (4, 5 or 6) only picks the TimeMix / ChannelMix classes of rwkv4.py, rwkv5.py or
rwkv6.py; everything else is shared. The state_dict is the reference .pth layout.

Recurrent state (`init_state`, `forward_with_state`): a flat list of 3 * n_layer float32
tensors, for block l:
    state[3l + 0]  TimeMix shift, ln1 output of the last token     (B, C)
    state[3l + 1]  WKV state: v5/v6 (B, H, N, N) indexed [key, value]; v4 (B, 3, C) = aa, bb, pp
    state[3l + 2]  ChannelMix shift, ln2 output of the last token  (B, C)
A list of plain tensors so callers can detach, clone, index a batch row or stack it freely.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rwkv_train.model import rwkv4, rwkv5, rwkv6
from rwkv_train.model.common import Embedding, Linear
from rwkv_train.model.config import RWKVConfig
from rwkv_train.ops.backend import resolve

MIXERS: dict[int, tuple[type[nn.Module], type[nn.Module]]] = {
    4: (rwkv4.TimeMix, rwkv4.ChannelMix),
    5: (rwkv5.TimeMix, rwkv5.ChannelMix),
    6: (rwkv6.TimeMix, rwkv6.ChannelMix),
}

State = list[Tensor]


class Block(nn.Module):
    """One residual block; block 0 also owns ln0, applied to the embedding."""

    def __init__(self, cfg: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        time_mix, channel_mix = MIXERS[cfg.version]
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = time_mix(cfg, layer_id)
        self.ffn = channel_mix(cfg, layer_id)

    def forward(
        self, x: Tensor, att_shift: Tensor | None, wkv: Tensor | None, ffn_shift: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        dx, att_shift, wkv = self.att(self.ln1(x), att_shift, wkv)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, att_shift, wkv, ffn_shift


class RWKV(nn.Module):
    """RWKV-4/5/6 language model: `model(idx)` gives logits (B, T, V) in float32."""

    def __init__(self, cfg: RWKVConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = Linear(cfg.n_embd, cfg.vocab_size, scale=0.5)
        if cfg.compile:  # in place: parameter names (and so checkpoints) stay the same
            for block in self.blocks:
                block.compile()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Re-initialise every parameter (after `to_empty()` of a meta-device build).

        Calls `reset_parameters()` children-first in registration order, the order in which
        eager construction ran them, so the same seed gives the same weights.
        """

        def visit(module: nn.Module) -> None:
            for child in module.children():
                visit(child)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

        visit(self)

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The state before the first token: zeros (v4: pp = -1e30), see the module docstring."""
        cfg = self.cfg
        device = self.emb.weight.device if device is None else device
        B, C = batch_size, cfg.n_embd
        state: State = []
        for _ in range(cfg.n_layer):
            if cfg.version == 4:
                wkv = torch.zeros(B, 3, C, device=device)
                wkv[:, 2] = -1e30  # pp: log-scale of the empty sums
            else:
                N = cfg.head_size
                wkv = torch.zeros(B, cfg.n_head, N, N, device=device)
            state += [torch.zeros(B, C, device=device), wkv, torch.zeros(B, C, device=device)]
        return state

    # ------------------------------------------------------------------ forward
    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, V), float32, for token ids idx (B, T), every sample from a fresh state."""
        return self._run(idx, None)[0]

    def forward_with_state(
        self, idx: Tensor, state: Sequence[Tensor] | None
    ) -> tuple[Tensor, State]:
        """(logits (B, T, V), new state) continuing from `state` (None = `init_state`).

        Any split of a sequence into calls (T tokens at once, chunks, one token at a time) gives
        the same logits. The input state is not modified.
        """
        return self._run(idx, state)

    def _run(self, idx: Tensor, state: Sequence[Tensor] | None) -> tuple[Tensor, State]:
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(
                f"idx must be (B, T) token ids with T >= 1, got shape {tuple(idx.shape)}"
            )
        L = self.cfg.n_layer
        if state is not None and len(state) != 3 * L:
            raise ValueError(f"state must hold 3 * n_layer = {3 * L} tensors, got {len(state)}")
        if self.cfg.compile:  # find (build, load) the WKV op here, outside the compiled blocks
            resolve(f"wkv{self.cfg.version}", self.cfg.wkv_backend, idx.device)
        use_ckpt = self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled()
        x = self.emb(idx)  # (B, T, C)
        new_state: State = []
        for i, block in enumerate(self.blocks):
            s = (None, None, None) if state is None else tuple(state[3 * i : 3 * i + 3])
            if use_ckpt:
                x, *s = checkpoint(block, x, *s, use_reentrant=False)
            else:
                x, *s = block(x, *s)
            new_state += s
        logits = self.head(self.ln_out(x))  # (B, T, V)
        return logits.float(), new_state
