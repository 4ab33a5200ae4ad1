"""The memory planner: ZeRO partitions the right terms; it proposes what fits, refuses the rest."""

import pytest

from rwkv_train.model.config import RWKVConfig
from rwkv_train.plan import GB, estimate, main, recompute_options

FINCH_14B = RWKVConfig(version=6, n_layer=61, n_embd=4096, mix_lora_dim=64, decay_lora_dim=128)


def test_zero_stages_partition_the_right_terms() -> None:
    p = FINCH_14B.num_params()
    e1, e2, e3 = (estimate(FINCH_14B, 64, s, True, 1, 4096, 0) for s in (1, 2, 3))
    gathered = 2 * 2 * FINCH_14B.vocab_size * FINCH_14B.n_embd  # the head, and one prefetched
    assert e1.weights == e2.weights == 2 * p and e3.weights == 2 * p / 64 + gathered
    assert e1.gradients == 2 * p and e2.gradients == e3.gradients == 2 * p / 64
    assert e1.optimizer == e2.optimizer == e3.optimizer == 16 * p / 64
    assert e1.total > e2.total > e3.total


def test_checkpointing_cuts_activations_and_scales_with_micro_batch() -> None:
    off = estimate(FINCH_14B, 8, 2, False, 1, 4096, 0)
    on = estimate(FINCH_14B, 8, 2, True, 1, 4096, 0)
    on2 = estimate(FINCH_14B, 8, 2, True, 2, 4096, 0)
    assert on.activations < off.activations / 5
    assert on2.activations == pytest.approx(2 * on.activations)


def test_segments_bound_activations_by_the_segment_plus_states() -> None:
    whole = estimate(FINCH_14B, 8, 2, False, 1, 4096, 0)
    long = estimate(FINCH_14B, 8, 2, False, 1, 65536, 0, segment_len=4096)
    c, n = FINCH_14B.n_embd, FINCH_14B.head_size
    states = 16 * FINCH_14B.n_layer * (2 * c + c * n) * 4  # one state per segment, fp32
    assert long.activations == pytest.approx(whole.activations + states)
    assert long.segment_len == 4096 and "trainer.segment_len=4096" in long.overrides()
    # a segment as long as the sample is no segmenting
    assert estimate(FINCH_14B, 8, 2, False, 1, 4096, 0, segment_len=4096) == whole


def test_plan_fits_a_long_context_only_in_segments(capsys: pytest.CaptureFixture) -> None:
    args = ["model=finch_3b", "gpus=8", "gpu_mem_gb=80", "ctx_len=65536"]
    assert main([*args, "zero_stage=2", "offload=false", "segment_len=0"]) == 1
    assert main([*args, "zero_stage=2", "offload=false", "segment_len=4096"]) == 0
    assert "trainer.segment_len=4096" in capsys.readouterr().out
    # left to the planner: the longest segments that fit without block checkpointing, rather
    # than offload or ZeRO-3 (8192 fits only with ZeRO-2's partitioned gradients)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "proposed: deepspeed=zero2 model.grad_checkpoint=false" in out
    assert "trainer.segment_len=8192" in out
    # whole samples of 4096 tokens fit: no segments proposed
    assert main(["model=finch_3b", "gpus=8", "gpu_mem_gb=80", "ctx_len=4096"]) == 0
    assert "segment_len" not in capsys.readouterr().out.split("proposed:")[1]


def test_recompute_options_least_recomputation_first() -> None:
    assert recompute_options(4096, None, None) == [
        (0, False), (0, True),
        (2048, False), (1024, False), (512, False),
        (2048, True), (1024, True), (512, True),
    ]  # fmt: skip
    assert recompute_options(4096, True, None)[:2] == [(0, True), (2048, True)]
    assert recompute_options(65536, None, 0) == [(0, False), (0, True)]
    assert recompute_options(65536, False, 3000) == [(3000, False)]


def test_plan_prefers_zero2_to_recomputing(capsys: pytest.CaptureFixture) -> None:
    """Where ZeRO-2 fits with less recomputation than ZeRO-1, ZeRO-2 is proposed."""
    args = ["model=finch_3b", "gpus=8"]
    assert main([*args, "gpu_mem_gb=48"]) == 0
    assert "proposed: deepspeed=zero2 model.grad_checkpoint=false" in capsys.readouterr().out
    assert main([*args, "gpu_mem_gb=24"]) == 0  # ZeRO-1 fits only with checkpoints + segments
    proposed = capsys.readouterr().out.split("proposed:")[1].splitlines()[0]
    assert "deepspeed=zero2 model.grad_checkpoint=true" in proposed
    assert "segment_len" not in proposed
    assert main([*args, "gpu_mem_gb=48", "zero_stage=1"]) == 0
    assert "proposed: deepspeed=zero1 model.grad_checkpoint=true" in capsys.readouterr().out


