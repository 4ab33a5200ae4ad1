"""slurm/train.sbatch and the pre-emption path, without a Slurm cluster.

The batch script runs under bash with stand-ins for `srun` (runs the one task in place, with
the SLURM_* variables srun would set) and `scontrol` (prints the node name, records requeues),
so its rendezvous, job records, signal forwarding and requeue decision are tested on any
machine. The pre-emption callback itself is also tested in-process: a signal at one step
saves that step's checkpoint, stops with the requeue exit code, and a rerun resumes from it.
"""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from train_utils import compose_train, tiny_data, train_overrides

import rwkv_train.train as train_mod
from rwkv_train.checkpoint import checkpoint_step, find_latest
from rwkv_train.metrics import read_metrics
from rwkv_train.preempt import (
    INTERRUPTED_EXIT,
    REQUEUE_EXIT,
    TERMINATED_EXIT,
    Preempted,
    Terminated,
)

ROOT = Path(__file__).resolve().parents[1]
JOB_ID = "4242"

FAKE_SRUN = """#!/usr/bin/env bash
# one task, in place: drop srun's options, set what srun sets for the task
while [[ $1 == -* ]]; do shift; done
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show ]]; then echo localhost; else echo "$*" >>"$SCONTROL_LOG"; fi
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture()
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """The environment of a one-task batch job whose srun and scontrol are stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "rwkv-train",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS": "1",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def sbatch_command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = train_overrides(data, run_dir, "data.val_samples=0", *extra)
    return ["bash", str(ROOT / "slurm" / "train.sbatch"), *overrides]


