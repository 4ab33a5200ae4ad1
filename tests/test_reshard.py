"""Resuming a two-rank ZeRO checkpoint on another rank count, ZeRO stage or strategy
(rwkv_train/reshard.py), and a single-file checkpoint under ZeRO: the optimizer state
carries over and the losses are the uninterrupted run's.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import (
    EVERY,
    SAME,
    SMALL_BUCKETS,
    STEPS,
    command,
    drop_checkpoint,
    history,
    launch,
    saved_optimizer,
)
from train_utils import train_overrides

from rwkv_train.checkpoint import find_latest, resume_form
from rwkv_train.config import OptimConfig
from rwkv_train.metrics import read_metrics
from rwkv_train.reshard import STAGE12, universal_from_single, universal_path
from rwkv_train.train import compose_config, train

pytestmark = pytest.mark.slow


def test_partial_zero_checkpoint_skipped_and_world_size_change_detected(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    src = zero_runs["zero3"] / "checkpoints"
    folder = tmp_path / "checkpoints"
    shutil.copytree(src, folder)
    newest = find_latest(folder)
    assert newest is not None and newest.name == f"step{STEPS:08d}.ckpt"
    newest.with_suffix(".json").unlink()  # copied without its record: the shards still tell
    assert resume_form(newest, 2, 3) is None
    assert resume_form(newest, 1, 3) == "universal"  # another rank count: to be resharded
    assert resume_form(newest, 2, 2) == "universal"  # another stage
    zero2 = find_latest(zero_runs["zero2"] / "checkpoints")
    assert zero2 is not None
    assert resume_form(zero2, 2, 3) == "universal"
    assert resume_form(zero2, 2, 1) is None  # stages 1 and 2 share a layout
    assert resume_form(newest, 2, 0) == "single"  # deepspeed=none
    next(newest.rglob("zero_pp_rank_1_*optim_states.pt")).unlink()  # rank 1 never finished
    assert find_latest(folder) == folder / f"step{2 * EVERY:08d}.ckpt"


@pytest.mark.parametrize(
    ("source_stage", "stage", "step"), [(2, 2, 2), (3, 3, 2 * EVERY), (2, 3, 2), (3, 2, 2 * EVERY)]
)
def test_resume_on_one_rank_from_two_rank_zero_checkpoint(
    zero_runs: dict[str, Path], tmp_path: Path, source_stage: int, stage: int, step: int
) -> None:
    """A ZeRO checkpoint of 2 ranks continues on 1 (same global batch, accumulating 2), under
    its own ZeRO stage or across stage 3 and 2: the trainer builds its universal form once
    and the run goes on with the optimizer state, matching the uninterrupted 2-rank run
    (fp32, up to reduction order). Each parameter group keeps its own settings and Adam its
    step count (DeepSpeed's ZeRO-3 loader gives every group group 0's settings and one
    shared step tensor, which then advanced once per group)."""
    source = zero_runs[f"zero{source_stage}"]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    name = f"step{step:08d}"
    shutil.copytree(
        source / "checkpoints" / f"{name}.ckpt", run_dir / "checkpoints" / f"{name}.ckpt"
    )
    shutil.copy(source / "checkpoints" / f"{name}.json", run_dir / "checkpoints")
    max_steps = 4 if source_stage == 2 else STEPS
    overrides = train_overrides(
        zero_runs["data"], run_dir, *SAME, *SMALL_BUCKETS, "trainer.devices=1",
        f"deepspeed=zero{stage}", f"trainer.max_steps={max_steps}", "checkpoint.every_n_steps=100",
    )  # fmt: skip
    done = launch([sys.executable, "-m", "rwkv_train.train", *overrides], zero_runs["root"])
    assert "was written by another rank count or strategy" in done.stdout + done.stderr
    universal = run_dir / "checkpoints" / f"{name}.ckpt.universal"
    assert (universal / "latest_universal").is_file()
    # a ZeRO-3 source's per-parameter files are rewritten only for a run under ZeRO-1/2
    assert (universal / STAGE12).is_file() == (source_stage != 3 or stage != 3)
    want = [(s, loss) for s, loss in history(source) if s > step]
    got = history(run_dir)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(step + 1, max_steps + 1))
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)
    final = find_latest(run_dir / "checkpoints")
    assert final is not None and final.name == f"step{max_steps:08d}.ckpt"
    assert resume_form(final, 1, stage) is None  # written by this 1-rank run
    groups, steps = saved_optimizer(final)
    assert groups[1::4] == [1.0, 2.0]  # lr_mult: the time_decay group at 2x
    assert groups == pytest.approx(saved_optimizer(source / "checkpoints" / final.name)[0])
    assert steps and set(steps) == {max_steps}


def test_resume_on_one_rank_from_an_odd_step_keeps_the_step_boundaries(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    """Two ranks take one micro-batch per step, one rank takes two. Resumed at step 3, the
    one-rank run must end its next step after two micro-batches (counted in its own
    accumulation, not the checkpoint's): step 4 gets the two-rank run's loss."""
    run_dir = tmp_path / "odd"
    launch(
        command(zero_runs["data"], run_dir, "deepspeed=zero2", "trainer.max_steps=4",
                "checkpoint.every_n_steps=1"),
        zero_runs["root"],
    )  # fmt: skip
    drop_checkpoint(run_dir, 4)
    cmd = command(
        zero_runs["data"], run_dir, "deepspeed=zero2", "trainer.max_steps=4",
        "checkpoint.every_n_steps=1", "trainer.devices=1",
    )  # fmt: skip
    done = launch(cmd, zero_runs["root"])
    assert "(step 3)" in done.stdout + done.stderr
    got, want = history(run_dir), history(zero_runs["zero2"])
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    assert got[3][1] == pytest.approx(want[3][1], abs=1e-5)


def test_resume_on_one_rank_with_another_global_batch(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    """The two-rank run's step-2 checkpoint (4 samples read) continued on one rank with a
    global batch of 3: steps 3 and 4 read samples 4-9, in order, and count their tokens."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for suffix in (".ckpt", ".json"):
        src = zero_runs["zero2"] / "checkpoints" / f"step00000002{suffix}"
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run_dir / "checkpoints" / src.name)
    overrides = train_overrides(
        zero_runs["data"], run_dir, *SAME, *SMALL_BUCKETS, "trainer.devices=1", "deepspeed=zero2",
        "data.global_batch_size=3", "trainer.max_steps=4", "data.record_sample_ids=true",
    )  # fmt: skip
    launch([sys.executable, "-m", "rwkv_train.train", *overrides], zero_runs["root"])
    ids = (run_dir / "sample_ids" / "rank0.txt").read_text().split()
    assert [int(i) for i in ids] == list(range(4, 10))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["train/tokens_seen"] for r in rows if "train/loss" in r] == [112, 160]  # 4+3, +3


