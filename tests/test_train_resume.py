"""Kill a training process with SIGKILL between two checkpoints, restart the same command:
the run ends with the same weights and bitwise the same loss history as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_utils import tiny_data, train_overrides

from rwkv_train.export import load_checkpoint_weights
from rwkv_train.metrics import read_metrics

EVERY, STEPS = 5, 15


def command(data: Path, run_dir: Path) -> list[str]:
    overrides = train_overrides(
        data,
        run_dir,
        f"trainer.max_steps={STEPS}",
        f"checkpoint.every_n_steps={EVERY}",
        "data.val_samples=0",
        "optim.warmup_steps=3",
    )
    return [sys.executable, "-m", "rwkv_train.train", *overrides]


def history(run_dir: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["train/loss"])
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "train/loss" in r
    ]


def last_step(run_dir: Path) -> int:
    try:
        return max((s for s, _ in history(run_dir)), default=0)
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
        return 0


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume(tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "data")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(command(data, ref_dir), cwd=tmp_path, env=env, check=True, capture_output=True)

    proc = subprocess.Popen(
        command(data, run_dir),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while last_step(run_dir) <= EVERY + 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_step(run_dir)
    assert EVERY < killed_at < 2 * EVERY, f"killed at step {killed_at}, not between checkpoints"
    assert not (run_dir / "checkpoints" / f"step{2 * EVERY:08d}.ckpt").exists()

    again = subprocess.run(
        command(data, run_dir), cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    )
    assert f"(step {EVERY})" in again.stdout + again.stderr, "the log must say where it resumed"

    assert history(run_dir) == history(ref_dir)  # bitwise: float equality of every step
    final = f"step{STEPS:08d}.ckpt"
    a = load_checkpoint_weights(ref_dir / "checkpoints" / final)
    b = load_checkpoint_weights(run_dir / "checkpoints" / final)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
