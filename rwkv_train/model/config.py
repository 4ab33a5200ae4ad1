"""The typed configuration of an RWKV model, shared by the three versions.

The keys of every conf/model/*.yaml file are exactly the fields of `RWKVConfig`, so Hydra's
`model` group turns into a config with `RWKVConfig(**cfg)` (or `RWKVConfig.from_dict(cfg)`,
which names unknown keys). Bad values fail here, at start-up, with a message that names the
field and the fix, rather than as a shape error deep inside a training run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

VERSIONS = (4, 5, 6)
BACKENDS = ("auto", "torch", "cpp", "cuda")


@dataclass
class RWKVConfig:
    """Architecture of an RWKV-4, RWKV-5 (Eagle) or RWKV-6 (Finch) language model."""

    version: int = 6
    """4 (RWKV-4, channel-wise state), 5 (Eagle, matrix state, static decay) or 6 (Finch,
    data-dependent decay and token shift)."""

    n_layer: int = 2
    """Number of residual blocks (L)."""

    n_embd: int = 128
    """Model width (C); a multiple of `head_size` for versions 5 and 6."""

    vocab_size: int = 65536
    """Rows of the embedding and the head. 65536 is the RWKV World vocabulary that our data
    preparation writes; 50277 is the GPT-NeoX vocabulary of the RWKV-4 Pile models."""

    head_size: int = 64
    """Channels per WKV head (N) for versions 5 and 6; the number of heads is n_embd / head_size.
    Unused by version 4, whose state is per channel."""

    ctx_len: int = 512
    """Training context length (tokens per sample). The model itself runs any length; the
    trainer and the data loader read this value."""

    dim_ffn: int | None = None
    """ChannelMix hidden width (F). None derives it: floor(3.5 C / 32) * 32 for versions 5 and 6,
    4 C for version 4."""

    mix_lora_dim: int = 32
    """RWKV-6 only: width of the data-dependent token-shift LoRA (time_maa_w1 is [C, 5 * this]).
    The released C = 4096 Finch models use 64."""

    decay_lora_dim: int = 64
    """RWKV-6 only: width of the data-dependent decay LoRA (time_decay_w1 is [C, this]).
    The released C = 4096 Finch models use 128."""

    head_size_divisor: int = 8
    """Versions 5 and 6: the WKV output is divided by this before the per-head GroupNorm
    (eps 1e-5); RWKV-6 folds it into the GroupNorm eps (1e-5 * divisor^2), which is the same."""

    grad_checkpoint: bool = False
    """Recompute each block in the backward pass (torch.utils.checkpoint) to save activation
    memory while training; no effect in eval mode or under torch.no_grad()."""

    compile: bool = False
    """torch.compile each block (the embedding, head and loss stay eager): fewer, fused
    kernels for the token shifts, LoRAs and norms around the WKV op, after a compile on the
    first step (and on each new input shape). Not with ZeRO-3."""

    wkv_backend: str = "auto"
    """WKV implementation passed to rwkv_train.ops: "auto" (fastest available), "torch"
    (chunked PyTorch), "cpp" (fused CPU C++) or "cuda" (fused CUDA)."""

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RWKVConfig:
        """Build from a mapping (a Hydra DictConfig works); unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown RWKVConfig key(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**{str(k): v for k, v in values.items()})

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], **overrides: Any) -> RWKVConfig:
        """The architecture of a reference-layout checkpoint, read from its key names and shapes.

        Released files differ in ways only the tensors tell (LoRA widths 32/64 or 64/128,
        vocabulary 50277 or 65536), so a loader must not assume the defaults. `overrides` sets
        the fields a checkpoint cannot tell (ctx_len, wkv_backend, grad_checkpoint, compile).
        """
        sd = state_dict
        C = sd["emb.weight"].shape[1]
        layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
        values: dict[str, Any] = dict(
            n_layer=max(layers) + 1, n_embd=C, vocab_size=sd["emb.weight"].shape[0]
        )
        if "blocks.0.att.time_maa_w1" in sd:
            values["version"] = 6
            values["mix_lora_dim"] = sd["blocks.0.att.time_maa_w2"].shape[1]
            values["decay_lora_dim"] = sd["blocks.0.att.time_decay_w1"].shape[1]
        elif "blocks.0.att.ln_x.weight" in sd:
            values["version"] = 5
        else:
            values["version"] = 4
        if values["version"] in (5, 6):
            values["head_size"] = C // sd["blocks.0.att.time_faaaa"].shape[0]
        values["dim_ffn"] = sd["blocks.0.ffn.key.weight"].shape[0]
        values.update(overrides)
        cfg = cls(**values)
        if cfg.dim_ffn == dataclasses.replace(cfg, dim_ffn=None).ffn_dim:
            cfg.dim_ffn = None  # the derived width: keep the config minimal
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (what a conf/model YAML file holds)."""
        return dataclasses.asdict(self)

    def _validate(self) -> None:
        def fail(field: str, fix: str) -> None:
            raise ValueError(f"RWKVConfig.{field}={getattr(self, field)!r} is invalid: {fix}")

        for field in ("version", "n_layer", "n_embd", "vocab_size", "head_size", "ctx_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(field, "it must be an integer")
        if self.version not in VERSIONS:
            fail("version", f"use one of {VERSIONS}")
        for field in ("n_layer", "n_embd", "vocab_size", "head_size", "ctx_len"):
            if getattr(self, field) < 1:
                fail(field, "it must be at least 1")
        if self.version in (5, 6) and self.n_embd % self.head_size:
            fail(
                "n_embd",
                f"versions 5 and 6 need n_embd to be a multiple of head_size={self.head_size}",
            )
        if self.dim_ffn is not None and (
            isinstance(self.dim_ffn, bool) or not isinstance(self.dim_ffn, int) or self.dim_ffn < 1
        ):
            fail("dim_ffn", "use a positive integer, or null to derive it from n_embd")
        for field in ("mix_lora_dim", "decay_lora_dim", "head_size_divisor"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(field, "it must be a positive integer")
        for flag in ("grad_checkpoint", "compile"):
            if not isinstance(getattr(self, flag), bool):
                fail(flag, "use true or false")
        if self.wkv_backend not in BACKENDS:
            fail("wkv_backend", f"use one of {BACKENDS}")
        if self.version in (5, 6) and self.ffn_dim < 1:
            fail("n_embd", "it is too small: the derived ChannelMix width is 0; set dim_ffn")

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_head(self) -> int:
        """WKV heads (H = C / N) for versions 5 and 6; 0 for version 4 (no heads)."""
        return self.n_embd // self.head_size if self.version in (5, 6) else 0

    @property
    def ffn_dim(self) -> int:
        """The ChannelMix width actually used (F)."""
        if self.dim_ffn is not None:
            return self.dim_ffn
        if self.version == 4:
            return 4 * self.n_embd
        return int(3.5 * self.n_embd) // 32 * 32

    def layer_params(self) -> int:
        """Parameters of one residual block (ln0 of block 0 not included).

        Every version: ln1, ln2 (4C); ChannelMix key, value (2FC) and receptance (C^2).
        v4: 3 mixes + time_decay + time_first (5C) + 4 C^2 (r, k, v, o); 2 ChannelMix mixes.
        v5: 4 mixes + time_decay + time_faaaa (6C) + 5 C^2 (r, k, v, g, o) + ln_x (2C); 2 mixes.
        v6: 6 time_maa + time_decay + time_faaaa (8C) + LoRAs 2*5*m*C + 2*d*C + 5 C^2 + ln_x
        (2C); 2 ChannelMix mixes.
        """
        C, F = self.n_embd, self.ffn_dim
        common = 4 * C + 2 * F * C + C * C + 2 * C
        if self.version == 4:
            return common + 5 * C + 4 * C * C
        if self.version == 5:
            return common + 6 * C + 5 * C * C + 2 * C
        lora = 2 * 5 * self.mix_lora_dim * C + 2 * self.decay_lora_dim * C
        return common + 8 * C + lora + 5 * C * C + 2 * C

    def num_params(self, embedding: bool = True) -> int:
        """Total parameters: L * layer_params + ln0 + ln_out (4C) + emb and head (2VC).

        With embedding=False the embedding table (a lookup, no FLOPs) is left out.
        """
        C, V = self.n_embd, self.vocab_size
        total = self.n_layer * self.layer_params() + 4 * C + V * C
        return total + (V * C if embedding else 0)

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token, for MFU.

        6 * (num_params(embedding=False)): each weight does one multiply-add (2 FLOPs) per token
        in the forward and twice that in the backward (the usual 6N rule; vectors and norms are
        counted too, a negligible excess). Plus the WKV term, 3x its forward cost:
        v5/v6 per layer 4 * C * N (per head, reading the N x N state with r is 2N^2, decaying
        and adding k v^T is 2N^2), so 12 * L * C * N; v4 about 12 FLOPs per channel, 36 * L * C.
        """
        C, L = self.n_embd, self.n_layer
        wkv = 3 * (4 * C * self.head_size if self.version in (5, 6) else 12 * C) * L
        return 6 * self.num_params(embedding=False) + wkv
