"""How much data a run has consumed by each optimizer step, across resumes that changed the
global batch or the context length.

Two things are functions of the step: the data position (the global sample index a resumed
run reads first, `data/sampler.py`) and the token count the LR schedule decays over. With
data.global_batch_size G and data.ctx_len fixed they are s*G and s*G*ctx_len. A resume may
change either: a larger batch later in training, a G that the rank count of a requeue
divides, a longer context. That starts a new phase at the resume's step. Checkpoints keep the
list of phases, so every later resume recomputes the same figures, and the figures before a
change stay the ones the run had.

The phases are plain tuples of ints because they travel inside checkpoints (which are loaded
with `weights_only`) and inside the LR schedule's saved state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Phase = tuple[int, int, int]  # (first step, samples per step, ctx_len)


@dataclass(frozen=True)
class Progress:
    phases: tuple[Phase, ...]

    @classmethod
    def start(cls, batch: int, ctx_len: int) -> Progress:
        """A run that has used one batch size and context length from step 0."""
        return cls(((0, batch, ctx_len),))

    @classmethod
    def of(cls, phases: Sequence[Sequence[int]]) -> Progress:
        """From the lists a checkpoint holds."""
        if not phases or phases[0][0] != 0:
            raise ValueError(f"phases must start at step 0: {phases}")
        return cls(tuple((int(s), int(b), int(c)) for s, b, c in phases))

    def samples(self, step: int) -> int:
        """Samples consumed by the steps before `step`: the next one's first global index."""
        return self._sum(step, lambda batch, ctx: batch)

    def tokens(self, step: int) -> int:
        """Tokens trained on (ctx_len per sample) by the steps before `step`."""
        return self._sum(step, lambda batch, ctx: batch * ctx)

    def _sum(self, step: int, per_step) -> int:
        total = 0
        for i, (first, batch, ctx) in enumerate(self.phases):
            end = self.phases[i + 1][0] if i + 1 < len(self.phases) else None
            last = step if end is None else min(step, end)
            total += max(0, last - first) * per_step(batch, ctx)
        return total

    def resumed(self, step: int, batch: int, ctx_len: int) -> Progress:
        """This progress up to `step`, then `batch` samples of `ctx_len` tokens per step."""
        kept = tuple(p for p in self.phases if p[0] < step)
        if kept and kept[-1][1:] == (batch, ctx_len):
            return Progress(kept)
        return Progress((*kept, (step, batch, ctx_len)))

    @property
    def batch(self) -> int:
        """Samples per step now."""
        return self.phases[-1][1]

    @property
    def ctx_len(self) -> int:
        return self.phases[-1][2]
