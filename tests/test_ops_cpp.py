"""The fused CPU C++ WKV ops against the float64 recurrences, their torch.library wiring,
backend selection and the build-lock handling.

The extension is built once per session (module fixture) into TORCH_EXTENSIONS_DIR (torch's
cache by default, so a second run only loads it). If it cannot be built the tests skip, except
under REQUIRE_CPP_OPS=1 (CI), where that is a failure.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import _get_build_directory

from rwkv_train import ops
from rwkv_train.ops import backend, fused, loader
from rwkv_train.ops.testing import FUSED_BOUNDS, assert_within, compare, make_case, rel_err


def _check(errs: dict[str, float], dtype: torch.dtype) -> None:
    assert_within(errs, FUSED_BOUNDS[dtype])


# Every H at the short lengths; at T=257 the float64 autograd reference dominates the run
# time, so H = 1 and 3 there.
SHAPES = [(T, H) for T in (1, 15) for H in (1, 2, 3)] + [(257, 1), (257, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("T", "H"), SHAPES)
@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
def test_wkv56_matches_reference(cpp_ops, op, T, H, dtype):
    case = make_case(op, B=2, T=T, H=H, N=64, dtype=dtype, seed=T * 10 + H)
    _check(compare(case, getattr(fused, op)), dtype)


@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
def test_wkv56_without_initial_state(cpp_ops, op):
    case = make_case(op, B=2, T=15, H=2, with_state=False)
    _check(compare(case, getattr(fused, op)), torch.float32)


@pytest.mark.parametrize("N", [32, 128, 48], ids=["chunked32", "chunked128", "scan48"])
@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
def test_wkv56_other_head_sizes(cpp_ops, op, N):
    """Head sizes 32 and 128 take their own chunked builds; the others the per-step scans."""
    case = make_case(op, B=2, T=37, H=2, N=N, seed=N)
    _check(compare(case, getattr(fused, op)), torch.float32)


@pytest.fixture(scope="module")
def baseline_ops(cpp_ops):
    """The CPU extension built without the AVX2 clones (about 45 s; cached like the other)."""
    return loader._build(
        "rwkv_wkv_cpu_baseline", loader.CPU_SOURCES, False, False, ("WKV_BASELINE_ONLY",)
    )


@pytest.mark.parametrize("N", [64, 48], ids=["chunked", "scan"])
@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
def test_baseline_build_matches_clones(cpp_ops, baseline_ops, op, N):
    """The code CPUs without AVX2 run (the clones' baseline side, which this machine never
    picks) equals the AVX2 clones up to rounding (the clones fuse multiply-adds)."""
    case = make_case(op, B=2, T=37, H=2, N=N, seed=N)
    r, k, v, w, u, s0 = case.args
    g = torch.Generator().manual_seed(0)
    gy, gs = torch.randn(r.shape, generator=g), torch.randn(s0.shape, generator=g)
    static = op == "wkv5"
    for name in ("wkv56_forward", "wkv56_backward"):
        extra = (gy, gs) if name == "wkv56_backward" else ()
        got = getattr(baseline_ops, name)(r, k, v, w, u, s0, *extra, static)
        want = getattr(cpp_ops, name)(r, k, v, w, u, s0, *extra, static)
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) < 1e-5, name


def test_wkv6_long_sequence(cpp_ops):
    """The decay gradient identity (suffix sums) stays accurate over thousands of steps."""
    case = make_case("wkv6", B=1, T=1024, H=1, seed=7)
    _check(compare(case, fused.wkv6), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 15, 257])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
def test_wkv4_matches_reference(cpp_ops, T, dtype, with_state):
    case = make_case("wkv4", B=2, T=T, H=1, N=40, dtype=dtype, with_state=with_state, seed=T)
    _check(compare(case, fused.wkv4), dtype)


# The long case's backward needs more scratch than a thread keeps between calls (4M floats,
# cuda/wkv_cpu.cpp), its halves less: the two kinds of scratch must agree.
@pytest.mark.parametrize(
    ("B", "H", "T", "cut"), [(2, 2, 40, 17), (1, 1, 22528, 11264)], ids=["short", "long"]
)
def test_segments_chain_exactly(cpp_ops, B, H, T, cut):
    """Two segments with the state carried equal one long call, gradients included (BPTT)."""
    case = make_case("wkv6", B=B, T=T, H=H)
    r, k, v, w, u, s0 = (x.clone().requires_grad_() for x in case.args)
    y, sT = fused.wkv6(r, k, v, w, u, s0)
    (y.square().sum() + sT.sum()).backward()
    full = [x.grad.clone() for x in (r, k, v, w, u, s0)]
    for x in (r, k, v, w, u, s0):
        x.grad = None
    y1, s1 = fused.wkv6(r[:, :cut], k[:, :cut], v[:, :cut], w[:, :cut], u, s0)
    y2, s2 = fused.wkv6(r[:, cut:], k[:, cut:], v[:, cut:], w[:, cut:], u, s1)
    (y1.square().sum() + y2.square().sum() + s2.sum()).backward()
    errs = {"y": rel_err(torch.cat([y1, y2], 1), y), "state_out": rel_err(s2, sT)}
    for name, x, g in zip(case.names, (r, k, v, w, u, s0), full, strict=True):
        errs[f"g_{name}"] = rel_err(x.grad, g)
    _check(errs, torch.float32)  # long: g_w about 1e-5, the rest about 1e-7 or exact


def test_public_entry_points(cpp_ops):
    case = make_case("wkv6", B=1, T=5, H=1)
    y, s = ops.wkv6(*case.args, backend="cpp")
    y_ref, s_ref = ops.wkv6(*case.args, backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)
    case4 = make_case("wkv4", B=1, T=5, H=1, N=8, with_state=False)
    y4, _ = ops.wkv4(*case4.args[:4], backend="cpp")
    y4_ref, _ = ops.wkv4(*case4.args[:4], backend="torch")
    torch.testing.assert_close(y4, y4_ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- torch.library
def _opcheck_args(op: str):
    case = make_case(op, B=1, T=3, H=1, N=64 if op != "wkv4" else 8)
    return [x.requires_grad_() for x in case.args]


@pytest.mark.parametrize("op", ["wkv6", "wkv5", "wkv4"])
def test_opcheck(cpp_ops, op):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch are consistent."""
    torch.library.opcheck(getattr(torch.ops.rwkv, op).default, _opcheck_args(op))


