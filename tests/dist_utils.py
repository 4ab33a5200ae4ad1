"""Helpers for the two-process tests (test_distributed.py, test_reshard.py): each run is
`python -m rwkv_train.train ... trainer.devices=2 deepspeed=zeroN` in a subprocess
(Lightning's launcher starts rank 1 by re-running that command line), with one intra-op
thread per rank and a free MASTER_PORT, as on a GPU node but over gloo.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from train_utils import tiny_data, train_overrides

from rwkv_train.metrics import read_metrics

EVERY, STEPS = 3, 8  # ZeRO-3 run: checkpoints at 3, 6 and 8
# 3 val samples: rank 1 evaluates one and a repeat that counts nowhere
SAME = ["data.micro_batch_size=1", "data.global_batch_size=2", "data.val_samples=3"]
# buckets sized for a tiny model: 2e8-element buckets cost seconds per step on a CPU
SMALL_BUCKETS = ["deepspeed.reduce_bucket_size=2e6", "deepspeed.allgather_bucket_size=2e6"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = train_overrides(data, run_dir, *SAME, "trainer.devices=2", *extra, *SMALL_BUCKETS)
    return [sys.executable, "-m", "rwkv_train.train", *overrides]


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }


def launch(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def zero3_command(data: Path, run_dir: Path) -> list[str]:
    return command(
        data,
        run_dir,
        "deepspeed=zero3",
        f"trainer.max_steps={STEPS}",
        f"checkpoint.every_n_steps={EVERY}",
        "data.record_sample_ids=true",
    )


def history(run_dir: Path) -> list[tuple[int, float]]:
    try:
        records = read_metrics(run_dir / "metrics.jsonl")
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
        return []
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def saved_optimizer(ckpt: Path) -> tuple[list[float], list[float]]:
    """From rank 0's ZeRO partition file: lr, lr_mult, weight_decay, initial_lr of each
    parameter group, and the Adam step of every state."""
    (path,) = ckpt.rglob("*zero_pp_rank_0_*optim_states.pt")
    groups, steps = [], []

    def walk(d: object) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                if k == "param_groups":
                    groups.extend(v)
                elif k == "state" and all(isinstance(x, dict) and "step" in x for x in v.values()):
                    steps.extend(float(x["step"]) for x in v.values())
                else:
                    walk(v)

    walk(torch.load(path, map_location="cpu", weights_only=False))
    return [g[k] for g in groups for k in ("lr", "lr_mult", "weight_decay", "initial_lr")], steps


def drop_checkpoint(run_dir: Path, step: int) -> None:
    """Delete the checkpoint of `step` (folder and record), so a rerun resumes before it."""
    path = run_dir / "checkpoints" / f"step{step:08d}"
    ckpt = path.with_suffix(".ckpt")
    shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    path.with_suffix(".json").unlink()


def make_runs(root: Path) -> dict[str, Path]:
    """The runs many tests compare with: ZeRO-2 for 4 steps (checkpoints at 2 and 4) and
    ZeRO-3 for STEPS (checkpoints every EVERY), both on two ranks recording sample ids."""
    data = tiny_data(root / "data")
    zero2, zero3 = root / "zero2", root / "zero3"
    launch(
        command(
            data,
            zero2,
            "deepspeed=zero2",
            "trainer.max_steps=4",
            "checkpoint.every_n_steps=2",
            "data.record_sample_ids=true",
        ),
        root,
    )
    launch(zero3_command(data, zero3), root)
    return {"root": root, "data": data, "zero2": zero2, "zero3": zero3}