def steps(run_dir: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    except (FileNotFoundError, ValueError):  # not written yet, or a line half-written
        return []


def test_sbatch_script_trains_and_records_the_job(
    data: Path, tmp_path: Path, fake_slurm: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(
        sbatch_command(data, run_dir, "trainer.max_steps=3"),
        env=fake_slurm,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = run_dir / "jobs" / f"{JOB_ID}.0"
    assert checkpoint_step(find_latest(run_dir / "checkpoints")) == 3
    assert "trainer:" in (job / "config.yaml").read_text()
    assert len((job / "git_commit.txt").read_text().strip()) in (40, 7)  # a sha, or "unknown"
    assert (job / "train.log").stat().st_size > 0
    assert not Path(fake_slurm["SCONTROL_LOG"]).exists()  # finished: no requeue
    assert "cpu_adam" not in done.stdout  # built only for the offload configs


def test_sbatch_script_builds_cpu_adam_for_an_offload_config(
    data: Path, tmp_path: Path, fake_slurm: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    cmd = sbatch_command(data, run_dir, "trainer.max_steps=2", "deepspeed=zero2_offload")
    done = subprocess.run(cmd, env=fake_slurm, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cpu_adam: ready in" in done.stdout
    assert checkpoint_step(find_latest(run_dir / "checkpoints")) == 2


def test_sbatch_script_requeues_on_the_signal_and_resumes(
    data: Path, tmp_path: Path, fake_slurm: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    cmd = sbatch_command(data, run_dir, "trainer.max_steps=400", "checkpoint.every_n_steps=1000")
    job = subprocess.Popen(cmd, env=fake_slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not steps(run_dir) or max(steps(run_dir)) < 2:
        assert job.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what Slurm sends the batch shell LEAD seconds early
    out = job.communicate(timeout=120)[0].decode()
    assert job.returncode == 0, out[-3000:]
    assert Path(fake_slurm["SCONTROL_LOG"]).read_text().split() == ["requeue", JOB_ID]
    saved = checkpoint_step(find_latest(run_dir / "checkpoints"))
    assert 2 <= saved < 400 and max(steps(run_dir)) == saved

    # the requeued job: same command, restart count 1, continues from the saved step
    env = {**fake_slurm, "SLURM_RESTART_COUNT": "1"}
    cmd[cmd.index("trainer.max_steps=400")] = f"trainer.max_steps={saved + 3}"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert steps(run_dir) == list(range(1, saved + 4))
    assert (run_dir / "jobs" / f"{JOB_ID}.1" / "train.log").exists()


class SignalAt(L.Callback):
    """Sends this process `signum` when the trainer reaches `step`, or with
    `in_validation` as the validation after that step starts."""

    def __init__(
        self, step: int, signum: int = signal.SIGUSR1, in_validation: bool = False, times: int = 1
    ) -> None:
        self.step, self.signum, self.in_validation = step, signum, in_validation
        self.times = times

    def _send(self, trainer: L.Trainer, in_validation: bool) -> None:
        if trainer.global_step == self.step and in_validation == self.in_validation:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self._send(trainer, in_validation=False)

    def on_validation_start(self, trainer: L.Trainer, *args: object) -> None:
        self._send(trainer, in_validation=True)


@pytest.mark.parametrize(
    ("signum", "stop_type", "code"),
    [
        (signal.SIGUSR1, Preempted, REQUEUE_EXIT),
        (signal.SIGTERM, Terminated, TERMINATED_EXIT),
        (signal.SIGINT, Terminated, INTERRUPTED_EXIT),
    ],
)
def test_signal_saves_that_step_and_exits_with_its_code(
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    stop_type: type[SystemExit],
    code: int,
) -> None:
    """SIGUSR1 (Slurm's warning) exits 75 for the batch script to requeue; SIGTERM (scancel,
    a pod eviction) exits 143; Ctrl-C exits 130. Lightning's own SIGTERM handler would end the
    fit at the next batch with exit code 0 and no checkpoint, and Ctrl-C with exit 1 and none.
    The stop spends no time on a validation (the one Lightning runs when a fit is stopped
    early) within the grace period."""
    build = train_mod.callbacks
    monkeypatch.setattr(train_mod, "callbacks", lambda *a: [SignalAt(3, signum), *build(*a)])
    run_dir = tmp_path / "run"
    overrides = train_overrides(data, run_dir, "trainer.max_steps=8")
    before = signal.getsignal(signum)
    with pytest.raises(stop_type) as stop:
        train_mod.train(compose_train(overrides))
    assert stop.value.code == code and stop.value.step == 3
    assert checkpoint_step(find_latest(run_dir / "checkpoints")) == 3
    assert not [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r]
    assert signal.getsignal(signum) is before  # handlers (ours, Lightning's) removed after fit

    monkeypatch.setattr(train_mod, "callbacks", build)
    train_mod.train(compose_train(overrides))
    assert steps(run_dir) == list(range(1, 9))


def test_a_second_ctrl_c_stops_at_once_without_saving(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The way out when a save is not wanted or takes too long: Python's KeyboardInterrupt,
    which Lightning turns into exit 1. Ctrl-C works as before once training has ended."""
    build = train_mod.callbacks
    twice = SignalAt(3, signal.SIGINT, times=2)
    monkeypatch.setattr(train_mod, "callbacks", lambda *a: [twice, *build(*a)])
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_mod.train(compose_train(train_overrides(data, run_dir, "trainer.max_steps=8")))
    assert stop.value.code == 1 and not isinstance(stop.value, Terminated)
    assert find_latest(run_dir / "checkpoints") is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_a_terminal_saves_despite_the_dataloader_workers(
    data: Path, tmp_path: Path
) -> None:
    """Ctrl-C reaches every process in the terminal's group, the DataLoader workers too; one
    that stopped would end training with an error before the save."""
    run_dir = tmp_path / "run"
    overrides = train_overrides(
        data, run_dir, "trainer.max_steps=400", "checkpoint.every_n_steps=1000",
        "data.val_samples=0", "data.num_workers=1", "data.global_batch_size=32",
    )  # fmt: skip
    job = subprocess.Popen(
        [sys.executable, "-m", "rwkv_train.train", *overrides],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group, as a terminal's foreground job has
    )
    deadline = time.monotonic() + 120
    while not steps(run_dir) or max(steps(run_dir)) < 2:
        assert job.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGINT)
    out = job.communicate(timeout=120)[0]
    assert job.returncode == INTERRUPTED_EXIT, out[-3000:]
    saved = checkpoint_step(find_latest(run_dir / "checkpoints"))
    assert 2 <= saved < 400 and max(steps(run_dir)) == saved
    assert "Ctrl-C: saving a checkpoint at the end of this step" in out
    assert f"interrupted (Ctrl-C): checkpoint saved at step {saved}" in out


def test_sigterm_during_validation_saves_that_step(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal that arrives during a validation is acted on as it ends: the step validated
    is saved, no further training step is taken first."""
    build = train_mod.callbacks
    signal_it = SignalAt(2, signal.SIGTERM, in_validation=True)
    monkeypatch.setattr(train_mod, "callbacks", lambda *a: [signal_it, *build(*a)])
    run_dir = tmp_path / "run"
    overrides = train_overrides(data, run_dir, "trainer.max_steps=8", "trainer.val_every_n_steps=2")
    with pytest.raises(Terminated) as stop:
        train_mod.train(compose_train(overrides))
    assert stop.value.step == 2 and steps(run_dir) == [1, 2]
    assert checkpoint_step(find_latest(run_dir / "checkpoints")) == 2


def test_sbatch_script_on_sigterm_saves_and_does_not_requeue(
    data: Path, tmp_path: Path, fake_slurm: dict[str, str]
) -> None:
    """scancel: Slurm sends SIGTERM to every process of the job (the batch shell, the ranks and
    their DataLoader workers). The rank finishes its optimizer step (two micro-batches here),
    saves it and exits 143; the script passes that on and does not requeue."""
    run_dir = tmp_path / "run"
    cmd = sbatch_command(
        data,
        run_dir,
        "trainer.max_steps=400",
        "checkpoint.every_n_steps=1000",
        "data.global_batch_size=4",
        "data.num_workers=1",
    )
    job = subprocess.Popen(
        cmd,
        env=fake_slurm,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not steps(run_dir) or max(steps(run_dir)) < 2:
        assert job.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)
    out = job.communicate(timeout=120)[0].decode()
    assert job.returncode == TERMINATED_EXIT, out[-3000:]
    assert not Path(fake_slurm["SCONTROL_LOG"]).exists()  # cancelled: no requeue
    saved = checkpoint_step(find_latest(run_dir / "checkpoints"))
    assert 2 <= saved < 400 and max(steps(run_dir)) == saved
    log = (run_dir / "jobs" / f"{JOB_ID}.0" / "train.log").read_text()
    assert f"checkpoint saved at step {saved}" in log, log[-3000:]


FAKE_SBATCH = """#!/usr/bin/env bash
# records its arguments, answers a job id as --parsable does
echo "$*" >>"$SBATCH_LOG"
echo "$(( 100 + $(wc -l <"$SBATCH_LOG") ))"
"""


def test_data_prep_array_parts_merge_and_verify(tmp_path: Path) -> None:
    """Two array tasks run by hand as Slurm would, then the merge + verify that
    prepare_data.sh submits after them, on a small jsonl corpus."""
    src = tmp_path / "corpus.jsonl"
    src.write_text(
        "".join(f'{{"text": "document {i} says hello to the world"}}\n' for i in range(40))
    )
    out = tmp_path / "prepared"
    env = {**os.environ, "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": str(ROOT)}
    for i in range(2):
        task = {**env, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "2"}
        cmd = ["bash", str(ROOT / "slurm" / "data_prep.sbatch"), str(out)]
        cmd += [f"inputs=[{src}]", "progress=false", "val_fraction=0"]
        done = subprocess.run(cmd, env=task, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["part_00000", "part_00001"]
    # Task 1 rerun alone (sbatch --array=1: an array of one task), after a kill before its
    # manifest: it resumes part 1 of 2, the count its part was started with.
    (out / "part_00001" / "manifest.json").unlink()
    alone = {**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "1"}
    done = subprocess.run(cmd, env=alone, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "part 1 of 2" in done.stdout, done.stderr[-2000:]
    fresh = [*cmd[:2], str(tmp_path / "fresh"), *cmd[3:]]  # no part to take the count from
    done = subprocess.run(fresh, env=alone, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "NUM_PARTS" in done.stderr

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(stat.S_IRWXU)
    log = tmp_path / "sbatch.log"
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "SBATCH_LOG": str(log)}
    submit = [str(ROOT / "slurm" / "prepare_data.sh"), str(out), "2", f"inputs=[{src}]"]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    array, merge = log.read_text().splitlines()
    assert array.startswith("--parsable --array=0-1 ") and array.endswith(f"{out} inputs=[{src}]")
    assert "--dependency=afterok:101" in merge
    wrapped = merge.split("--wrap=", 1)[1]
    done = subprocess.run(["bash", "-c", wrapped], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (out / "manifest.json").exists()


def test_lr_sweep_dry_run_with_submitit_local(data: Path, tmp_path: Path) -> None:
    """`-m +sweep=lr hydra/launcher=submitit_local`, shrunk to two tiny CPU jobs: the sweep
    config, the launcher and the trainer's multirun folders work together on one machine."""
    tiny = train_overrides(data, tmp_path / "unused", "data.val_samples=0", "trainer.max_steps=2")
    tiny = [o for o in tiny if not o.startswith("run_dir=")]
    cmd = [sys.executable, "-m", "rwkv_train.train", "-m", "+sweep=lr"]
    cmd += ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=1"]
    cmd += ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1"]
    cmd += ["trainer.devices=1", "deepspeed=none", f"runs_root={tmp_path}"]
    cmd += ["optim.lr_init=1e-3,2e-3", *tiny]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = sorted(
        p.parent.parent for p in (tmp_path / "sweeps" / "lr").glob("*/checkpoints/*.ckpt")
    )
    assert len(runs) == 2 and all(steps(r) == [1, 2] for r in runs), done.stdout[-3000:]
    # Rerun longer, with settings that do not change what is trained: the jobs resume in
    # their folders (whose names stay short enough for a file system).
    cmd = [*cmd, "trainer.max_steps=3", "checkpoint.keep_last=2", "trainer.log_every_n_steps=1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = [p for p in (tmp_path / "sweeps" / "lr").iterdir() if (p / "checkpoints").is_dir()]
    assert sorted(jobs) == runs
    assert all(steps(r) == [1, 2, 3] and len(r.name.encode()) <= 240 for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGUSR1, REQUEUE_EXIT), (signal.SIGTERM, TERMINATED_EXIT)]
)
def test_signal_to_one_rank_stops_both_at_one_zero_step(
    data: Path, tmp_path: Path, signum: int, code: int
) -> None:
    """Two ranks under ZeRO-2 (gloo): only rank 0 gets the signal, yet both stop at the same
    step after writing their partitions of one complete checkpoint, and exit with the code
    that requeues (SIGUSR1) or the one that does not (SIGTERM)."""
    from dist_utils import command, environment

    from rwkv_train.checkpoint import shard_ranks

    run_dir = tmp_path / "run"
    cmd = command(data, run_dir, "deepspeed=zero2", "trainer.max_steps=400")
    job = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150
    while not steps(run_dir) or max(steps(run_dir)) < 2:
        assert job.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    job.send_signal(signum)  # the launching process is rank 0; rank 1 is its child
    out = job.communicate(timeout=150)[0]
    assert job.returncode == code, out[-3000:]
    ckpt = find_latest(run_dir / "checkpoints")
    assert shard_ranks(ckpt) == {0, 1} and checkpoint_step(ckpt) == max(steps(run_dir)) < 400
