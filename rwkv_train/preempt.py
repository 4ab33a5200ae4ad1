"""Pre-emption, termination and Ctrl-C: save a checkpoint on a signal, stop, say how to go on.

One mechanism, ours, not Lightning's. Lightning's SLURM auto-requeue saves an `hpc_ckpt_*.ckpt`
that `resume=auto` does not look for and requeues from inside a rank, so it is turned off
(`SLURMEnvironment(auto_requeue=False)`, see `slurm_plugins`); and Lightning's own SIGTERM
handler ends the fit at the next batch without a checkpoint and with exit code 0, so ours
replaces it for the length of the training loop. Three signals, two outcomes:

- SIGUSR1, the warning Slurm sends LEAD seconds before a time limit or pre-emption
  (`--signal=B:USR1@LEAD`, LEAD from `python -m rwkv_train.plan`, the checkpoint's write time):
  save, stop, exit `REQUEUE_EXIT` (`Preempted`); `slurm/train.sbatch` forwards the signal to
  `srun`, sees that code and runs `scontrol requeue`. The requeued job reruns the same command,
  so the run folder, the newest checkpoint and the W&B id in it are the same: it continues
  where it stopped.
- SIGTERM, what `scancel`, a time limit reached without the warning, or a Kubernetes-style
  pre-emption sends before killing: save if the grace period allows (Slurm's KillWait, 30 s by
  default), stop, exit `TERMINATED_EXIT` (`Terminated`), which nothing requeues; the same
  command run again resumes from that checkpoint.
- SIGINT, Ctrl-C in the terminal (every rank and DataLoader worker of a local launch gets it):
  the same, with exit 130, as a shell reports for Ctrl-C; a second Ctrl-C stops at once
  without saving (Python's KeyboardInterrupt). A process that started with SIGINT ignored (a
  `nohup` or `&` job of a script) keeps ignoring it.

`PreemptionCallback` only sets a flag in its signal handler. After every optimizer step (and
after every validation) the ranks all-reduce that flag, so they agree on one stop step even
when the signal reaches them during different steps, or reaches only one of them; a ZeRO
checkpoint needs every rank to write its partition of the same step. Then it saves through
the run's `CheckpointManager` (atomic, found by `resume=auto`) and stops the trainer. A
SIGTERM or SIGINT on any rank outranks a SIGUSR1: a cancelled job must not requeue itself.

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
TERMINATED_EXIT = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM death
INTERRUPTED_EXIT = 128 + signal.SIGINT  # 130, what a shell reports for Ctrl-C


class Preempted(SystemExit):
    """Raised after fitting when training stopped for pre-emption: exits the process with
    `REQUEUE_EXIT` and no traceback, so the batch script knows to requeue, not to give up."""

    def __init__(self, step: int) -> None:
        super().__init__(REQUEUE_EXIT)
        self.step = step

    def __str__(self) -> str:
        return f"pre-empted: checkpoint saved at step {self.step}, exit {REQUEUE_EXIT} to requeue"


class Terminated(SystemExit):
    """Raised after fitting when SIGTERM or Ctrl-C (SIGINT) stopped training: exits with the
    code a shell gives a process ended by that signal, so schedulers and scripts see a stop,
    not a success. `step` is the step saved, or None when the signal came before this process
    finished a step."""

    def __init__(self, step: int | None, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + signum)
        self.step = step
        self.signum = signum

    def __str__(self) -> str:
        what = "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else "terminated (SIGTERM)"
        if self.step is None:
            return f"{what} before a step was finished: nothing new to save"
        return f"{what}: checkpoint saved at step {self.step}; the same command resumes from it"


class PreemptionCallback(L.Callback):
    """Turns SIGUSR1, SIGTERM and SIGINT into a checkpoint and a clean stop at a step every
    rank agrees on; `stop()` then gives the exception that ends the process with the right
    code."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self.received: set[int] = set()  # the signals this rank got, set by the handler
        self.stopped_at: int | None = None  # the step saved before stopping, on every rank
        # SIGTERM or SIGINT if any rank got one (SIGTERM first), else None: a requeue
        self.stop_signal: int | None = None
        self._previous: dict[int, object] = {}
        self._seen_step = -1
        self._rank = 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: saving inside a handler could interrupt a collective half-way.
        if signum == signal.SIGINT:
            if signum in self.received:  # the second Ctrl-C: stop now, as Python would
                signal.default_int_handler(signum, frame)
            if self._rank == 0:
                print(
                    "\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
                    "(Ctrl-C again stops at once, without saving)",
                    file=sys.stderr,
                    flush=True,
                )
        self.received.add(signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():  # Python allows no other
            return
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
        signal.signal(signal.SIGUSR1, self._handle)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its SIGTERM handler after `setup`, just before the loop: replace it.
        # A SIGTERM it caught already ends the fit after the first batch (`SIGTERMException`).
        # Ctrl-C is ours only in the loop (before it, loading and setup simply stop), and not
        # where the process was started with it ignored.
        self._rank = trainer.global_rank
        if self._previous:
            signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.default_int_handler
                signal.signal(signal.SIGINT, self._handle)
        if trainer.received_sigterm:
            self.received.add(signal.SIGTERM)
        self._seen_step = trainer.global_step  # nothing new to save before the next step

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # inside gradient accumulation: no optimizer step yet
            return
        self._seen_step = step
        self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation follows an optimizer step: a signal that came during a long one is acted
        # on now, not one training step later.
        if trainer.state.fn == "fit":
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        # any rank's flag stops all of them, at this same step (one small all-reduce per step)
        if self.stopped_at is not None:
            return
        if trainer.strategy.reduce_boolean_decision(bool(self.received), all=False):
            for signum in (signal.SIGTERM, signal.SIGINT):
                if trainer.strategy.reduce_boolean_decision(signum in self.received, all=False):
                    self.stop_signal = signum
                    break
            if self.manager._last_saved != trainer.global_step:
                self.manager.save(trainer)
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
            # Lightning validates a fit stopped early before it ends: not in a grace period
            trainer.limit_val_batches = 0

    def stop(self) -> SystemExit | None:
        """The exit for a run this callback stopped (None if it ran to its end)."""
        if self.stopped_at is None:
            return None
        if self.stop_signal is None:
            return Preempted(self.stopped_at)
        return Terminated(self.stopped_at, self.stop_signal)


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
