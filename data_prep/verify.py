"""`python -m data_prep.verify DIR`: check a built corpus against its manifest.

Checks every shard listed in DIR/manifest.json: both files exist, their sha256 match, the index
parses with the uint16 dtype and agrees with the .bin size, document and token counts match
the manifest, every token is a vocabulary id (or 0) and the shard ends with token 0; then the
totals and per-source counts add up, the vocabulary is the one installed, and no shard file
lies in DIR without being listed. Prints every problem found and exits 1 if there was any, so
it can gate a training job.

A World-scale build is terabytes, so each .bin is read once, its checksum and its largest id
taken from the same blocks, and shards are checked on `--workers` threads (hashlib and numpy
release the GIL on large buffers). Progress shows as a bar on a terminal, as a line a minute
in a batch job's log.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import usable_cpus
from data_prep.binidx import BinIdxFormatError, BinIdxReader
from data_prep.manifest import read_manifest, sha256_file
from data_prep.progress import Progress
from data_prep.tokenizer import default_vocab_path, read_vocab

BLOCK = 1 << 23  # bytes read at a time (even, so every block but the last holds whole ids)


def _vocab_limit() -> tuple[int, str | None]:
    """One past the largest id of the installed vocabulary, and that file's sha256."""
    try:
        path = default_vocab_path()
    except FileNotFoundError:
        return 65536, None
    return len(read_vocab(path)), sha256_file(path)


def per_source(manifest: dict[str, Any]) -> dict[str, list[int]]:
    """[documents, tokens] in the shards of each source, as the manifest lists them."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for shard in manifest["shards"]:
        counts[shard["source"]][0] += shard["documents"]
        counts[shard["source"]][1] += shard["tokens"]
    return counts


def verify(
    folder: str | Path,
    checksums: bool = True,
    workers: int = 1,
    on_bytes: Callable[[int], object] | None = None,
) -> list[str]:
    """All problems found in a built corpus folder (an empty list means it is sound).
    `on_bytes` is called with the size of every block read, for a progress bar."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as exc:
        return [str(exc)]
    problems: list[str] = []
    limit, vocab_sha = _vocab_limit()
    tok = manifest["tokenizer"]
    if vocab_sha is not None and tok.get("sha256") != vocab_sha:
        problems.append(
            f"tokenizer: built with vocabulary sha256 {tok.get('sha256')}, "
            f"the installed {tok.get('name')} has {vocab_sha}"
        )
    entry_problems = _check_entries(manifest)
    if entry_problems:  # the entries the checks below read are not all there
        return problems + entry_problems
    tick = on_bytes or (lambda n: None)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # results come back in shard order
        found_per_shard = pool.map(
            lambda shard: _check_shard(folder, shard, checksums, limit, tick), manifest["shards"]
        )
        for shard_problems in found_per_shard:
            problems += shard_problems
    listed = {shard["prefix"] for shard in manifest["shards"]}
    found = per_source(manifest)
    for key, field in (("total_tokens", "tokens"), ("total_documents", "documents")):
        total = sum(s[field] for s in manifest["shards"])
        if key in manifest and total != manifest[key]:
            problems.append(f"{key} is {manifest[key]}, the shards hold {total}")
    for src in manifest["sources"]:
        problems += _check_source(src, found.pop(src["name"], [0, 0]))
    for name in found:
        problems.append(f"shards of source {name!r}, which is not in the sources list")
    unlisted = {
        p.relative_to(folder).with_suffix("").as_posix()
        for p in [*folder.rglob("*.idx"), *folder.rglob("*.bin")]
    }
    for prefix in sorted(unlisted - listed):
        if not prefix.startswith((".", "_")):
            problems.append(f"{prefix}: a shard in the folder that the manifest does not list")
    return problems


SHARD_KEYS = ("prefix", "source", "split", "documents", "tokens", "sha256_bin", "sha256_idx")
SOURCE_KEYS = ("name", "documents_in", "documents_written", "rejected")


def _check_entries(manifest: dict[str, Any]) -> list[str]:
    """Entries of the manifest that lack the keys the checks read, or name another split: a
    hand-edited or foreign manifest is reported, not a KeyError."""
    problems = []
    for i, shard in enumerate(manifest["shards"]):
        missing = [k for k in SHARD_KEYS if not isinstance(shard, dict) or k not in shard]
        if missing:
            problems.append(f"shards[{i}]: no {', '.join(missing)}")
        elif shard["split"] not in ("train", "val"):
            problems.append(f"shard {shard['prefix']}: split {shard['split']!r}, not train or val")
    for i, src in enumerate(manifest["sources"]):
        missing = [k for k in SOURCE_KEYS if not isinstance(src, dict) or k not in src]
        if missing:
            problems.append(f"sources[{i}]: no {', '.join(missing)}")
    return problems