def test_meta_shapes():
    """Fake tensors propagate shapes without building or running anything."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        r = torch.empty(2, 7, 3, 64, dtype=torch.bfloat16)
        y, s = fused.wkv6(r, r, r, r, torch.empty(3, 64), None)
        assert y.shape == r.shape and y.dtype == torch.bfloat16
        assert s.shape == (2, 3, 64, 64) and s.dtype == torch.float32
        k = torch.empty(2, 7, 10)
        y4, s4 = fused.wkv4(k, k, torch.empty(10), torch.empty(10), None)
        assert y4.shape == k.shape and s4.shape == (2, 3, 10)


def test_torch_compile(cpp_ops):
    """The op traces as one node under torch.compile (fullgraph), forward and backward."""
    case = make_case("wkv6", B=1, T=9, H=1)

    def f(r, k, v, w, u, s0):
        y, s = fused.wkv6(r * 2, k, v, w, u, s0)
        return y.sum() + s.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a = [x.clone().requires_grad_() for x in case.args]
    b = [x.clone().requires_grad_() for x in case.args]
    torch.testing.assert_close(compiled(*a), f(*b))
    compiled(*a).backward()
    f(*b).backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad)


# ----------------------------------------------------------------------------- backends
def test_backend_resolution(cpp_ops, caplog):
    cpu = torch.device("cpu")
    assert backend.resolve("wkv6", "cpp", cpu) is fused.wkv6
    assert backend.resolve("wkv5", "torch", cpu).__name__.startswith("wkv5")
    with pytest.raises(ValueError, match="not one of"):
        backend.resolve("wkv6", "triton", cpu)
    with pytest.raises(RuntimeError, match="runs on cuda tensors"):
        backend.resolve("wkv6", "cuda", cpu)
    backend._auto_choice.clear()
    backend._resolved.clear()
    with caplog.at_level(logging.INFO, logger="rwkv_train.ops"):
        assert backend.resolve("wkv6", "auto", cpu) is fused.wkv6
    assert "WKV backend 'auto' on cpu: cpp" in caplog.text


def test_auto_falls_back_to_torch(monkeypatch, caplog):
    """When the extension cannot be built, auto says why and uses the chunked form; an
    explicit cpp request is an error carrying the same reason."""

    def broken(*a, **kw):
        raise loader.ExtensionBuildError("building rwkv_wkv_cpu failed: no compiler (test)")

    monkeypatch.setattr(loader, "load_for", broken)
    monkeypatch.setattr(backend, "_auto_choice", {})
    monkeypatch.setattr(backend, "_resolved", {})
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="rwkv_train.ops"):
        fn = backend.resolve("wkv6", "auto", cpu)
    assert fn.__name__ == "wkv6_chunked"
    assert "fell back from cpp" in caplog.text and "no compiler (test)" in caplog.text
    with pytest.raises(RuntimeError, match="no compiler"):
        backend.resolve("wkv6", "cpp", cpu)


def test_stale_build_lock_is_cleared(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.touch()
    assert not loader.clear_stale_lock(tmp_path, owner_is_gone=False)  # fresh, maybe live
    assert lock.exists()
    old = time.time() - 7200
    os.utime(lock, (old, old))
    assert loader.clear_stale_lock(tmp_path, owner_is_gone=False)  # too old to be live
    assert not lock.exists()
    # a builder of this host killed while holding torch's lock: its record names a dead pid
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".rwkv_build.flock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    lock.touch()
    with loader._build_mutex(tmp_path) as held:
        assert held and not lock.exists()
    assert (tmp_path / ".rwkv_build.flock").read_text().split() == [
        socket.gethostname(),
        str(os.getpid()),
    ]


def test_a_lock_of_another_node_is_waited_out_not_waited_on_forever(tmp_path, monkeypatch, caplog):
    """A shared extension cache: a `lock` whose builder ran on another node may be live (its
    node's flock does not exclude ours), so it is waited for, saying so, and removed once
    older than the limit; torch itself would wait on a dead one forever. The same where the
    filesystem has no flock at all."""
    monkeypatch.setenv("RWKV_BUILD_LOCK_STALE_S", "2")
    lock = tmp_path / "lock"
    (tmp_path / ".rwkv_build.flock").write_text("another-node 4242\n")
    lock.touch()
    t0 = time.monotonic()
    logs = caplog.at_level(logging.WARNING, logger="rwkv_train.ops.loader")
    with logs, loader._build_mutex(tmp_path):
        assert not lock.exists()
    assert 1.0 < time.monotonic() - t0 < 30
    assert "waiting for the build lock" in caplog.text and "removing a stale" in caplog.text

    import fcntl

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock.touch()
    with loader._build_mutex(tmp_path) as held:
        assert not held and not lock.exists()


def test_a_failed_build_is_summarised_by_its_cause():
    """torch's message starts with the whole compiler command; the cause is further down."""
    text = (
        "Error building extension 'rwkv_wkv_cpu': [1/2] c++ -MMD -MF wkv_cpu.o.d -O3 -c x.cpp\n"
        "FAILED: wkv_cpu.o\nc++ -MMD -O3 -c wkv_cpu.cpp -o wkv_cpu.o\n"
        "wkv_cpu.cpp:12:3: error: 'undefined_symbol_x' was not declared in this scope\n"
        "ninja: build stopped: subcommand failed."
    )
    assert loader._summary(RuntimeError(text)) == (
        "RuntimeError: wkv_cpu.cpp:12:3: error: 'undefined_symbol_x' was not declared in this scope"
    )
    missing = "Error building extension 'x': [1/2] /no/c++ -c x.cpp\n/bin/sh: 1: /no/c++: not found"
    assert loader._summary(RuntimeError(missing)).endswith("/bin/sh: 1: /no/c++: not found")


def test_build_step_fails_when_a_found_cuda_toolkit_fails_to_build(monkeypatch, capsys):
    """`--target auto` (what the Slurm script runs) skips CUDA only where there is none to
    build with; a compile error must stop the job before every rank retries it."""
    from torch.utils import cpp_extension

    from rwkv_train.ops import build

    def broken(verbose=False):
        raise loader.ExtensionBuildError("building rwkv_wkv_cuda failed: wkv6.cu(12): error")

    monkeypatch.setattr(loader, "load_cpu", lambda verbose=False: None)
    monkeypatch.setattr(loader, "load_cuda", broken)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    assert build.main(["--target", "auto"]) == 1
    assert "cuda: FAILED" in capsys.readouterr().out
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert build.main(["--target", "auto"]) == 0
    assert "cuda: skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_build_step_clears_a_stale_lock_of_deepspeeds_cpu_adam():
    """The offload configs' optimizer op is built through torch's lock like ours: the build
    step (`--target cpu_adam`) removes a lock a killed compile left, instead of waiting on it
    forever (about a minute when the op is not cached yet)."""
    pytest.importorskip("deepspeed")
    lock = Path(_get_build_directory("cpu_adam", False)) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "rwkv_train.ops.build", "--target", "cpu_adam"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        lock.unlink(missing_ok=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "removing a stale build lock" in done.stderr
    assert "cpu_adam: ready in" in done.stdout


# ----------------------------------------------------------------------------- whole model
_HAS_MODEL = importlib.util.find_spec("rwkv_train.model") is not None


@pytest.mark.skipif(not _HAS_MODEL, reason="rwkv_train.model is not there yet")
@pytest.mark.parametrize("version", [4, 5, 6])
def test_model_cpp_equals_torch(cpp_ops, version):
    """Logits and every parameter gradient agree between the fused op and the chunked form."""
    try:
        from rwkv_train.model import RWKV, RWKVConfig
    except ImportError as exc:
        pytest.skip(f"rwkv_train.model does not import: {exc}")
    torch.manual_seed(0)
    cfg = dict(version=version, n_layer=2, n_embd=128, vocab_size=97)
    ref = RWKV(RWKVConfig(**cfg, wkv_backend="torch"))
    fast = RWKV(RWKVConfig(**cfg, wkv_backend="cpp"))
    # A fresh init zeroes some projections; perturb every parameter so all paths carry signal.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 97, (2, 33))
    logits_ref, logits = ref(idx), fast(idx)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    logits_ref.float().logsumexp(-1).mean().backward()
    logits.float().logsumexp(-1).mean().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_builds_are_named_by_their_sources(tmp_path, monkeypatch):
    """Two checkouts sharing one extension cache keep a build each: torch rebuilt one folder
    for whichever started last, under the other's running jobs."""
    name = loader.versioned_name(loader.CPU_NAME)
    assert name == loader.versioned_name(loader.CPU_NAME)
    assert re.fullmatch(r"rwkv_wkv_cpu_[0-9a-f]{12}", name)  # a module name too
    other = tmp_path / "cuda"
    shutil.copytree(loader.cuda_dir(), other)
    monkeypatch.setattr(loader, "cuda_dir", lambda: other)
    assert loader.versioned_name(loader.CPU_NAME) == name
    with (other / "wkv.h").open("a") as f:  # a header only the kernels include
        f.write("// another checkout\n")
    assert loader.versioned_name(loader.CPU_NAME) != name


def test_a_prebuilt_extension_loads_from_a_read_only_cache(cpp_ops, tmp_path, monkeypatch):
    """A team's shared software area holds the build but cannot be written: torch's load()
    failed taking its lock there, and auto fell back to the slow torch form."""
    built = Path(cpp_ops.__file__).parent
    shared = tmp_path / "shared"
    shutil.copytree(built, shared / built.name)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(shared))
    writable = os.access
    monkeypatch.setattr(loader.os, "access", lambda p, mode: mode != os.W_OK and writable(p, mode))
    monkeypatch.setattr(loader, "_loaded", {})

    def files() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (shared / built.name).iterdir()}

    before = files()
    module = loader.load_cpu()
    assert Path(module.__spec__.origin).parent == shared / built.name  # imported from there
    assert files() == before  # nothing written: no lock, no record, no rebuild
    assert callable(module.wkv56_forward)
