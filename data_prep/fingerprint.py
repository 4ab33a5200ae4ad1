"""What decides a build's bytes, and how two builds differ, in words.

A build records its fingerprint (tokenizer, sources, settings, and a stamp of every input
file) in .state/build.json. A rerun compares it with its own to resume only the same build,
and data_prep.merge compares the parts of a cluster build, whose fingerprints differ in
shard_index only; either refusal names the first difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def stamp(path: str) -> dict[str, Any]:
    """What tells that an input changed without reading it: size and modification time (of
    every file in a folder input)."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    stats = [f.stat() for f in files]
    return {
        "path": path,
        "size": sum(st.st_size for st in stats),
        "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
    }


def few(names: list[str]) -> str:
    """Up to three names of a list, for a message."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return (", ".join(names[:3]) + more) or "none"


def describe_difference(old: dict, new: dict) -> str:
    """What differs between two build fingerprints, in words ("" when nothing does)."""
    old_files = {f["path"]: f for f in old.get("files", []) if isinstance(f, dict)}
    for f in new.get("files", []):
        before = old_files.get(f["path"])
        if before is not None and before != f:
            return f"input {f['path']} changed since: its size or modification time differs"
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key), new.get(key)
        if was == now:
            continue
        if key == "files":
            was_paths = {f["path"] if isinstance(f, dict) else f for f in was or []}
            now_paths = {f["path"] for f in now or []}
            added, removed = sorted(now_paths - was_paths), sorted(was_paths - now_paths)
            return f"inputs added: {few(added)}; removed: {few(removed)}"
        if key == "sources":
            was_names, now_names = [s["name"] for s in was or []], [s["name"] for s in now or []]
            if was_names != now_names:
                return f"sources were {few(was_names)}, now {few(now_names)}"
            for a, b in zip(was, now, strict=True):
                for name in sorted(set(a) | set(b)):
                    if a.get(name) != b.get(name):
                        return (
                            f"source {b['name']}: {name} was {a.get(name)!r}, now {b.get(name)!r}"
                        )
        return f"{key} was {was!r}, now {now!r}"
    return ""
