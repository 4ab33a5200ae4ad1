"""End-to-end data prep: .jsonl.zst in, verified binidx shards out; MB/s and peak memory.

The input is the tokenizer benchmark's mixed text (standard-library sources and CJK texts) as
JSON lines, repeated to the requested sizes and compressed with zstd. Each build runs in its
own process (`data_prep.build.build`, timed inside, so interpreter start-up is excluded) while
this script samples the resident memory of the main process and of every worker. Peak memory
at two input sizes 10x apart shows whether memory stays flat.

    python benchmarks/bench_data_prep.py --mb 10 100 --workers 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenizer import mixed_documents

RUNNER = """
import json, sys, time
from data_prep.build import BuildConfig, build
cfg = BuildConfig(output_dir=sys.argv[1], inputs=[sys.argv[2]], workers=int(sys.argv[3]),
                  progress=False, overwrite=True)
t0 = time.perf_counter()
m = build(cfg)
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": m["total_tokens"]}))
"""


def make_input(path: Path, total_bytes: int) -> int:
    """Write about total_bytes of JSON lines as .jsonl.zst; return the uncompressed size."""
    docs = mixed_documents(min(total_bytes, 20_000_000), cjk_share=0.1)
    cctx = zstandard.ZstdCompressor(level=3)
    size = 0
    with open(path, "wb") as f, cctx.stream_writer(f) as w:
        i = 0
        while size < total_bytes:
            line = (json.dumps({"text": docs[i % len(docs)]}, ensure_ascii=False) + "\n").encode()
            w.write(line)
            size += len(line)
            i += 1
    return size


def run_build(out: Path, src: Path, workers: int) -> tuple[dict, float, float]:
    """Run one build; returns its result, peak RSS of the main process and of any worker (MB)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(out), str(src), str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    main = psutil.Process(proc.pid)
    peak_main = peak_worker = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):  # processes come and go while we look
            peak_main = max(peak_main, main.memory_info().rss)
            for child in main.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    peak_worker = max(peak_worker, child.memory_info().rss)
        time.sleep(0.02)
    out_text = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"build failed with status {proc.returncode}")
    return json.loads(out_text.strip().splitlines()[-1]), peak_main / 2**20, peak_worker / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, nargs="+", default=[10.0, 100.0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores")
    print("| input | workers | seconds | MB/s | M tokens/s | peak RSS main | peak RSS/worker |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for mb in args.mb:
            src = Path(tmp) / f"input_{mb:g}MB.jsonl.zst"
            size = make_input(src, int(mb * 1e6))
            for workers in args.workers:
                out = Path(tmp) / f"out_{mb:g}_{workers}"
                res, rss_main, rss_worker = run_build(out, src, workers)
                sec = res["seconds"]
                worker_col = f"{rss_worker:.0f} MB" if workers > 1 else "(in main)"
                print(
                    f"| {size / 1e6:.0f} MB | {workers} | {sec:.2f} | {size / sec / 1e6:.1f} | "
                    f"{res['tokens'] / sec / 1e6:.2f} | {rss_main:.0f} MB | {worker_col} |"
                )


if __name__ == "__main__":
    main()
