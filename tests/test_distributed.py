"""Two-process training on the CPU: DeepSpeed ZeRO-2 and ZeRO-3 over gloo, as on a GPU node.

Each run is `python -m rwkv_train.train ... trainer.devices=2 deepspeed=zeroN` in a
subprocess (Lightning's launcher starts rank 1 by re-running that command line), with one
intra-op thread per rank and a free MASTER_PORT. The runs are shared by the tests below.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from train_utils import assert_matches_rwkv_package, tiny_data, train_overrides

from rwkv_train.checkpoint import find_latest, list_checkpoints, resume_form
from rwkv_train.config import OptimConfig
from rwkv_train.export import export, load_checkpoint_weights
from rwkv_train.metrics import read_metrics
from rwkv_train.reshard import STAGE12, universal_from_single, universal_path
from rwkv_train.train import compose_config, train

pytestmark = pytest.mark.slow

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
    """From rank 0's ZeRO partition file: lr, lr_mult, weight_decay of each parameter group,
    and the Adam step of every state."""
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
    return [g[k] for g in groups for k in ("lr", "lr_mult", "weight_decay")], steps


def drop_checkpoint(run_dir: Path, step: int) -> None:
    """Delete the checkpoint of `step` (folder and record), so a rerun resumes before it."""
    path = run_dir / "checkpoints" / f"step{step:08d}"
    ckpt = path.with_suffix(".ckpt")
    shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    path.with_suffix(".json").unlink()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
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


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_runs_write_rank_partitions_and_read_disjoint_samples(
    runs: dict[str, Path], name: str
) -> None:
    run_dir = runs[name]
    ckpt = find_latest(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.is_dir()
    shards = sorted(p.name for p in ckpt.rglob("zero_pp_rank_*"))
    assert any(s.startswith("zero_pp_rank_0_") for s in shards), shards
    assert any(s.startswith("zero_pp_rank_1_") for s in shards), shards
    if name == "zero3":  # parameters are partitioned too
        assert sum("model_states" in s for s in shards) == 2, shards

    ids = [
        [
            int(i)
            for ln in (run_dir / "sample_ids" / f"rank{r}.txt").read_text().split("\n")
            for i in ln.split()
        ]
        for r in (0, 1)
    ]
    steps = max(s for s, _ in history(run_dir))
    assert not set(ids[0]) & set(ids[1])
    # one sample per rank per step (micro 1, global 2): together every index, none twice
    assert sorted(ids[0][:steps] + ids[1][:steps]) == list(range(2 * steps))
    assert [s for s, _ in history(run_dir)] == list(range(1, steps + 1))


def test_two_ranks_equal_one_rank_accumulating_two(runs: dict[str, Path]) -> None:
    """Same samples per step, gradients averaged over ranks instead of accumulated: fp32
    weights agree up to summation order (atol 1e-5 after 4 AdamW steps of the tiny model)."""
    one = runs["root"] / "one_rank"
    overrides = train_overrides(
        runs["data"], one, *SAME, "trainer.max_steps=4", "checkpoint.every_n_steps=2"
    )
    module = train(compose_config(overrides))
    assert module.accumulate == 2
    ours = load_checkpoint_weights(runs["zero2"] / "checkpoints" / "step00000004.ckpt")
    ref = module.net.state_dict()
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert torch.allclose(ours[k], v, rtol=0, atol=1e-5), (k, (ours[k] - v).abs().max())
    one_loss = [loss for _, loss in history(one)]
    two_loss = [loss for _, loss in history(runs["zero2"])]
    assert one_loss == pytest.approx(two_loss, abs=1e-5)
    # validation split over the ranks (one padded) gives the one-rank figure
    val = [
        [(r["step"], r["val/loss"]) for r in read_metrics(d / "metrics.jsonl") if "val/loss" in r]
        for d in (one, runs["zero2"])
    ]
    assert [s for s, _ in val[0]] == [4] and [s for s, _ in val[1]] == [4]
    assert val[1][0][1] == pytest.approx(val[0][0][1], abs=1e-5)


def test_sigkill_after_checkpoint_then_resume_zero3(runs: dict[str, Path]) -> None:
    run_dir = runs["root"] / "killed"
    proc = subprocess.Popen(
        zero3_command(runs["data"], run_dir),
        cwd=runs["root"],
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # both ranks in one process group, killed together
    )
    deadline = time.time() + 300
    while (
        max((s for s, _ in history(run_dir)), default=0) <= EVERY
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(s for s, _ in history(run_dir))
    assert EVERY < killed_at < 2 * EVERY, f"killed at step {killed_at}, not between checkpoints"
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [EVERY]

    again = launch(zero3_command(runs["data"], run_dir), runs["root"])
    assert f"(step {EVERY})" in again.stdout + again.stderr, "the log must say where it resumed"
    assert history(run_dir) == history(runs["zero3"])
    final = f"step{STEPS:08d}.ckpt"
    a = load_checkpoint_weights(runs["zero3"] / "checkpoints" / final)
    b = load_checkpoint_weights(run_dir / "checkpoints" / final)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nonfinite_loss_stops_every_rank(runs: dict[str, Path], tmp_path: Path) -> None:
    """A step cannot be skipped across ranks: all of them stop, with the message, no hang."""
    pth = export(runs["zero2"], tmp_path / "poisoned.pth")
    sd = torch.load(pth, weights_only=True)
    sd["head.weight"][0, 0] = float("nan")  # every logit row gets a NaN: the loss is NaN
    torch.save(sd, pth)
    cmd = command(
        runs["data"],
        tmp_path / "run",
        "deepspeed=zero2",
        "trainer.max_steps=4",
        f"model.init_from={pth}",
    )
    done = subprocess.run(
        cmd, cwd=runs["root"], env=environment(), capture_output=True, text=True, timeout=240
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "NonFiniteLossError: stopped at step 0: 1 non-finite losses" in out, out[-3000:]


def test_partial_zero_checkpoint_skipped_and_world_size_change_detected(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    src = runs["zero3"] / "checkpoints"
    folder = tmp_path / "checkpoints"
    shutil.copytree(src, folder)
    newest = find_latest(folder)
    assert newest is not None and newest.name == f"step{STEPS:08d}.ckpt"
    newest.with_suffix(".json").unlink()  # copied without its record: the shards still tell
    assert resume_form(newest, 2, 3) is None
    assert resume_form(newest, 1, 3) == "universal"  # another rank count: to be resharded
    assert resume_form(newest, 2, 2) == "universal"  # another stage
    zero2 = find_latest(runs["zero2"] / "checkpoints")
    assert zero2 is not None
    assert resume_form(zero2, 2, 3) == "universal"
    assert resume_form(zero2, 2, 1) is None  # stages 1 and 2 share a layout
    assert resume_form(newest, 2, 0) == "single"  # deepspeed=none
    next(newest.rglob("zero_pp_rank_1_*optim_states.pt")).unlink()  # rank 1 never finished
    assert find_latest(folder) == folder / f"step{2 * EVERY:08d}.ckpt"


def test_zero3_export_loads_in_rwkv_package(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pth = export(runs["zero3"], tmp_path / "out.pth")
    sd = torch.load(pth, weights_only=True)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert_matches_rwkv_package(pth, [5, 17, 99, 3, 0, 42, 7, 120], monkeypatch)


def _build_partitioned(rank: int, port: int, out: str, *extra: str) -> None:
    """One rank: configure_model under deepspeed.zero.Init, then gather the full weights."""
    import deepspeed
    import torch.distributed as dist

    from rwkv_train.config import validate
    from rwkv_train.lit_module import RWKVLitModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed("gloo", dist_init_required=False)
    plan = validate(compose_config(build_overrides(out, *extra)))
    module = RWKVLitModule(plan.cfg, plan.model, plan.accumulate, plan.init_from)
    torch.manual_seed(plan.cfg.seed)
    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    if plan.cfg.trainer.precision.startswith("bf16"):  # as Lightning does: built in bf16
        config["bf16"] = {"enabled": True}
    with deepspeed.zero.Init(config_dict_or_path=config):
        module.configure_model()
    net = module.net
    local = {n: p.ds_tensor.numel() for n, p in net.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(net.parameters())):
        full = {n: p.detach().clone() for n, p in net.named_parameters()}
    if rank == 0:
        torch.save({"local": local, "full": full}, out)
    dist.destroy_process_group()
    # The work is done: leave without the interpreter's teardown, in which a thread of the
    # CPU collectives still running aborted the process now and then (SIGABRT, "terminate
    # called without an active exception").
    os._exit(0)


def build_overrides(out: str, *extra: str) -> list[str]:
    data = Path(out).parent / "data"
    run_dir = Path(out).parent / "run"
    return train_overrides(data, run_dir, *SAME, "deepspeed=zero3", "trainer.devices=2", *extra)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_zero3_partitioned_build_equals_eager_build(tmp_path: Path, precision: str) -> None:
    """Under bf16 the parameters are built in bf16: the weights must still be the eager
    float32 build's, rounded once."""
    tiny_data(tmp_path / "data")
    out = str(tmp_path / "built.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    extra = f"trainer.precision={precision}"
    mp.spawn(_build_partitioned, args=(free_port(), out, extra), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32

    from rwkv_train.config import validate
    from rwkv_train.model import RWKV

    plan = validate(compose_config(build_overrides(out, extra)))
    torch.manual_seed(plan.cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: LAPACK's QR (orthogonal init) may depend on it
    try:
        eager = RWKV(plan.model).state_dict()
    finally:
        torch.set_num_threads(threads)
    assert set(got["full"]) == set(eager)
    for k, v in eager.items():
        v = v.to(dtype)
        assert torch.equal(got["full"][k], v), (k, (got["full"][k].float() - v).abs().max())
    big = "blocks.0.att.key.weight"  # partitioned: rank 0 holds half of it
    assert got["local"][big] == eager[big].numel() // 2


def test_zero3_init_from_fills_every_partition(tmp_path: Path) -> None:
    """model.init_from under ZeRO-3: the partitioned model gathers back to exactly the file's
    weights (given in bf16, as reference checkpoints are), and stays partitioned."""
    tiny_data(tmp_path / "data")
    out = str(tmp_path / "built.pt")

    from rwkv_train.config import validate
    from rwkv_train.model import RWKV

    plan = validate(compose_config(build_overrides(out)))
    torch.manual_seed(123)
    ref = {
        k: (v + 0.01 * torch.randn_like(v)).bfloat16()
        for k, v in RWKV(plan.model).state_dict().items()
    }
    pth = tmp_path / "start.pth"
    torch.save(ref, pth)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(
        _build_partitioned, args=(free_port(), out, f"model.init_from={pth}"), nprocs=2, join=True
    )
    got = torch.load(out, weights_only=True)
    assert set(got["full"]) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got["full"][k], v.float()), k
    big = "blocks.0.att.key.weight"
    assert got["local"][big] == ref[big].numel() // 2


@pytest.mark.parametrize(
    ("source_stage", "stage", "step"), [(2, 2, 2), (3, 3, 2 * EVERY), (2, 3, 2), (3, 2, 2 * EVERY)]
)
def test_resume_on_one_rank_from_two_rank_zero_checkpoint(
    runs: dict[str, Path], tmp_path: Path, source_stage: int, stage: int, step: int
) -> None:
    """A ZeRO checkpoint of 2 ranks continues on 1 (same global batch, accumulating 2), under
    its own ZeRO stage or across stage 3 and 2: the trainer builds its universal form once
    and the run goes on with the optimizer state, matching the uninterrupted 2-rank run
    (fp32, up to reduction order). Each parameter group keeps its own settings and Adam its
    step count (DeepSpeed's ZeRO-3 loader gives every group group 0's settings and one
    shared step tensor, which then advanced once per group)."""
    source = runs[f"zero{source_stage}"]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    name = f"step{step:08d}"
    shutil.copytree(
        source / "checkpoints" / f"{name}.ckpt", run_dir / "checkpoints" / f"{name}.ckpt"
    )
    shutil.copy(source / "checkpoints" / f"{name}.json", run_dir / "checkpoints")
    max_steps = 4 if source_stage == 2 else STEPS
    overrides = train_overrides(
        runs["data"], run_dir, *SAME, *SMALL_BUCKETS, "trainer.devices=1",
        f"deepspeed=zero{stage}", f"trainer.max_steps={max_steps}", "checkpoint.every_n_steps=100",
    )  # fmt: skip
    done = launch([sys.executable, "-m", "rwkv_train.train", *overrides], runs["root"])
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
    assert groups[1::3] == [1.0, 2.0]  # lr_mult: the time_decay group at 2x
    assert groups == pytest.approx(saved_optimizer(source / "checkpoints" / final.name)[0])
    assert steps and set(steps) == {max_steps}


def test_resume_on_one_rank_from_an_odd_step_keeps_the_step_boundaries(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Two ranks take one micro-batch per step, one rank takes two. Resumed at step 3, the
    one-rank run must end its next step after two micro-batches (counted in its own
    accumulation, not the checkpoint's): step 4 gets the two-rank run's loss."""
    run_dir = tmp_path / "odd"
    launch(
        command(runs["data"], run_dir, "deepspeed=zero2", "trainer.max_steps=4",
                "checkpoint.every_n_steps=1"),
        runs["root"],
    )  # fmt: skip
    drop_checkpoint(run_dir, 4)
    cmd = command(
        runs["data"], run_dir, "deepspeed=zero2", "trainer.max_steps=4",
        "checkpoint.every_n_steps=1", "trainer.devices=1",
    )  # fmt: skip
    done = launch(cmd, runs["root"])
    assert "(step 3)" in done.stdout + done.stderr
    got, want = history(run_dir), history(runs["zero2"])
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    assert got[3][1] == pytest.approx(want[3][1], abs=1e-5)


def test_reshard_command_converts_a_checkpoint_saved_without_the_universal_key(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m rwkv_train.reshard CKPT` ahead of a resubmission, on a checkpoint from
    before the universal key was saved (added to the converted copy; the original stays)."""
    from rwkv_train.reshard import INFO_KEY, main

    run_dir = tmp_path / "run"
    shutil.copytree(runs["zero2"] / "checkpoints", run_dir / "checkpoints")
    ckpt = find_latest(run_dir / "checkpoints")
    assert ckpt is not None
    states = next(ckpt.rglob("mp_rank_00_model_states.pt"))
    sd = torch.load(states, weights_only=False)
    del sd[INFO_KEY]
    torch.save(sd, states)
    assert main([str(ckpt)]) == 0
    out = Path(capsys.readouterr().out.split("reshard: ")[-1].strip())
    assert out == ckpt.with_name(ckpt.name + ".universal")
    tag = (ckpt / "latest").read_text().strip()
    assert (out / "latest_universal").read_text() == tag
    assert (out / tag / "zero" / "net.head.weight" / "exp_avg.pt").is_file()
    assert INFO_KEY not in torch.load(states, weights_only=False)  # the original is untouched
    assert main([str(tmp_path / "nowhere")]) == 1


def test_zero1_run_matches_zero2(runs: dict[str, Path], tmp_path: Path) -> None:
    """deepspeed=zero1 (optimizer state partitioned, gradients not) trains the same steps as
    the ZeRO-2 run to fp32 rounding, and writes one optimizer partition per rank."""
    run_dir = tmp_path / "zero1"
    launch(
        command(
            runs["data"], run_dir, "deepspeed=zero1", "trainer.max_steps=4",
            "checkpoint.every_n_steps=2",
        ),
        runs["root"],
    )  # fmt: skip
    got, want = history(run_dir), history(runs["zero2"])
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)
    ckpt = find_latest(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "step00000004.ckpt"
    assert {p.name.split("_")[3] for p in ckpt.rglob("zero_pp_rank_*optim_states.pt")} == {"0", "1"}


@pytest.mark.parametrize("config", ["zero2_offload", "zero3_offload"])
def test_offload_runs_match_zero2_and_resume(
    runs: dict[str, Path], tmp_path: Path, config: str
) -> None:
    """The offload configs step with DeepSpeed's CPU Adam (DeepSpeed refuses torch's AdamW
    there at start-up): the ZeRO-2 run's losses, and a resume from the step-2 checkpoint
    continues them with the offloaded optimizer state. Not bit for bit: the CPU Adam keeps
    beta**step as a running float product within a process and takes pow() after a restart."""
    run_dir = tmp_path / config
    cmd = command(
        runs["data"], run_dir, f"deepspeed={config}", "trainer.max_steps=4",
        "checkpoint.every_n_steps=2",
    )  # fmt: skip

    def assert_zero2_losses() -> None:
        got, want = history(run_dir), history(runs["zero2"])
        assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
        for (s, a), (_, b) in zip(got, want, strict=True):
            assert a == pytest.approx(b, rel=1e-6), (s, a, b)

    launch(cmd, runs["root"])
    assert_zero2_losses()
    drop_checkpoint(run_dir, 4)
    done = launch(cmd, runs["root"])
    assert "(step 2)" in done.stdout + done.stderr, "the log must say where it resumed"
    assert_zero2_losses()


def test_offload_can_be_turned_on_and_off_on_resume(runs: dict[str, Path], tmp_path: Path) -> None:
    """A run moved to fewer GPUs turns offload on, one moved to more turns it off: the Adam
    state that torch's AdamW saved continues in DeepSpeed's CPU Adam (same rank count), and
    the CPU Adam's continues in AdamW on one rank (through the universal form), each giving
    the losses of the run that never switched."""

    def resume(name: str, source: Path, *extra: str) -> list[tuple[int, float]]:
        run_dir = tmp_path / name
        shutil.copytree(source, run_dir)
        cmd = command(runs["data"], run_dir, "trainer.max_steps=6", "checkpoint.every_n_steps=1")
        launch([*cmd, *extra], runs["root"])
        return history(run_dir)

    same = resume("same", runs["zero2"], "deepspeed=zero2")
    on = resume("on", runs["zero2"], "deepspeed=zero2_offload")
    drop_checkpoint(tmp_path / "on", 6)
    off = resume("off", tmp_path / "on", "deepspeed=zero2", "trainer.devices=1")
    assert [s for s, _ in same] == [s for s, _ in on] == [s for s, _ in off] == list(range(1, 7))
    for (s, a), (_, b), (_, c) in zip(same[4:], on[4:], off[4:], strict=True):
        assert b == pytest.approx(a, rel=1e-6) and c == pytest.approx(a, rel=1e-6), (s, a, b, c)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_runs_track_fp32_and_resume_exactly(
    runs: dict[str, Path], tmp_path: Path, stage: int
) -> None:
    """trainer=gpu's precision (bf16-mixed: bf16 weights and compute, fp32 master weights in
    the optimizer) under ZeRO-2 and 3: the fp32 ZeRO-2 run's losses to bf16 accuracy, a
    resume from the step-2 checkpoint bit for bit, and an export of fp32 master weights."""
    run_dir = tmp_path / f"bf16_zero{stage}"
    cmd = command(
        runs["data"], run_dir, f"deepspeed=zero{stage}", "trainer.precision=bf16-mixed",
        "trainer.max_steps=4", "checkpoint.every_n_steps=2",
    )  # fmt: skip
    launch(cmd, runs["root"])
    first, want = history(run_dir), history(runs["zero2"])
    assert [s for s, _ in first] == [s for s, _ in want] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(first, want, strict=True):
        assert a == pytest.approx(b, abs=2e-2) and a != b, (s, a, b)  # bf16, not fp32
    drop_checkpoint(run_dir, 4)
    done = launch(cmd, runs["root"])
    assert "(step 2)" in done.stdout + done.stderr, "the log must say where it resumed"
    assert history(run_dir) == first
    weights = load_checkpoint_weights(run_dir / "checkpoints" / "step00000004.ckpt")
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any((v != v.bfloat16().float()).any() for v in weights.values())  # not bf16 copies


def test_zero3_run_logs_samples_on_every_rank_without_a_hang(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Under ZeRO-3 each forward call gathers weights from all ranks: text samples are drawn
    by every rank (rank 0's tokens), logged by rank 0, and leave training unchanged."""
    run_dir = tmp_path / "samples"
    cmd = command(
        runs["data"], run_dir, "deepspeed=zero3", "trainer.max_steps=4",
        "checkpoint.every_n_steps=2", "logger=wandb", "logger.mode=offline",
        "logger.log_samples_every_n_steps=2",
    )  # fmt: skip
    done = subprocess.run(
        cmd, cwd=runs["root"], env=environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got, want = history(run_dir), history(runs["zero2"])
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"samples" in wandb_file.read_bytes()


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


def test_zero3_segments_with_block_checkpoints_train_the_same_steps(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """trainer.segment_len under ZeRO-3 with gradient checkpointing inside each segment: the
    partitioned weights are gathered for every segment's forward and recomputation, and
    their gradients (summed over the segments) are reduced once per step. The losses are
    the whole-sample ZeRO-3 run's."""
    run_dir = tmp_path / "segments"
    launch(
        command(
            runs["data"], run_dir, "deepspeed=zero3", "trainer.max_steps=4",
            "checkpoint.every_n_steps=0", "trainer.segment_len=6", "model.grad_checkpoint=true",
        ),
        runs["root"],
    )  # fmt: skip
    got, want = history(run_dir), history(runs["zero3"])[:4]
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)


def test_ddp_checkpoint_continues_under_zero3_with_its_optimizer_state(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """A single-file checkpoint (deepspeed=none, one process) resumed under ZeRO-3 on two
    ranks goes through a universal form built from it: AdamW's numbered states get their
    names from the rebuilt parameter groups (three, with weight decay on). Steps 3-4 repeat
    the uninterrupted run's losses and Adam's step count carries on."""
    run_dir = tmp_path / "ddp"
    extra = ("optim.weight_decay=0.1", "trainer.max_steps=4", "checkpoint.every_n_steps=2")
    overrides = train_overrides(runs["data"], run_dir, *SAME, *extra)
    train(compose_config(overrides))
    want = history(run_dir)
    drop_checkpoint(run_dir, 4)
    done = launch(command(runs["data"], run_dir, *extra, "deepspeed=zero3"), runs["root"])
    log = done.stdout + done.stderr
    assert "was written by another rank count or strategy" in log and "(step 2)" in log
    got = history(run_dir)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(got[2:], want[2:], strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)
    groups, steps = saved_optimizer(run_dir / "checkpoints" / "step00000004.ckpt")
    assert groups[2::3] == [0.0, 0.1, 0.0]  # weight decay on the matrices' group only
    assert steps and set(steps) == {4}
    # groups that cannot be matched to the saved ones (optim.lr_mult changed) are refused
    ckpt = run_dir / "checkpoints" / "step00000002.ckpt"
    shutil.rmtree(universal_path(ckpt))
    with pytest.raises(ValueError, match="resume with the settings it was written with"):
        universal_from_single(ckpt, OptimConfig(lr_mult={}))


def test_zero3_checkpoint_continues_without_deepspeed(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """deepspeed=none resuming a two-rank ZeRO-3 checkpoint loads a single file built from
    its universal form: weights, AdamW states in this run's group order, Lightning's loops.
    Steps 7-8 repeat the ZeRO-3 run's losses."""
    run_dir = tmp_path / "none"
    (run_dir / "checkpoints").mkdir(parents=True)
    name = f"step{2 * EVERY:08d}"
    source = runs["zero3"] / "checkpoints"
    shutil.copytree(source / f"{name}.ckpt", run_dir / "checkpoints" / f"{name}.ckpt")
    shutil.copy(source / f"{name}.json", run_dir / "checkpoints")
    overrides = train_overrides(
        runs["data"], run_dir, *SAME, f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=100"
    )
    module = train(compose_config(overrides))
    assert (run_dir / "checkpoints" / f"{name}.ckpt.single").is_file()
    got, want = history(run_dir), [(s, v) for s, v in history(runs["zero3"]) if s > 2 * EVERY]
    assert [s for s, _ in got] == [s for s, _ in want] == [7, 8]
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)
    steps = {float(st["step"]) for st in module._optimizer.state.values()}
    assert steps == {float(STEPS)}