def _read(path: Path, checksum: bool, tick: Callable[[int], object]) -> tuple[str, int]:
    """One pass over a file: its sha256 (empty without `checksum`) and its largest uint16."""
    h = hashlib.sha256()
    top = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            if checksum:
                h.update(block)
            if len(block) >= 2:
                top = max(top, int(np.frombuffer(block, np.uint16, len(block) // 2).max()))
            tick(len(block))
    return (h.hexdigest() if checksum else ""), top


def _check_shard(
    folder: Path,
    shard: dict[str, Any],
    checksums: bool,
    limit: int,
    tick: Callable[[int], object],
) -> list[str]:
    prefix = shard["prefix"]
    where = f"shard {prefix}"
    base = folder / prefix
    bin_path, idx_path = Path(f"{base}.bin"), Path(f"{base}.idx")
    missing = [p.name for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        return [f"{where}: missing {', '.join(missing)}"]
    problems = []
    bin_sha, top = _read(bin_path, checksums, tick)
    if checksums:
        if bin_sha != shard["sha256_bin"]:
            problems.append(f"{where}: .bin checksum differs from the manifest")
        if sha256_file(idx_path) != shard["sha256_idx"]:
            problems.append(f"{where}: .idx checksum differs from the manifest")
    try:
        reader = BinIdxReader(base)
        tokens = reader.tokens
    except (BinIdxFormatError, ValueError) as exc:
        return [*problems, f"{where}: {exc}"]
    if reader.dtype != np.uint16:
        problems.append(f"{where}: dtype {reader.dtype}, expected uint16")
    if len(reader) != shard["documents"]:
        problems.append(f"{where}: {len(reader)} documents, the manifest says {shard['documents']}")
    if len(tokens) != shard["tokens"]:
        problems.append(f"{where}: {len(tokens)} tokens, the manifest says {shard['tokens']}")
    if len(tokens) and int(tokens[-1]) != 0:
        problems.append(f"{where}: does not end with the end-of-document token 0")
    if top >= limit:
        problems.append(f"{where}: token id {top} outside the vocabulary (< {limit})")
    return problems


def _check_source(src: dict[str, Any], found: list[int]) -> list[str]:
    name = src["name"]
    problems = []
    items = src["documents_written"] + src.get("extra_pieces", 0)
    if found[0] != items:
        problems.append(f"source {name}: shards hold {found[0]} documents, expected {items}")
    if "tokens" in src and found[1] != src["tokens"]:
        problems.append(f"source {name}: shards hold {found[1]} tokens, expected {src['tokens']}")
    counted = src["documents_written"] + sum(src["rejected"].values())
    if counted != src["documents_in"]:
        problems.append(
            f"source {name}: {src['documents_in']} documents in, but written + rejected = {counted}"
        )
    return problems


def _shard_bytes(folder: str | Path) -> int:
    """The size of the .bin files the manifest lists (0 if it cannot be read): the work."""
    try:
        shards = read_manifest(folder)["shards"]
    except (OSError, ValueError, KeyError):
        return 0
    paths = (Path(folder) / f"{s['prefix']}.bin" for s in shards)
    return sum(p.stat().st_size for p in paths if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Command line: exit status 0 when the folder is sound, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__)
    parser.add_argument("folder", help="a build's output_dir (holding manifest.json)")
    parser.add_argument("--no-checksums", action="store_true", help="skip the sha256 checks")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, usable_cpus()),
        help="shards checked at once (default: the usable CPUs, at most 8)",
    )
    args = parser.parse_args(argv)
    with Progress("verify", total=_shard_bytes(args.folder)) as bar:
        problems = verify(args.folder, not args.no_checksums, args.workers, bar.update)
    if problems:
        for p in problems:
            print(f"verify: {p}", file=sys.stderr)
        print(f"verify: {args.folder}: FAILED ({len(problems)} problems)", file=sys.stderr)
        return 1
    manifest = read_manifest(args.folder)
    total = manifest["total_tokens"]
    print(f"verify: {args.folder}: OK, {len(manifest['shards'])} shards, {total} tokens")
    val: dict[str, int] = defaultdict(int)  # what the trainer validates each source on
    for shard in manifest["shards"]:
        if shard.get("split") == "val":
            val[shard["source"]] += shard["tokens"]
    for name, (docs, tokens) in per_source(manifest).items():  # the build's natural mixture
        share = 100 * tokens / total if total else 0.0
        line = f"{docs} documents, {tokens} tokens ({share:.2f} %), {val[name]} of them val"
        print(f"  {name}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
