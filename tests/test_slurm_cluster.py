"""The Slurm scripts on a real one-node Slurm cluster (Debian's slurmctld, slurmd, munge).

`slurm/testing/start_cluster.sh` starts the cluster in a temporary folder for this module and
`stop_cluster.sh` stops it by PID. Without the Slurm binaries or root the tests skip, and fail
instead under REQUIRE_SLURM=1 (CI). There is no accounting, so job states come from scontrol;
every wait has a timeout so a dead job cannot hang the suite. submitit's `sacct` calls fail
for the same reason: it logs "Bypassing sacct error" and learns that a job is done from the
result pickle the job writes, enough for jobs that finish (the sweep test watches scontrol
for the ones that die).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import skip_unless_required
from omegaconf import OmegaConf
from train_utils import tiny_data, train_overrides

from rwkv_train.checkpoint import checkpoint_step, find_latest
from rwkv_train.metrics import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TESTING = ROOT / "slurm" / "testing"
# two tasks of one CPU each on the two-CPU test node; no GPUs
SMALL_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
ENDED_BADLY = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a client of a freshly started cluster."""
    missing = [b for b in ("slurmctld", "slurmd", "munged") if not Path("/usr/sbin", b).exists()]
    if missing or shutil.which("sbatch") is None:
        skip_unless_required("REQUIRE_SLURM", f"Slurm is not installed (missing {missing})")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    start = subprocess.run(
        [*prefix, "env", f"SLURMCTLD_PORT={env['SLURMCTLD_PORT']}",
         f"SLURMD_PORT={env['SLURMD_PORT']}", str(TESTING / "start_cluster.sh"), str(state)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        if start.returncode != 0:
            skip_unless_required("REQUIRE_SLURM", f"Slurm did not start: {start.stderr[-2000:]}")
        yield {
            **env,
            "SLURM_CONF": str(state / "slurm.conf"),
            "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "offline",
        }
    finally:
        subprocess.run([*prefix, str(TESTING / "stop_cluster.sh"), str(state)], timeout=60)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data"))


def sbatch(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for(env: dict[str, str], job: str, states: set[str], timeout: float) -> dict[str, str]:
    """The job's record once its state is one of `states`; fails after `timeout` seconds or
    when it ends in another state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in states:
            return info
        if info.get("JobState") in ENDED_BADLY:
            pytest.fail(f"job {job} ended {info.get('JobState')}: {info}")
        time.sleep(0.5)
    pytest.fail(f"job {job} not {states} after {timeout} s: {job_info(env, job)}")


def steps(run_dir: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    except (FileNotFoundError, ValueError):
        return []


def wait_for_steps(env: dict[str, str], job: str, run_dir: Path, n: int) -> None:
    """Until the running job has logged `n` steps (fails if it stops or takes 2 minutes)."""
    wait_for(env, job, {"RUNNING"}, timeout=60)
    deadline = time.monotonic() + 120
    while not steps(run_dir) or max(steps(run_dir)) < n:
        info = job_info(env, job)
        assert time.monotonic() < deadline and info["JobState"] == "RUNNING", info
        time.sleep(0.2)


def train_job(data: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = train_overrides(
        data, run_dir, "data.micro_batch_size=1", "data.val_samples=0", *extra
    )
    out = str(run_dir.parent / "slurm-%j.out")
    return [*SMALL_JOB, "--time=10", f"--output={out}", "slurm/train.sbatch", *overrides]


def test_train_sbatch_completes_with_two_tasks(
    cluster: dict[str, str], data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = sbatch(cluster, *train_job(data, run_dir, "trainer.max_steps=3"))
    wait_for(cluster, job, {"COMPLETED"}, timeout=180)
    assert checkpoint_step(find_latest(run_dir / "checkpoints")) == 3
    log = (run_dir / "jobs" / f"{job}.0" / "train.log").read_text()
    assert "0: " in log and "1: " in log  # both ranks wrote (srun --label)


def test_preempted_job_requeues_and_resumes_in_the_same_run(
    cluster: dict[str, str], data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    max_steps = 60
    job = sbatch(
        cluster, *train_job(data, run_dir, f"trainer.max_steps={max_steps}", "logger=wandb")
    )
    wait_for_steps(cluster, job, run_dir, 2)
    wandb_id = (run_dir / "wandb_id.txt").read_text()
    # what --signal=B:USR1@LEAD does LEAD seconds before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    info = wait_for(cluster, job, {"COMPLETED"}, timeout=240)
    assert info["Restarts"] == "1"
    first = (run_dir / "jobs" / f"{job}.0" / "train.log").read_text()
    second = (run_dir / "jobs" / f"{job}.1" / "train.log").read_text()
    saved = int(first.rsplit("(step ", 1)[1].split(",")[0])  # the last checkpoint it saved
    assert 2 <= saved < max_steps and "resuming from" in second and f"(step {saved})" in second
    assert steps(run_dir) == list(range(1, max_steps + 1))  # no step lost or repeated
    assert (run_dir / "wandb_id.txt").read_text() == wandb_id


def test_cancelled_job_saves_its_step_and_is_not_requeued(
    cluster: dict[str, str], data: Path, tmp_path: Path
) -> None:
    """`scancel JOB`: Slurm sends SIGTERM to every process of the job and SIGKILL after
    KillWait (30 s). Both ranks save one checkpoint at a step they agree on and exit 143;
    the batch script does not requeue a cancelled job."""
    run_dir = tmp_path / "run"
    job = sbatch(cluster, *train_job(data, run_dir, "trainer.max_steps=400"))
    wait_for_steps(cluster, job, run_dir, 2)
    subprocess.run(["scancel", job], env=cluster, check=True)
    log = run_dir / "jobs" / f"{job}.0" / "train.log"
    deadline = time.monotonic() + 60
    while log.read_text().count("terminated (SIGTERM): checkpoint saved at step") < 2:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    saved = checkpoint_step(find_latest(run_dir / "checkpoints"))
    assert 2 <= saved < 400 and max(steps(run_dir)) == saved
    said = re.findall(r"^(\d): .*checkpoint saved at step (\d+);", log.read_text(), re.M)
    assert sorted(said) == [("0", str(saved)), ("1", str(saved))]
    assert job_info(cluster, job)["Restarts"] == "0"


def test_data_prep_array_then_merge(cluster: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(f'{{"text": "document {i}: hello, world"}}\n' for i in range(60)))
    out = tmp_path / "prepared"
    env = {**cluster, "SBATCH_EXTRA": "--cpus-per-task=1", "SBATCH_TIMELIMIT": "10"}
    env["SBATCH_OUTPUT"] = str(tmp_path / "slurm-%j.out")
    done = subprocess.run(
        [str(ROOT / "slurm" / "prepare_data.sh"), str(out), "2", f"inputs=[{src}]",
         "progress=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    merge = done.stdout.split("merge + verify: ")[1].split()[0]
    wait_for(cluster, merge, {"COMPLETED"}, timeout=180)  # afterok: the array succeeded too
    assert (out / "manifest.json").exists()
    verify = subprocess.run([sys.executable, "-m", "data_prep.verify", str(out)], cwd=ROOT)
    assert verify.returncode == 0


def test_submitit_sweep_of_two_runs_completes(
    cluster: dict[str, str], data: Path, tmp_path: Path
) -> None:
    """The README's sweep command with the lr sweep, `-m +sweep=lr hydra/launcher=submitit_slurm
    hydra.launcher.partition=P`, shrunk to two tiny CPU runs: two tasks of one Slurm array job,
    each trains to the end in its own folder. Without sacct, submitit would wait forever for a
    job that dies before writing its result pickle (a cancelled or killed job), so the tasks'
    states are read from scontrol meanwhile and the sweep has a deadline."""
    max_steps = 3
    tiny = train_overrides(data, tmp_path / "unused", "data.val_samples=0")
    command = [
        sys.executable, "-m", "rwkv_train.train", "-m", "+sweep=lr",
        "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",  # start_cluster.sh's
        "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
        "trainer.devices=1", "deepspeed=none", f"trainer.max_steps={max_steps}",
        f"runs_root={tmp_path}", "optim.lr_init=1e-3,2e-3",
        *(o for o in tiny if not o.startswith("run_dir=")),
    ]  # fmt: skip
    sweep_dir = tmp_path / "sweeps" / "lr"
    log = tmp_path / "sweep.log"

    def tasks() -> list[str]:  # the array tasks submitit submitted: .submitit/<job>_<task>/
        folders = (sweep_dir / ".submitit").glob("*_*")
        return sorted(f.name for f in folders if f.name.replace("_", "").isdigit())

    def failure(what: str) -> str:
        logs = [f.read_text()[-1500:] for f in (sweep_dir / ".submitit").glob("*_*/*_log.*")]
        return "\n".join([what, log.read_text()[-3000:], *logs])

    with log.open("w") as out:
        sweep = subprocess.Popen(command, cwd=ROOT, env=cluster, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 240  # about 12 s when it works
        while sweep.poll() is None:
            for task in tasks():
                info = job_info(cluster, task)
                if info.get("JobState") in ENDED_BADLY:
                    pytest.fail(failure(f"array task {task} ended {info['JobState']}: {info}"))
            if time.monotonic() > deadline:
                pytest.fail(failure(f"the sweep did not end in 240 s; tasks {tasks()}"))
            time.sleep(0.5)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
            if tasks():
                subprocess.run(["scancel", *tasks()], env=cluster)
    assert sweep.returncode == 0, failure(f"the sweep exited with {sweep.returncode}")

    infos = [job_info(cluster, task) for task in tasks()]
    assert [i["JobState"] for i in infos] == ["COMPLETED", "COMPLETED"], infos
    assert len({i["ArrayJobId"] for i in infos}) == 1  # one array job of two tasks
    runs = sorted(p.parent for p in sweep_dir.glob("*/config.yaml"))
    lrs = [OmegaConf.load(run / "config.yaml").optim.lr_init for run in runs]
    assert sorted(lrs) == [1e-3, 2e-3]
    for run, lr in zip(runs, lrs, strict=True):
        assert f"optim.lr_init={lr}" in run.name.split(",")  # named by its overrides
        assert checkpoint_step(find_latest(run / "checkpoints")) == max_steps
        assert steps(run) == list(range(1, max_steps + 1))
