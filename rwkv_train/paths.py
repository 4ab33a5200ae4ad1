"""Where the shipped configs and kernel sources live.

In a source checkout (editable install) they sit at the top of the repository, beside the
package; a wheel carries them inside the package (see pyproject.toml), so both layouts are
searched, package first.
"""

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"cannot find the '{name}' folder next to or inside {_PKG}; the installation is incomplete"
    )


def conf_dir() -> Path:
    """The Hydra config root (conf/)."""
    return _find("conf")


def cuda_dir() -> Path:
    """The kernel sources (cuda/)."""
    return _find("cuda")
