"""Building and loading the compiled tokenizer core (tokenizer_core.cpp).

The core is compiled on first use through torch.utils.cpp_extension (ninja, cached under
TORCH_EXTENSIONS_DIR, rebuilt when the source changes), never at import. It is written against
the plain CPython API and linked with --as-needed, so the library needs no torch at run time:
after a build, a small pointer file next to the extension cache (named by a hash of the source
and the Python version) lets later processes, and the build's workers, load the library
directly without paying about 2 s for importing torch.

Under REQUIRE_CPP_OPS=1 (set in CI) a core that cannot be built is an error instead of a quiet
fall-back to the pure-Python tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "tokenizer_core.cpp"
NAME = "rwkv_world_tokenizer_core"

_loaded: dict[str, ModuleType] = {}


def cpp_required() -> bool:
    """True when the environment demands the compiled core (CI sets REQUIRE_CPP_OPS=1)."""
    return os.environ.get("REQUIRE_CPP_OPS", "") not in ("", "0")


def _pointer_path() -> Path:
    """Where the location of the built library is remembered, keyed by source and Python."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions"
    )
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(f"{sys.implementation.cache_tag}-{sys.platform}".encode())
    return Path(root) / f"{NAME}-{key.hexdigest()[:16]}.json"


def _load_from_pointer() -> ModuleType | None:
    try:
        info = json.loads(_pointer_path().read_text())
        return load_core_file(info["path"], info["name"])
    except (OSError, ValueError, KeyError, ImportError):
        return None


def build_core(verbose: bool = False) -> ModuleType:
    """Compile (or reuse the cached build of) the core and import it; raises on failure."""
    if "built" in _loaded:
        return _loaded["built"]
    module = _load_from_pointer()
    if module is not None:
        _loaded["built"] = module
        return module
    from torch.utils.cpp_extension import load  # heavy import, only when building

    module = load(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-std=c++17"],
        # Drop the torch libraries the helper adds: the core uses none of them.
        extra_ldflags=["-Wl,--as-needed"],
        is_python_module=True,
        verbose=verbose,
    )
    _loaded["built"] = module
    _loaded[str(module.__file__)] = module
    try:
        pointer = _pointer_path()
        tmp = pointer.with_name(f"{pointer.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(module.__file__), "name": module.__name__}))
        os.replace(tmp, pointer)
    except OSError as exc:  # only a missed shortcut for later processes
        log.debug("cannot record the tokenizer core location: %s", exc)
    return module


def load_core_file(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """Import an already built core from its file, without torch.

    `name` is the module name it was built under (by default the file name's stem).
    """
    key = str(path)
    if key in _loaded:
        return _loaded[key]
    name = name or Path(path).name.split(".")[0]
    loader = importlib.machinery.ExtensionFileLoader(name, key)
    spec = importlib.util.spec_from_file_location(name, key, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load the tokenizer core from {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    _loaded[key] = module
    return module


def get_core(path: str | os.PathLike | None = None) -> ModuleType | None:
    """The compiled core, or None when it cannot be built (an error under REQUIRE_CPP_OPS=1).

    `path` names a built library to load directly (what a parent process hands its workers).
    """
    try:
        return load_core_file(path) if path else build_core()
    except Exception as exc:  # a missing compiler, torch or headers: fall back, loudly
        if cpp_required():
            raise RuntimeError(
                f"REQUIRE_CPP_OPS is set but the tokenizer core cannot be built: {exc}"
            ) from exc
        log.warning("tokenizer core unavailable (%s); using the pure-Python tokenizer", exc)
        return None