def test_reshard_command_converts_a_checkpoint_saved_without_the_universal_key(
    zero_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m rwkv_train.reshard CKPT` ahead of a resubmission, on a checkpoint from
    before the universal key was saved (added to the converted copy; the original stays)."""
    from rwkv_train.reshard import INFO_KEY, main

    run_dir = tmp_path / "run"
    shutil.copytree(zero_runs["zero2"] / "checkpoints", run_dir / "checkpoints")
    ckpt = find_latest(run_dir / "checkpoints")
    assert ckpt is not None
    states = next(ckpt.rglob("mp_rank_00_model_states.pt"))
    sd = torch.load(states, weights_only=False)
    del sd[INFO_KEY]
    torch.save(sd, states)
    record = ckpt.with_suffix(".json")  # as a checkpoint of that version would have it
    sizes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    record.write_text(json.dumps({**json.loads(record.read_text()), "bytes": sizes}))
    assert main([str(ckpt)]) == 0
    out = Path(capsys.readouterr().out.split("reshard: ")[-1].strip())
    assert out == ckpt.with_name(ckpt.name + ".universal")
    tag = (ckpt / "latest").read_text().strip()
    assert (out / "latest_universal").read_text() == tag
    assert (out / tag / "zero" / "net.head.weight" / "exp_avg.pt").is_file()
    assert INFO_KEY not in torch.load(states, weights_only=False)  # the original is untouched
    assert main([str(tmp_path / "nowhere")]) == 1
    shutil.rmtree(out)
    next(ckpt.rglob("*zero_pp_rank_1_*optim_states.pt")).unlink()  # a partition lost
    assert main([str(ckpt)]) == 1
    assert "size differs from the completion record" in capsys.readouterr().err
    assert not out.exists()  # no universal form made of what is left


def test_offload_can_be_turned_on_and_off_on_resume(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    """A run moved to fewer GPUs turns offload on, one moved to more turns it off: the Adam
    state that torch's AdamW saved continues in DeepSpeed's CPU Adam (same rank count), and
    the CPU Adam's continues in AdamW on one rank (through the universal form), each giving
    the losses of the run that never switched."""

    def resume(name: str, source: Path, *extra: str) -> list[tuple[int, float]]:
        run_dir = tmp_path / name
        shutil.copytree(source, run_dir)
        cmd = command(
            zero_runs["data"], run_dir, "trainer.max_steps=6", "checkpoint.every_n_steps=1"
        )
        launch([*cmd, *extra], zero_runs["root"])
        return history(run_dir)

    same = resume("same", zero_runs["zero2"], "deepspeed=zero2")
    on = resume("on", zero_runs["zero2"], "deepspeed=zero2_offload")
    drop_checkpoint(tmp_path / "on", 6)
    off = resume("off", tmp_path / "on", "deepspeed=zero2", "trainer.devices=1")
    assert [s for s, _ in same] == [s for s, _ in on] == [s for s, _ in off] == list(range(1, 7))
    for (s, a), (_, b), (_, c) in zip(same[4:], on[4:], off[4:], strict=True):
        assert b == pytest.approx(a, rel=1e-6) and c == pytest.approx(a, rel=1e-6), (s, a, b, c)


def test_other_ranks_stop_when_rank_zero_cannot_convert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed conversion on rank 0 must not leave the other ranks waiting for an hour."""
    from rwkv_train import reshard

    ckpt = tmp_path / "step00000002.ckpt"
    ckpt.mkdir()  # no `latest`: not a DeepSpeed checkpoint, so rank 0's conversion fails
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="no 'latest' file"):
        reshard.ensure_loadable(ckpt, "universal")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match=r"rank 0 could not convert .*no 'latest' file"):
        reshard.ensure_loadable(ckpt, "universal", timeout_s=30)


@pytest.mark.parametrize("config", ["zero3", "zero2_offload"])
def test_ddp_checkpoint_continues_under_zero_with_its_optimizer_state(
    zero_runs: dict[str, Path], tmp_path: Path, config: str
) -> None:
    """A single-file checkpoint (deepspeed=none, one process) resumed under ZeRO-3, or
    ZeRO-2 with DeepSpeed's CPU Adam on offloaded state, on two ranks goes through a
    universal form built from it: AdamW's numbered states get their names from the rebuilt
    parameter groups (three, with weight decay on). Steps 3-4 repeat the uninterrupted run's
    losses and Adam's step count carries on."""
    run_dir = tmp_path / "ddp"
    extra = ("optim.weight_decay=0.1", "trainer.max_steps=4", "checkpoint.every_n_steps=2")
    overrides = train_overrides(zero_runs["data"], run_dir, *SAME, *extra)
    train(compose_config(overrides))
    want = history(run_dir)
    drop_checkpoint(run_dir, 4)
    done = launch(
        command(zero_runs["data"], run_dir, *extra, f"deepspeed={config}"), zero_runs["root"]
    )
    log = done.stdout + done.stderr
    assert "was written by another rank count or strategy" in log and "(step 2)" in log
    got = history(run_dir)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(got[2:], want[2:], strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)
    groups, steps = saved_optimizer(run_dir / "checkpoints" / "step00000004.ckpt")
    assert groups[2::4] == [0.0, 0.1, 0.0]  # weight decay on the matrices' group only
    assert steps and set(steps) == {4}
    if config != "zero3":
        return
    # groups that cannot be matched to the saved ones (optim.lr_mult changed) are refused
    ckpt = run_dir / "checkpoints" / "step00000002.ckpt"
    shutil.rmtree(universal_path(ckpt))
    with pytest.raises(ValueError, match="resume with the settings it was written with"):
        universal_from_single(ckpt, OptimConfig(lr_mult={}))


def test_zero3_checkpoint_continues_without_deepspeed(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    """deepspeed=none resuming a two-rank ZeRO-3 checkpoint loads a single file built from
    its universal form: weights, AdamW states in this run's group order, Lightning's loops.
    Steps 7-8 repeat the ZeRO-3 run's losses."""
    run_dir = tmp_path / "none"
    (run_dir / "checkpoints").mkdir(parents=True)
    name = f"step{2 * EVERY:08d}"
    source = zero_runs["zero3"] / "checkpoints"
    shutil.copytree(source / f"{name}.ckpt", run_dir / "checkpoints" / f"{name}.ckpt")
    shutil.copy(source / f"{name}.json", run_dir / "checkpoints")
    overrides = train_overrides(
        zero_runs["data"],
        run_dir,
        *SAME,
        f"trainer.max_steps={STEPS}",
        "checkpoint.every_n_steps=100",
    )
    module = train(compose_config(overrides))
    assert (run_dir / "checkpoints" / f"{name}.ckpt.single").is_file()
    got, want = history(run_dir), [(s, v) for s, v in history(zero_runs["zero3"]) if s > 2 * EVERY]
    assert [s for s, _ in got] == [s for s, _ in want] == [7, 8]
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)
    steps = {float(st["step"]) for st in module._optimizer.state.values()}
    assert steps == {float(STEPS)}
