"""Two-process training on the CPU: DeepSpeed ZeRO-1/2/3 over gloo, as on a GPU node
(tests/dist_utils.py runs them): partitions, equivalence with one rank, faults, precision,
offload, segments. Resuming on another rank count or strategy is in test_reshard.py.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_utils import (
    EVERY,
    SAME,
    SMALL_BUCKETS,
    STEPS,
    command,
    drop_checkpoint,
    environment,
    free_port,
    history,
    launch,
    zero3_command,
)
from train_utils import assert_matches_rwkv_package, tiny_data, train_overrides

from rwkv_train.checkpoint import find_latest, list_checkpoints, saved_extra
from rwkv_train.export import export, load_checkpoint_weights
from rwkv_train.metrics import read_metrics
from rwkv_train.train import compose_config, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_runs_write_rank_partitions_and_read_disjoint_samples(
    zero_runs: dict[str, Path], name: str
) -> None:
    run_dir = zero_runs[name]
    ckpt = find_latest(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.is_dir()
    shards = sorted(p.name for p in ckpt.rglob("zero_pp_rank_*"))
    assert any(s.startswith("zero_pp_rank_0_") for s in shards), shards
    assert any(s.startswith("zero_pp_rank_1_") for s in shards), shards
    if name == "zero3":  # parameters are partitioned too
        assert sum("model_states" in s for s in shards) == 2, shards
    # what a resume checks before it touches the run folder, read from rank 0's model states
    extra = saved_extra(ckpt)
    assert extra is not None and extra["model_config"]["n_layer"] == 2
    assert extra["param_groups"] and extra["consumed_samples"] > 0

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


def test_two_ranks_equal_one_rank_accumulating_two(zero_runs: dict[str, Path]) -> None:
    """Same samples per step, gradients averaged over ranks instead of accumulated: fp32
    weights agree up to summation order (atol 1e-5 after 4 AdamW steps of the tiny model)."""
    one = zero_runs["root"] / "one_rank"
    overrides = train_overrides(
        zero_runs["data"], one, *SAME, "trainer.max_steps=4", "checkpoint.every_n_steps=2"
    )
    module = train(compose_config(overrides))
    assert module.accumulate == 2
    ours = load_checkpoint_weights(zero_runs["zero2"] / "checkpoints" / "step00000004.ckpt")
    ref = module.net.state_dict()
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert torch.allclose(ours[k], v, rtol=0, atol=1e-5), (k, (ours[k] - v).abs().max())
    one_loss = [loss for _, loss in history(one)]
    two_loss = [loss for _, loss in history(zero_runs["zero2"])]
    assert one_loss == pytest.approx(two_loss, abs=1e-5)
    # validation split over the ranks (one padded) gives the one-rank figure
    val = [
        [(r["step"], r["val/loss"]) for r in read_metrics(d / "metrics.jsonl") if "val/loss" in r]
        for d in (one, zero_runs["zero2"])
    ]
    assert [s for s, _ in val[0]] == [4] and [s for s, _ in val[1]] == [4]
    assert val[1][0][1] == pytest.approx(val[0][0][1], abs=1e-5)


def test_zero_accumulating_two_has_the_gradients_of_ddp(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    """One rank accumulating two micro-batches: ZeRO-1/2/3 log the gradient norm of a run
    without DeepSpeed and, with a clipping threshold between it and its half, train the same
    losses (DeepSpeed's own division by the accumulation count came on top of Lightning's)."""

    def run(name: str, *extra: str) -> list[dict]:  # a process each: DeepSpeed's groups
        overrides = train_overrides(
            zero_runs["data"], tmp_path / name, *SAME, "trainer.max_steps=4",
            "optim.grad_clip=1000", "data.val_samples=0", *extra,
        )  # fmt: skip
        launch([sys.executable, "-m", "rwkv_train.train", *overrides], tmp_path)
        return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "train/loss" in r]

    plain = run("none", "deepspeed=none")
    assert plain[0]["optim/grad_norm"] > 1000 > plain[-1]["optim/grad_norm"]  # clipped, then not
    for stage in (1, 2, 3):
        rows = run(f"zero{stage}", f"deepspeed=zero{stage}", *SMALL_BUCKETS)
        for key, tol in (("optim/grad_norm", 1e-4), ("train/loss", 1e-5)):
            got, want = [r[key] for r in rows], [r[key] for r in plain]
            assert got == pytest.approx(want, rel=tol), (stage, key)


def test_sigkill_after_checkpoint_then_resume_zero3(zero_runs: dict[str, Path]) -> None:
    run_dir = zero_runs["root"] / "killed"
    proc = subprocess.Popen(
        zero3_command(zero_runs["data"], run_dir),
        cwd=zero_runs["root"],
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

    again = launch(zero3_command(zero_runs["data"], run_dir), zero_runs["root"])
    assert f"(step {EVERY})" in again.stdout + again.stderr, "the log must say where it resumed"
    assert history(run_dir) == history(zero_runs["zero3"])
    final = f"step{STEPS:08d}.ckpt"
    a = load_checkpoint_weights(zero_runs["zero3"] / "checkpoints" / final)
    b = load_checkpoint_weights(run_dir / "checkpoints" / final)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nonfinite_loss_stops_every_rank(zero_runs: dict[str, Path], tmp_path: Path) -> None:
    """A step cannot be skipped across ranks: all of them stop, with the message, no hang."""
    pth = export(zero_runs["zero2"], tmp_path / "poisoned.pth")
    sd = torch.load(pth, weights_only=True)
    sd["head.weight"][0, 0] = float("nan")  # every logit row gets a NaN: the loss is NaN
    torch.save(sd, pth)
    cmd = command(
        zero_runs["data"],
        tmp_path / "run",
        "deepspeed=zero2",
        "trainer.max_steps=4",
        f"model.init_from={pth}",
    )
    done = subprocess.run(
        cmd, cwd=zero_runs["root"], env=environment(), capture_output=True, text=True, timeout=240
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1
    assert "[ERROR] - stopped at step 0: 1 non-finite losses" in out, out[-3000:]


def test_zero3_export_loads_in_rwkv_package(
    zero_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pth = export(zero_runs["zero3"], tmp_path / "out.pth")
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


def test_zero1_run_matches_zero2(zero_runs: dict[str, Path], tmp_path: Path) -> None:
    """deepspeed=zero1 (optimizer state partitioned, gradients not) trains the same steps as
    the ZeRO-2 run to fp32 rounding, and writes one optimizer partition per rank."""
    run_dir = tmp_path / "zero1"
    launch(
        command(
            zero_runs["data"], run_dir, "deepspeed=zero1", "trainer.max_steps=4",
            "checkpoint.every_n_steps=2",
        ),
        zero_runs["root"],
    )  # fmt: skip
    got, want = history(run_dir), history(zero_runs["zero2"])
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)
    ckpt = find_latest(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "step00000004.ckpt"
    assert {p.name.split("_")[3] for p in ckpt.rglob("zero_pp_rank_*optim_states.pt")} == {"0", "1"}


@pytest.mark.parametrize("config", ["zero2_offload", "zero3_offload"])
def test_offload_runs_match_zero2_and_resume(
    zero_runs: dict[str, Path], tmp_path: Path, config: str
) -> None:
    """The offload configs step with DeepSpeed's CPU Adam (DeepSpeed refuses torch's AdamW
    there at start-up): the ZeRO-2 run's losses, and a resume from the step-2 checkpoint
    continues them with the offloaded optimizer state. Not bit for bit: the CPU Adam keeps
    beta**step as a running float product within a process and takes pow() after a restart."""
    run_dir = tmp_path / config
    cmd = command(
        zero_runs["data"], run_dir, f"deepspeed={config}", "trainer.max_steps=4",
        "checkpoint.every_n_steps=2",
    )  # fmt: skip

    def assert_zero2_losses() -> None:
        got, want = history(run_dir), history(zero_runs["zero2"])
        assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
        for (s, a), (_, b) in zip(got, want, strict=True):
            assert a == pytest.approx(b, rel=1e-6), (s, a, b)

    launch(cmd, zero_runs["root"])
    assert_zero2_losses()
    drop_checkpoint(run_dir, 4)
    done = launch(cmd, zero_runs["root"])
    assert "(step 2)" in done.stdout + done.stderr, "the log must say where it resumed"
    assert_zero2_losses()


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_runs_track_fp32_and_resume_exactly(
    zero_runs: dict[str, Path], tmp_path: Path, stage: int
) -> None:
    """trainer=gpu's precision (bf16-mixed: bf16 weights and compute, fp32 master weights in
    the optimizer) under ZeRO-2 and 3: the fp32 ZeRO-2 run's losses to bf16 accuracy, a
    resume from the step-2 checkpoint bit for bit, and an export of fp32 master weights."""
    run_dir = tmp_path / f"bf16_zero{stage}"
    cmd = command(
        zero_runs["data"], run_dir, f"deepspeed=zero{stage}", "trainer.precision=bf16-mixed",
        "trainer.max_steps=4", "checkpoint.every_n_steps=2",
    )  # fmt: skip
    launch(cmd, zero_runs["root"])
    first, want = history(run_dir), history(zero_runs["zero2"])
    assert [s for s, _ in first] == [s for s, _ in want] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(first, want, strict=True):
        assert a == pytest.approx(b, abs=2e-2) and a != b, (s, a, b)  # bf16, not fp32
    drop_checkpoint(run_dir, 4)
    done = launch(cmd, zero_runs["root"])
    assert "(step 2)" in done.stdout + done.stderr, "the log must say where it resumed"
    assert history(run_dir) == first
    weights = load_checkpoint_weights(run_dir / "checkpoints" / "step00000004.ckpt")
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any((v != v.bfloat16().float()).any() for v in weights.values())  # not bf16 copies


def test_zero3_run_logs_samples_on_every_rank_without_a_hang(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    """Under ZeRO-3 each forward call gathers weights from all ranks: text samples are drawn
    by every rank (rank 0's tokens), logged by rank 0, and leave training unchanged."""
    run_dir = tmp_path / "samples"
    cmd = command(
        zero_runs["data"], run_dir, "deepspeed=zero3", "trainer.max_steps=4",
        "checkpoint.every_n_steps=2", "logger=wandb", "logger.mode=offline",
        "logger.log_samples_every_n_steps=2",
    )  # fmt: skip
    done = subprocess.run(
        cmd, cwd=zero_runs["root"], env=environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got, want = history(run_dir), history(zero_runs["zero2"])
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"samples" in wandb_file.read_bytes()


def test_zero3_segments_with_block_checkpoints_train_the_same_steps(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    """trainer.segment_len under ZeRO-3 with gradient checkpointing inside each segment: the
    partitioned weights are gathered for every segment's forward and recomputation, and
    their gradients (summed over the segments) are reduced once per step. The losses are
    the whole-sample ZeRO-3 run's."""
    run_dir = tmp_path / "segments"
    launch(
        command(
            zero_runs["data"], run_dir, "deepspeed=zero3", "trainer.max_steps=4",
            "checkpoint.every_n_steps=0", "trainer.segment_len=6", "model.grad_checkpoint=true",
        ),
        zero_runs["root"],
    )  # fmt: skip
    got, want = history(run_dir), history(zero_runs["zero3"])[:4]
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, (s, a, b)


def assert_trains_as(run_dir: Path, reference: Path) -> None:
    """Each rank read the reference run's samples, and the losses are its losses."""
    for rank in (0, 1):
        ids = (run_dir / "sample_ids" / f"rank{rank}.txt").read_text()
        assert ids == (reference / "sample_ids" / f"rank{rank}.txt").read_text()
    (steps, losses), (ref_steps, ref_losses) = (
        zip(*history(d), strict=True) for d in (run_dir, reference)
    )
    assert steps == ref_steps
    assert losses == pytest.approx(ref_losses, abs=1e-6)


def test_two_nodes_of_one_rank_train_as_one_node_of_two(zero_runs: dict[str, Path]) -> None:
    """`trainer.num_nodes=2 trainer.devices=1`, one process per "node" started by hand with
    NODE_RANK (what a cluster's launcher does): the global ranks, the data each reads and so
    the losses are those of the ZeRO-2 run of two devices on one node."""
    run_dir = zero_runs["root"] / "two_nodes"
    overrides = train_overrides(
        zero_runs["data"], run_dir, *SAME, "trainer.devices=1", "trainer.num_nodes=2",
        "deepspeed=zero2", "trainer.max_steps=4", "checkpoint.every_n_steps=2",
        "data.record_sample_ids=true", *SMALL_BUCKETS,
    )  # fmt: skip
    env = environment()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "rwkv_train.train", *overrides],
            cwd=zero_runs["root"],
            env={**env, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    # only global rank 0 prepares the run folder and logs the data mix, not node 1's first rank
    assert "data: data: 100.00% of samples" in outputs[0]
    assert "data: data:" not in outputs[1]
    assert_trains_as(run_dir, zero_runs["zero2"])


def test_torchrun_launch_trains_as_lightnings_own(zero_runs: dict[str, Path]) -> None:
    """`torchrun --nproc-per-node 2 -m rwkv_train.train ... trainer.devices=2` (how Kubernetes
    jobs and many clusters start ranks): the same samples and losses as the run whose second
    rank Lightning started itself."""
    run_dir = zero_runs["root"] / "torchrun"
    overrides = train_overrides(
        zero_runs["data"], run_dir, *SAME, "trainer.devices=2", "deepspeed=zero2",
        "trainer.max_steps=4", "checkpoint.every_n_steps=2", "data.record_sample_ids=true",
        *SMALL_BUCKETS,
    )  # fmt: skip
    env = environment()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    cmd += [f"--master-port={env['MASTER_PORT']}", "-m", "rwkv_train.train", *overrides]
    done = subprocess.run(
        cmd, cwd=zero_runs["root"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_trains_as(run_dir, zero_runs["zero2"])


def test_sigterm_to_torchrun_saves_one_complete_checkpoint(tmp_path: Path) -> None:
    """A pod eviction: SIGTERM to torchrun, which passes it to both ranks; they save the
    partitions of one step and stop (torchrun itself then exits 1 with its SignalException)."""
    from rwkv_train.checkpoint import checkpoint_step, shard_ranks

    run_dir = tmp_path / "run"
    overrides = train_overrides(
        tiny_data(tmp_path / "data"), run_dir, *SAME, "trainer.devices=2", "deepspeed=zero2",
        "trainer.max_steps=400", "checkpoint.every_n_steps=1000", *SMALL_BUCKETS,
    )  # fmt: skip
    env = environment()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    cmd += [f"--master-port={env['MASTER_PORT']}", "-m", "rwkv_train.train", *overrides]
    job = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 150
    while max((s for s, _ in history(run_dir)), default=0) < 2:
        assert job.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    out = job.communicate(timeout=120)[0]
    ckpt = find_latest(run_dir / "checkpoints")
    assert ckpt is not None, out[-3000:]
    saved = checkpoint_step(ckpt)
    assert shard_ranks(ckpt) == {0, 1} and saved == max(s for s, _ in history(run_dir)) < 400
    assert out.count(f"terminated (SIGTERM): checkpoint saved at step {saved}") == 2


def test_a_full_disk_on_one_rank_stops_both_before_the_save(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    """Rank 1's disk reports no space (patched in that process only): both ranks stop with
    the reason before DeepSpeed's collective save starts, so neither waits for the other."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, shutil\n"
        "if os.environ.get('LOCAL_RANK') == '1':\n"
        "    real = shutil.disk_usage\n"
        "    shutil.disk_usage = lambda p: real(p)._replace(free=0)\n"
    )
    env = environment()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    run_dir = tmp_path / "run"
    cmd = command(
        zero_runs["data"], run_dir, "deepspeed=zero2", "trainer.max_steps=4",
        "checkpoint.every_n_steps=2",
    )  # fmt: skip
    done = subprocess.run(
        cmd, cwd=zero_runs["root"], env=env, capture_output=True, text=True, timeout=240
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "no room for the checkpoint of step 2" in out and "free on rank 1" in out, out[-3000:]
    assert "on another rank's disk" in out, out[-3000:]
    assert list((run_dir / "checkpoints").iterdir()) == []


def test_debug_runs_start_afresh_in_one_folder_per_run(
    zero_runs: dict[str, Path], tmp_path: Path
) -> None:
    """debug=fast: a folder named by the time, the same for the rank Lightning starts later
    (it is handed hydra.run.dir); a second run gets a new folder instead of resuming."""
    cmd = command(zero_runs["data"], tmp_path / "unused", "debug=fast", "deepspeed=zero2")
    cmd = [c for c in cmd if not c.startswith("run_dir=")]
    for _ in range(2):
        launch(cmd, tmp_path)
        time.sleep(1.1)  # the folders are named to the second
    runs = sorted((tmp_path / "runs" / "debug" / "fast" / "finch_debug").iterdir())
    assert len(runs) == 2, runs
    for run_dir in runs:
        assert [s for s, _ in history(run_dir)] == [1, 2, 3, 4, 5]
        assert find_latest(run_dir / "checkpoints") is not None
    assert not (tmp_path / "unused").exists()
