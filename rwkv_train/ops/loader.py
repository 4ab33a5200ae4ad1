"""Building and loading the fused WKV extensions (CPU C++ and CUDA) on first use.

Nothing here compiles at import: `load_cpu()` / `load_cuda()` build through
`torch.utils.cpp_extension.load` the first time they are called in a process, and torch caches
the result under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), so later processes
only load the shared library. Each build is named by a hash of the kernel sources, the
torch version and the Python ABI (`rwkv_wkv_cpu_<hash>`): two checkouts or torch versions
sharing one cache each keep their own build, instead of rebuilding one folder in turn under
the other's running jobs.

Two problems of that mechanism are handled here:
- torch serialises concurrent builds (and loads) with a `lock` file in the build directory
  that a killed build leaves behind, after which every later process waits on it forever.
  Our builders hold an OS file lock (`flock`, dropped by the kernel when its holder dies)
  around the build and record themselves in it ("host pid"). A `lock` found while holding
  the flock, left by a builder of this host, has no living owner and is removed with a
  message. Where the flock cannot decide (a filesystem without flock, or a builder of
  another node on a shared filesystem whose flock excludes only one node's processes) we
  wait for the `lock` ourselves, saying so, and remove it once it is older than
  RWKV_BUILD_LOCK_STALE_S (default 1800 s), before torch's endless wait begins.
- On a GPU machine the CUDA extension is built for the compute capabilities of the visible
  GPUs (sm_80, sm_90, ...); with no GPU visible (a login node running the explicit build
  step) for TORCH_CUDA_ARCH_LIST, or 8.0 and 9.0 when that is unset.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from rwkv_train.paths import cuda_dir

log = logging.getLogger(__name__)

CPU_NAME = "rwkv_wkv_cpu"
CUDA_NAME = "rwkv_wkv_cuda"
CPU_SOURCES = ("wkv_cpu.cpp",)
CUDA_SOURCES = ("wkv_cuda.cpp", "wkv6.cu", "wkv4.cu")
DEFAULT_CUDA_ARCHS = "8.0;9.0"
CUDA_HEAD_SIZES = (32, 64, 128)  # RWKV-5/6 head sizes the CUDA kernels are built for (wkv6.cu)

_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


class ExtensionBuildError(RuntimeError):
    """A fused WKV extension could not be built or loaded; the message says why."""


def build_root() -> Path:
    """Where torch caches built extensions: TORCH_EXTENSIONS_DIR or torch's default."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _stale_after_s() -> float:
    return float(os.environ.get("RWKV_BUILD_LOCK_STALE_S", "1800"))


@contextlib.contextmanager
def _build_mutex(build_dir: Path) -> Iterator[bool]:
    """Hold an exclusive flock on build_dir/.rwkv_build.flock, clear or wait out torch's
    `lock` there (`_settle_lock`), and record this process as the builder; yields whether
    the flock was taken."""
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        _settle_lock(build_dir, None)
        yield False
        return
    path = build_dir / ".rwkv_build.flock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building %s; waiting for it", build_dir.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock
            _settle_lock(build_dir, None)
            yield False
            return
        try:
            _settle_lock(build_dir, path)
            fh.truncate(0)
            fh.write(f"{socket.gethostname()} {os.getpid()}\n")
            fh.flush()
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _settle_lock(build_dir: Path, record: Path | None) -> None:
    """Leave torch's `lock` in build_dir only to a builder that may be alive.

    record: the builders' flock file, held by the caller (None: no flock). A lock found
    under it whose recorded builder was a process of this host that has ended (or that no
    builder of ours recorded) is a killed build's: removed now. Any other may belong to a
    live builder on another node: wait while it is younger than RWKV_BUILD_LOCK_STALE_S,
    then remove it.
    """
    lock = build_dir / "lock"
    if not lock.exists():
        return
    # read after seeing the lock: a builder records itself before torch takes the lock
    if record is not None and _ended_here(record.read_text()):
        clear_stale_lock(build_dir, True)
        return
    next_note = time.monotonic()
    while not clear_stale_lock(build_dir, False) and lock.exists():
        if time.monotonic() >= next_note:
            age = time.time() - lock.stat().st_mtime
            log.warning(
                "waiting for the build lock %s (%.0f s old): a build elsewhere may still be "
                "running; it counts as stale after RWKV_BUILD_LOCK_STALE_S = %.0f s",
                lock,
                age,
                _stale_after_s(),
            )
            next_note += 60
        time.sleep(1.0)


def _ended_here(record: str) -> bool:
    """Whether a builder record "host pid" names no process, or one of this host that ended."""
    host, _, pid = record.strip().partition(" ")
    if not host:
        return True
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def clear_stale_lock(build_dir: Path, owner_is_gone: bool) -> bool:
    """Remove torch's build `lock` in build_dir if nobody can be holding it; True if removed.

    owner_is_gone: its builder is known to be dead. Otherwise the lock counts as stale only
    once older than RWKV_BUILD_LOCK_STALE_S.
    """
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if not owner_is_gone and age < _stale_after_s():
        return False
    reason = "its builder is gone" if owner_is_gone else f"it is {age:.0f} s old"
    log.warning("removing a stale build lock %s (%s: a compile was killed)", lock, reason)
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return True


