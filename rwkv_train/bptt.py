"""The loss of a long sample, computed segment by segment with exact gradients.

An RNN's activation memory grows with the sequence, so training at 64K tokens would need 16
times the memory of 4K. The reference trainers either cap the context or cut the gradient
at segment boundaries (truncated BPTT, as the infctx trainer's default does), which stops
the model from learning to use what lies further back than one segment. Here a sample runs
as consecutive segments of `segment_len` tokens, each continuing from the RNN state the
previous one left (the WKV kernels take an initial state and give its gradient). Each
segment is a `torch.utils.checkpoint` region that computes its own cross-entropy, so the
forward pass keeps only the segment's tokens and the state at its start; the backward pass
recomputes one segment at a time, last first, and passes the gradient of its starting state
to the segment before. The gradient is that of the whole sample, and the memory that of one
segment plus one state per segment (n_layer x (2C + H N^2) floats per sample), with the
(segment, vocabulary) logits in place of (ctx_len, vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rwkv_train.model import RWKV
from rwkv_train.optim import L2Wrap


def _segment(
    net: RWKV, x: Tensor, y: Tensor, weight: float, l2wrap: float, *state: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(weighted loss to backpropagate, every token's cross-entropy, state after the
    segment)."""
    logits, new_state = net.forward_with_state(x, state or None)
    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    ce = per_token.mean()
    loss = L2Wrap.apply(ce, logits, l2wrap) if l2wrap > 0 else ce
    return loss * weight, per_token.view(y.shape).detach(), new_state


def segmented_loss(
    net: RWKV, x: Tensor, y: Tensor, segment_len: int, l2wrap: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(loss to backpropagate, every token's cross-entropy (B, T)) of token ids x (B, T)
    against targets y; validation reads its loss by source and by position from the latter.

    The loss equals, up to float rounding, the cross-entropy of `net(x)` with L2Wrap applied
    (the segments' means weighted by their lengths); `segment_len` >= T runs the sample
    whole, without recomputation.
    """
    T = x.shape[1]
    if segment_len < 1:
        raise ValueError(f"segment_len must be at least 1, got {segment_len}")
    grad = torch.is_grad_enabled() and segment_len < T  # one segment: nothing to recompute
    state: Sequence[Tensor] = ()
    parts: list[Tensor] = []
    ces: list[Tensor] = []
    for start in range(0, T, segment_len):
        stop = min(start + segment_len, T)
        share = (stop - start) / T
        args = (net, x[:, start:stop], y[:, start:stop], share, l2wrap, *state)
        if grad:
            part, ce, state = checkpoint(_segment, *args, use_reentrant=False)
        else:
            part, ce, state = _segment(*args)
        parts.append(part)
        ces.append(ce)
    return torch.stack(parts).sum(), torch.cat(ces, 1)
