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


def test_warmup_stable_decay_and_an_anneal_from_a_constant_run() -> None:
    """100 tokens a step: warmup to step 2, lr_init to 500 tokens (step 5), linear to lr_final
    at max_steps. A run held constant and resumed at step 6 with decay_start_tokens = its 600
    tokens seen continues without a jump and anneals to lr_final."""
    wsd = OptimConfig(lr_init=1.0, lr_final=0.1, warmup_steps=2, decay="linear")
    wsd.decay_start_tokens = 500
    s = LRSchedule.from_config(wsd, Progress.start(10, 10), max_steps=10)
    assert s(1) == pytest.approx(0.6) and s(2) == s(5) == 1.0
    assert s(7) == pytest.approx(1 - 0.9 * 2 / 5)
    assert s(10) == pytest.approx(0.1) and s(20) == pytest.approx(0.1)
    const = OptimConfig(lr_init=1.0, warmup_steps=2, decay="constant")
    held = LRSchedule.from_config(const, Progress.start(10, 10), max_steps=1000)
    anneal = OptimConfig(lr_init=1.0, lr_final=0.1, warmup_steps=2, decay="linear")
    anneal.decay_start_tokens = 600
    annealed = LRSchedule.from_config(anneal, Progress.start(10, 10), max_steps=9)
    assert [annealed(t) for t in range(7)] == [held(t) for t in range(7)]
    assert annealed(9) == pytest.approx(0.1) and 0.1 < annealed(8) < 1.0
