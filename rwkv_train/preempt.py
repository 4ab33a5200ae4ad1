"""Pre-emption under Slurm: save a checkpoint on a warning signal, stop, and let the job requeue.

One mechanism, ours, not Lightning's. Lightning's SLURM auto-requeue saves an `hpc_ckpt_*.ckpt`
that `resume=auto` does not look for and requeues from inside a rank, so it is turned off
(`SLURMEnvironment(auto_requeue=False)`, see `slurm_plugins`). Instead:

1. `slurm/train.sbatch` asks for `--signal=B:USR1@LEAD` (LEAD from `python -m rwkv_train.plan`,
   the checkpoint's write time) and forwards the signal it receives to `srun`, which passes it
   to every rank.
2. `PreemptionCallback` only sets a flag in the signal handler. After every optimizer step the
   ranks all-reduce that flag, so they agree on one stop step even when the signal reaches them
   during different steps; a ZeRO checkpoint needs every rank to write its partition of the
   same step. Then it saves through the run's `CheckpointManager` (atomic, found by
   `resume=auto`) and stops the trainer.
3. The trainer exits with `REQUEUE_EXIT` (`Preempted`); the batch script sees that code and
   runs `scontrol requeue`. The requeued job reruns the same command, so the run folder, the
   newest checkpoint and the W&B id in it are the same: it continues where it stopped.

`python -m rwkv_train.preempt OVERRIDES...` prints the run folder those overrides train in and
records the job there (`jobs/<job id>.<restart>/`: resolved config, git commit); the batch
script calls it before `srun` so its logs go into the run folder.
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

import lightning as L
from omegaconf import OmegaConf

from rwkv_train.checkpoint import CheckpointManager

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later"; the batch script requeues on it


class Preempted(SystemExit):
    """Raised after fitting when training stopped for pre-emption: exits the process with
    `REQUEUE_EXIT` and no traceback, so the batch script knows to requeue, not to give up."""

    def __init__(self, step: int) -> None:
        super().__init__(REQUEUE_EXIT)
        self.step = step

    def __str__(self) -> str:
        return f"pre-empted: checkpoint saved at step {self.step}, exit {REQUEUE_EXIT} to requeue"


class PreemptionCallback(L.Callback):
    """Turns `signum` into a checkpoint and a clean stop at a step every rank agrees on."""

    def __init__(self, manager: CheckpointManager, signum: int = signal.SIGUSR1) -> None:
        self.manager = manager
        self.signum = signum
        self.requested = False  # set by the signal handler on this rank
        self.stopped_at: int | None = None  # the step saved before stopping, on every rank
        self._previous: object = None
        self._seen_step = -1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: saving inside a handler could interrupt a collective half-way.
        self.requested = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():  # Python allows no other
            self._previous = signal.signal(self.signum, self._handle)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # inside gradient accumulation: no optimizer step yet
            return
        self._seen_step = step
        # any rank's flag stops all of them, at this same step (one small all-reduce per step)
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            if self.manager._last_saved != step:
                self.manager.save(trainer)
            self.stopped_at = step
            trainer.should_stop = True


def slurm_plugins() -> list:
    """Lightning's Slurm environment without its auto-requeue when running under srun (it
    would save checkpoints that `resume=auto` ignores and requeue a second time), else none."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def git_commit(repo: Path) -> str:
    """`git rev-parse HEAD` of the checkout the code runs from (`unknown` outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def record_job(overrides: list[str]) -> Path:
    """Create the run folder of `overrides` and record this Slurm job in it: the resolved
    config and the git commit, in `jobs/<job id>.<restart count>/` so a requeue keeps the
    record of the attempt before it. Returns the run folder."""
    from rwkv_train.train import compose_config

    cfg = compose_config(overrides)
    run_dir = Path(cfg.run_dir)
    job = f"{os.environ.get('SLURM_JOB_ID', 'local')}.{os.environ.get('SLURM_RESTART_COUNT', 0)}"
    folder = run_dir / "jobs" / job
    folder.mkdir(parents=True, exist_ok=True)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(job_cfg, resolve=True))
    (folder / "overrides.txt").write_text("\n".join(overrides) + "\n")
    (folder / "git_commit.txt").write_text(git_commit(Path(__file__).resolve().parent) + "\n")
    return run_dir


if __name__ == "__main__":
    print(record_job(sys.argv[1:]))
