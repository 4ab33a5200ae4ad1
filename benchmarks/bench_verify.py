"""`python -m data_prep.verify` on a build of several GB: seconds and GB/s per worker count.

A World-scale build is terabytes, so what matters is the rate per GB, read from disk (`--cold`
drops the page cache before each run; that needs root) and from memory. The shards hold
random ids of the installed vocabulary at the build's default shard size (2^28 tokens,
512 MiB), with a manifest as `data_prep.build` writes it, so verify does all its work and
finds nothing wrong. Each run is a fresh `python -m data_prep.verify` process, timed from
outside (start-up included, about 0.3 s).

    python benchmarks/bench_verify.py --gb 4 --workers 1 2 --cold
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.binidx import BinIdxWriter
from data_prep.manifest import (
    MANIFEST,
    empty_source,
    make_manifest,
    sha256_file,
    write_json_atomic,
)
from data_prep.tokenizer import WorldTokenizer, default_vocab_path, read_vocab

SHARD_TOKENS = 1 << 28
DOC_TOKENS = 1 << 20


def write_build(folder: Path, total_bytes: int) -> int:
    """Shards of random token ids, about total_bytes of .bin in all; returns the .bin bytes."""
    tok = WorldTokenizer()
    ids = len(read_vocab(default_vocab_path()))  # the ids in use, fewer than vocab_size
    rng = np.random.default_rng(0)
    source = empty_source("random")
    shards = []
    left = total_bytes // 2
    while left > 0:
        prefix = f"random_train_{len(shards):05d}"
        n_tokens = min(left, SHARD_TOKENS)
        docs = 0
        with BinIdxWriter(folder / prefix) as w:
            for start in range(0, n_tokens, DOC_TOKENS):
                doc = rng.integers(1, ids, min(DOC_TOKENS, n_tokens - start))
                doc[-1] = 0
                w.add_document(doc.astype(np.uint16))
                docs += 1
        shards.append(
            {
                "prefix": prefix,
                "source": "random",
                "split": "train",
                "documents": docs,
                "tokens": n_tokens,
                "sha256_bin": sha256_file(folder / f"{prefix}.bin"),
                "sha256_idx": sha256_file(folder / f"{prefix}.idx"),
            }
        )
        for key in ("documents_in", "documents_written"):
            source[key] += docs
        source["tokens"] += n_tokens
        left -= n_tokens
    info = {"name": tok.name, "vocab_size": tok.vocab_size, "sha256": tok.vocab_sha256()}
    write_json_atomic(folder / MANIFEST, make_manifest(info, shards, [source], {}))
    return sum(s["tokens"] for s in shards) * 2


def drop_page_cache() -> bool:
    """Empty the kernel's page cache so the next run reads from disk (root only)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=4.0, help="size of the shards (.bin) in GB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cold", action="store_true", help="also from disk (needs root)")
    parser.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        size = write_build(Path(tmp), int(args.gb * 1e9))
        print("| .bin GB | workers | page cache | seconds | GB/s |")
        print("|---|---|---|---|---|")
        caches = ["cold", "warm"] if args.cold else ["warm"]
        for cache in caches:
            for workers in args.workers:
                if cache == "cold" and not drop_page_cache():
                    sys.exit("--cold needs root (writes /proc/sys/vm/drop_caches)")
                if cache == "warm":  # read everything once so it is in memory
                    bins = [str(p) for p in Path(tmp).glob("*.bin")]
                    subprocess.run(["cat", *bins], stdout=subprocess.DEVNULL, check=True)
                cmd = [sys.executable, "-m", "data_prep.verify", tmp, f"--workers={workers}"]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                sec = time.perf_counter() - t0
                if done.returncode != 0:
                    sys.exit(f"verify failed:\n{done.stderr}")
                rate = size / sec / 1e9
                print(f"| {size / 1e9:.2f} | {workers} | {cache} | {sec:.2f} | {rate:.2f} |")


if __name__ == "__main__":
    main()