def test_plan_proposes_a_fitting_setting(capsys: pytest.CaptureFixture) -> None:
    assert main(["model=finch_14b", "gpus=64", "gpu_mem_gb=80"]) == 0
    out = capsys.readouterr().out
    assert "proposed: deepspeed=zero" in out and "pre-emption signal lead" in out


def test_plan_refuses_what_cannot_fit(capsys: pytest.CaptureFixture) -> None:
    assert main(["model=finch_14b", "gpus=8", "gpu_mem_gb=24", "zero_stage=1"]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "weights" in out


def test_small_model_fits_without_checkpointing() -> None:
    small = RWKVConfig(version=6, n_layer=24, n_embd=2048)
    assert estimate(small, 8, 1, False, 1, 4096, 4).total < 80 * GB


def test_offload_moves_optimizer_and_gradients_to_the_host() -> None:
    p = FINCH_14B.num_params()
    gpu = estimate(FINCH_14B, 8, 2, True, 1, 4096, 0)
    opt = estimate(FINCH_14B, 8, 2, True, 1, 4096, 0, offload="optimizer")
    wts = estimate(FINCH_14B, 8, 3, True, 1, 4096, 0, offload="params")
    assert gpu.host == 0 and opt.optimizer == opt.gradients == 0 and opt.host == 16 * p / 8
    assert opt.weights == gpu.weights and opt.activations == gpu.activations
    assert (
        wts.host == 18 * p / 8 and wts.weights < estimate(FINCH_14B, 8, 3, True, 1, 4096, 0).weights
    )
    with pytest.raises(ValueError, match="offload='params' with ZeRO-2"):
        estimate(FINCH_14B, 8, 2, True, 1, 4096, 0, offload="params")


def test_plan_offloads_only_when_nothing_else_fits(capsys: pytest.CaptureFixture) -> None:
    assert main(["model=finch_3b", "gpus=1", "gpu_mem_gb=24"]) == 0
    assert "proposed: deepspeed=zero2_offload model.grad_checkpoint=true" in capsys.readouterr().out
    assert main(["model=finch_3b", "gpus=1", "gpu_mem_gb=24", "offload=false"]) == 1
    assert "REFUSED" in capsys.readouterr().out
    assert main(["model=finch_3b", "gpus=1", "gpu_mem_gb=24", "host_mem_gb=32"]) == 1
    assert "GB of host memory per node (1 GPUs) > host_mem_gb=32" in capsys.readouterr().out
    assert main(["model=finch_14b", "gpus=8", "gpu_mem_gb=80"]) == 0
    assert "proposed: deepspeed=zero2 " in capsys.readouterr().out  # fits without: no offload


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("gpus=0", "gpus: must be a whole number >= 1, not 0"),
        ("gpus=abc", "gpus: must be a whole number >= 1, not 'abc'"),
        ("mfu=0", "mfu: must be a number > 0 and <= 1, not 0"),
        ("mfu=2", "mfu: must be a number > 0 and <= 1, not 2"),
        ("ctx_len=0", "ctx_len: must be a whole number >= 1, not 0"),
        ("micro_batch_size=0", "micro_batch_size: must be a whole number >= 1, not 0"),
        ("segment_len=8192", "segment_len: must be a whole number >= 0 and <= 4096, not 8192"),
        ("zero_stage=4", "zero_stage: must be 1, 2, 3 or null, not 4"),
        ("offload=true zero_stage=1", "offload=true needs zero_stage 2 or 3"),
        ("global_batch_tokens=1000", "global_batch_tokens: must be a whole number >= 32768"),
    ],
)
def test_plan_names_a_setting_no_job_has(
    override: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["model=finch_3b", "gpus=8", "ctx_len=4096", *override.split()]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"plan: {message}") and out.out == ""


def test_throughput_counts_the_recomputed_forward(capsys: pytest.CaptureFixture) -> None:
    """Gradient checkpointing, like segments, runs each forward again: 4 forwards' work for the
    3 that model FLOPs count, so 3/4 of the tokens/s at the same MFU."""
    rates = []
    for ckpt in ("false", "true"):
        assert main(["model=finch_1.6b", "gpus=8", f"grad_checkpoint={ckpt}"]) == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if "throughput" in ln)
        rates.append(float(line.split("K tokens/s per GPU")[0].rsplit(" ", 1)[1]))
    assert "with checkpointing (each recomputes the forward: x0.75)" in line
    assert rates[1] == pytest.approx(0.75 * rates[0], abs=0.1)
