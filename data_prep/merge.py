"""`python -m data_prep.merge DIR [PART ...]`: one manifest for the parts of a cluster build.

A large corpus is built as n independent jobs (`shard_index=i num_shards=n`), each writing its
own folder with its own manifest.json. Merging lists every part's shards in DIR/manifest.json
with prefixes relative to DIR, and sums the per-source counters; shards are never copied or
concatenated. Parts default to the sub-folders of DIR that hold a manifest. The parts must have
the same tokenizer, inputs and settings (their .state/build.json differ in shard_index only),
and together be parts 0..n-1 of the same n.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from data_prep.fingerprint import describe_difference
from data_prep.manifest import MANIFEST, make_manifest, read_manifest, write_json_atomic
from data_prep.shards import STATE_DIR


class MergeError(ValueError):
    """Parts that do not belong together."""


def _fingerprint(part: Path) -> dict[str, Any]:
    """What decided a part's bytes (tokenizer, inputs, settings) but its shard_index."""
    path = part / STATE_DIR / "build.json"
    if not path.is_file():
        raise MergeError(f"{part}: no {STATE_DIR}/build.json, so its inputs cannot be checked")
    fingerprint = json.loads(path.read_text(encoding="utf-8"))
    fingerprint.pop("shard_index", None)
    return fingerprint


def merge(out_dir: str | os.PathLike, parts: list[str | os.PathLike] | None = None) -> dict:
    """Write OUT/manifest.json covering the given part folders; returns it."""
    out = Path(out_dir)
    if not parts:
        parts = sorted(p.parent for p in out.glob(f"*/{MANIFEST}"))
    if not parts:
        raise MergeError(f"no part folders with a {MANIFEST} under {out}")
    manifests = [(Path(p), read_manifest(p)) for p in parts]
    first = manifests[0][1]
    common = {k: v for k, v in first["build"].items() if k != "shard_index"}
    first_fingerprint = _fingerprint(manifests[0][0])
    indices = []
    for path, m in manifests:
        difference = describe_difference(first_fingerprint, _fingerprint(path))
        if difference:
            raise MergeError(
                f"{path}: built with other inputs or settings than {manifests[0][0]} ({difference})"
            )
        indices.append(m["build"].get("shard_index", 0))
    n = common.get("num_shards", 1)
    if sorted(indices) != list(range(n)):
        raise MergeError(f"parts {sorted(indices)} are not exactly parts 0..{n - 1} of {n}")

    shards: list[dict[str, Any]] = []
    sources: dict[str, dict[str, Any]] = {}
    for path, m in sorted(manifests, key=lambda pm: pm[1]["build"].get("shard_index", 0)):
        rel = Path(os.path.relpath(path, out))
        for shard in m["shards"]:
            shards.append({**shard, "prefix": (rel / shard["prefix"]).as_posix()})
        for src in m["sources"]:
            acc = sources.get(src["name"])
            if acc is None:
                sources[src["name"]] = {**src, "rejected": dict(src["rejected"])}
                continue
            for key, value in src.items():
                if isinstance(value, int):
                    acc[key] += value
            for reason, count in src["rejected"].items():
                acc["rejected"][reason] = acc["rejected"].get(reason, 0) + count
    for acc in sources.values():
        acc["rejected"] = dict(sorted(acc["rejected"].items()))
    build = {**common, "parts": [os.path.relpath(p, out) for p, _ in manifests]}
    manifest = make_manifest(first["tokenizer"], shards, list(sources.values()), build)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line; exit status 1 with a message when the parts do not fit together."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.merge", description=__doc__)
    parser.add_argument("out_dir", help="folder for the merged manifest.json")
    parser.add_argument("parts", nargs="*", help="part folders (default: OUT_DIR/*/)")
    args = parser.parse_args(argv)
    try:
        m = merge(args.out_dir, args.parts)
    except (MergeError, OSError, ValueError) as exc:
        print(f"merge: {exc}", file=sys.stderr)
        return 1
    print(f"merge: {len(m['shards'])} shards, {m['total_tokens']} tokens -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
