"""What a validation pass measures: the loss of every source and of every stretch of context.

A data mix is judged by more than its mean: each source (a language, code, one component of a
corpus) gets its own loss, val/loss/<source>, so a mixture change that helps one and hurts
another shows. And an RNN's use of its state shows in the loss by position in the sample:
every sample starts from an empty state, so the token at position p is predicted from p tokens
of context; val/loss_by_pos/<first>-<last> falling from bucket to bucket is the model using
what lies further back, the question long-context training (trainer.segment_len) asks.

The sums stay on the device during the pass and are added over ranks once at its end.
"""

import math
from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor


def position_buckets(ctx_len: int) -> list[tuple[int, int]]:
    """[first, stop) ranges of positions: 0-63, 64-255, 256-1023, ... (each 4x the last),
    the last one ending at ctx_len; none when the sample fits in the first."""
    edges = [0]
    edge = 64
    while edge < ctx_len:
        edges.append(edge)
        edge *= 4
    edges.append(ctx_len)
    return list(pairwise(edges)) if len(edges) > 2 else []


class ValidationLoss:
    """Sums of per-token cross-entropies by source and by position, over one pass."""

    def __init__(self, names: list[str], ctx_len: int, device: torch.device) -> None:
        self.names = names
        self.ctx_len = ctx_len
        # row 0: each source's sum of sample means; row 1: its sample count
        self.by_source = torch.zeros(2, len(names), dtype=torch.float64, device=device)
        self.by_position = torch.zeros(ctx_len, dtype=torch.float64, device=device)

    def add(self, ce: Tensor, source: Tensor) -> None:
        """ce: (B, ctx_len) cross-entropy of every token; source: (B,) the source of each
        sample, -1 for a repeat that only evens out the ranks' batch counts."""
        keep = source >= 0
        ce, source = ce[keep].double(), source[keep]
        self.by_source[0].index_add_(0, source, ce.mean(1))
        self.by_source[1].index_add_(0, source, torch.ones_like(ce[:, 0]))
        self.by_position += ce.sum(0)

    def metrics(self, all_ranks_sum: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """The pass's metrics, from the sums of every rank; {} when no sample counted."""
        sums = all_ranks_sum(self.by_source).cpu()
        position = all_ranks_sum(self.by_position).cpu()
        samples = float(sums[1].sum())
        if samples == 0:
            return {}
        loss = float(sums[0].sum()) / samples
        out = {"val/loss": loss, "val/ppl": math.exp(min(loss, 80.0))}
        if len(self.names) > 1:
            for name, total, n in zip(self.names, sums[0], sums[1], strict=True):
                if n > 0:
                    out[f"val/loss/{name}"] = float(total / n)
        width = len(str(self.ctx_len - 1))
        for first, stop in position_buckets(self.ctx_len):
            key = f"val/loss_by_pos/{first:0{width}d}-{stop - 1:0{width}d}"
            out[key] = float(position[first:stop].sum()) / (samples * (stop - first))
        return out


def summary(metrics: dict[str, float]) -> str:
    """One line of a pass's metrics: "loss L; <source> L; ...; by position <range> L, ..."."""
    parts = [f"loss {metrics['val/loss']:.4f}"]
    parts += [f"{k[9:]} {v:.4f}" for k, v in metrics.items() if k.startswith("val/loss/")]
    pos = [f"{k[16:]} {v:.4f}" for k, v in metrics.items() if k.startswith("val/loss_by_pos/")]
    if pos:
        parts.append("by position " + ", ".join(pos))
    return "; ".join(parts)
