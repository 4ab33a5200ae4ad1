"""Build the fused WKV extensions once, ahead of a run: `python -m rwkv_train.ops.build`.

Slurm scripts run this on one process before `srun`, so hundreds of ranks find the compiled
extension in TORCH_EXTENSIONS_DIR (point it at a shared filesystem) instead of compiling at
once. A build lock left by a killed compile is cleared with a message (see loader.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

from rwkv_train.ops import loader


def main(argv: list[str] | None = None) -> int:
    """Build the requested extensions; exit status 1 if one that was asked for fails."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--target",
        choices=("auto", "cpu", "cuda", "all"),
        default="auto",
        help="auto: cpu, plus cuda when this torch has CUDA and a toolkit is found",
    )
    p.add_argument("--arch", help="CUDA archs without a visible GPU, e.g. '8.0;9.0'")
    p.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    targets = ["cpu", "cuda"] if args.target in ("all", "auto") else [args.target]
    print(f"extension cache: {loader.build_root()}")
    failed = False
    for target in targets:
        t0 = time.perf_counter()
        try:
            (loader.load_cuda if target == "cuda" else loader.load_cpu)(verbose=args.verbose)
        except loader.ExtensionBuildError as exc:
            optional = args.target == "auto" and target == "cuda"
            print(f"{target}: {'skipped' if optional else 'FAILED'}: {exc}")
            failed |= not optional
            continue
        print(f"{target}: ready in {time.perf_counter() - t0:.1f} s (torch {torch.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
