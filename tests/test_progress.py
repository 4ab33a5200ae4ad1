"""Data consumed per step across resumes that changed the global batch or the context
length (`rwkv_train/progress.py`), and the LR schedule that counts its tokens through it."""

import pytest

from rwkv_train.config import OptimConfig
from rwkv_train.optim import LRSchedule
from rwkv_train.progress import Progress


def test_samples_and_tokens_add_up_over_phases() -> None:
    # 4 steps of 2 x 16 tokens, then 3 steps of 4 x 16, then 4 x 32 from step 7
    p = Progress.start(2, 16).resumed(4, 4, 16).resumed(7, 4, 32)
    assert p.phases == ((0, 2, 16), (4, 4, 16), (7, 4, 32))
    assert [p.samples(s) for s in (0, 1, 4, 5, 7, 9)] == [0, 2, 8, 12, 20, 28]
    assert [p.tokens(s) for s in (0, 4, 7, 9)] == [0, 128, 320, 576]
    assert (p.batch, p.ctx_len) == (4, 32)


def test_resumed_keeps_history_up_to_the_step_and_merges_unchanged_phases() -> None:
    p = Progress.start(2, 16).resumed(4, 4, 16)
    assert p.resumed(6, 4, 16) == p  # same batch and context: no new phase
    # a resume from a checkpoint before the change (step 3) drops the phase after it
    assert p.resumed(3, 8, 16).phases == ((0, 2, 16), (3, 8, 16))
    assert p.resumed(3, 2, 16).phases == ((0, 2, 16),)
    assert Progress.start(2, 16).resumed(0, 4, 16).phases == ((0, 4, 16),)
    assert Progress.of([[0, 2, 16], [4, 4, 16]]) == p
    with pytest.raises(ValueError, match="start at step 0"):
        Progress.of([[1, 2, 16]])


def test_lr_decay_counts_tokens_across_a_batch_change() -> None:
    """With decay_tokens fixed, the LR at a step depends on the tokens trained, not on the
    step: doubling the batch at step 5 makes each later step advance the decay twice as far."""
    cfg = OptimConfig(lr_init=1.0, lr_final=0.0, warmup_steps=2, decay="cosine", decay_tokens=400)
    one = LRSchedule.from_config(cfg, Progress.start(2, 10), max_steps=100)
    two = LRSchedule.from_config(cfg, Progress.start(2, 10).resumed(5, 4, 10), max_steps=100)
    assert [two(s) for s in range(6)] == [one(s) for s in range(6)]
    for s in range(6, 12):
        assert two(s) == pytest.approx(one(5 + 2 * (s - 5)), abs=1e-12)
    # without decay_tokens, the decay still ends at max_steps: 3 + 5 steps of 20 + 40 tokens
    cfg.decay_tokens = None
    ends = LRSchedule.from_config(cfg, Progress.start(2, 10).resumed(5, 4, 10), max_steps=10)
    assert ends.decay_tokens == 3 * 20 + 5 * 40
    assert ends(9) > 0.0 and ends(10) == pytest.approx(0.0, abs=1e-12)