def _cuda_arch_list() -> str:
    """Compute capabilities to build for: the visible GPUs, else TORCH_CUDA_ARCH_LIST, else
    sm_80 and sm_90."""
    if torch.cuda.is_available():
        caps = sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
        return ";".join(f"{a}.{b}" for a, b in caps)
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS


def _build(
    name: str, sources: tuple[str, ...], cuda: bool, verbose: bool, defines: tuple[str, ...] = ()
) -> ModuleType:
    from torch.utils.cpp_extension import load

    src = cuda_dir()
    paths = [str(src / s) for s in sources]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ExtensionBuildError(f"kernel sources missing: {missing}")
    build_dir = build_root() / name
    built = build_dir / f"{name}.so"
    if built.is_file() and build_dir.is_dir() and not os.access(build_dir, os.W_OK):
        return _import_prebuilt(name, built)
    cflags = ["-O3", *(f"-D{d}" for d in defines)]
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")  # at::parallel_for is an OpenMP loop in torch's headers
        ldflags.append("-fopenmp")
    if not cuda:
        # Let the compiler fuse a * b + c into FMA instructions in the AVX2 clones of the CPU
        # kernels; -std=c++NN (ISO mode) turns that off by default in GCC.
        cflags.append("-ffp-contract=fast")
    kwargs: dict = {}
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3", "-lineinfo", "--extra-device-vectorization"]
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
    with _build_mutex(build_dir):
        return load(
            name=name,
            sources=paths,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            verbose=verbose,
            **kwargs,
        )


def _import_prebuilt(name: str, path: Path) -> ModuleType:
    """The built extension of a cache this process cannot write (a shared, read-only software
    area): torch's load() would fail taking its lock there. The name's hash says the library
    is of these sources, torch and Python."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ExtensionBuildError(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log.info("loaded the prebuilt %s from a read-only cache", path)
    return module


# Lines of a failed build that say what went wrong, best first: a compiler's diagnostic, a
# missing program, a linker's complaint. torch's own first line quotes the whole command.
_CAUSES = (re.compile(r"\berror\b"), re.compile(r"not found|No such file"), re.compile(r"ld: "))
_NOISE = re.compile(r"^(Error building extension|\[\d+/\d+\]|FAILED:|ninja: )")


def _summary(exc: BaseException) -> str:
    """The line of a failed build that says why (torch's message holds ninja's whole log)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if not _NOISE.match(ln)]
    for cause in _CAUSES:
        found = [ln for ln in said if cause.search(ln)]
        if found:
            return f"{type(exc).__name__}: {found[0][:500]}"
    return f"{type(exc).__name__}: {(said or lines or ['?'])[-1][:500]}"


def versioned_name(name: str) -> str:
    """`name` and a hash of every kernel source and header (an include changes the build too),
    the torch version and the Python ABI: the build folder and module name of this code's
    extension."""
    key = hashlib.sha256(f"{torch.__version__} {sys.implementation.cache_tag}".encode())
    for path in sorted(cuda_dir().iterdir()):
        if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
            key.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{name}_{key.hexdigest()[:12]}"


def _load(name: str, sources: tuple[str, ...], cuda: bool, verbose: bool) -> ModuleType:
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        raise ExtensionBuildError(_failed[name])
    t0 = time.perf_counter()
    try:
        mod = _build(versioned_name(name), sources, cuda, verbose)
    except Exception as exc:  # compiler missing, compile error, no CUDA toolkit, ...
        _failed[name] = f"building {name} failed: {_summary(exc)}"
        raise ExtensionBuildError(_failed[name]) from exc
    log.info("loaded %s in %.1f s (cache %s)", mod.__name__, time.perf_counter() - t0, build_root())
    _loaded[name] = mod
    return mod


def load_cpu(verbose: bool = False) -> ModuleType:
    """The fused CPU extension (builds it on the first call of the process if needed)."""
    return _load(CPU_NAME, CPU_SOURCES, cuda=False, verbose=verbose)


def load_cuda(verbose: bool = False) -> ModuleType:
    """The fused CUDA extension (builds it on the first call of the process if needed)."""
    if torch.version.cuda is None:
        raise ExtensionBuildError(
            "this torch build has no CUDA support (torch.version.cuda is None)"
        )
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        raise ExtensionBuildError("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)")
    return _load(CUDA_NAME, CUDA_SOURCES, cuda=True, verbose=verbose)


def load_cpu_adam(verbose: bool = False) -> ModuleType:
    """DeepSpeed's CPU Adam op, the optimizer step of ZeRO-Offload (deepspeed=*_offload).

    DeepSpeed builds it on first use through the same torch mechanism, so a compile killed on
    one job would leave the `lock` that hangs every later one; here it is built under our
    builders' flock with a stale lock cleared, like the WKV extensions.
    """
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except ImportError as exc:
        raise ExtensionBuildError(f"DeepSpeed is not installed: {exc}") from exc
    from torch.utils.cpp_extension import _get_build_directory  # where torch's load() builds

    builder = CPUAdamBuilder()
    build_dir = Path(_get_build_directory(builder.name, verbose))
    with _build_mutex(build_dir):
        try:
            return builder.load(verbose=verbose)
        except Exception as exc:
            raise ExtensionBuildError(
                f"building DeepSpeed's {builder.name} failed: {_summary(exc)}"
            ) from exc


def load_for(device: torch.device) -> ModuleType:
    """The extension for tensors on `device`."""
    return load_cuda() if device.type == "cuda" else load_cpu()
