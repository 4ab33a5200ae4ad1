"""Build the fused WKV extensions once, ahead of a run: `python -m rwkv_train.ops.build`.

Slurm scripts run this on one process before `srun`, so hundreds of ranks find the compiled
extension in TORCH_EXTENSIONS_DIR (point it at a shared filesystem) instead of compiling at
once. A build lock left by a killed compile is cleared with a message (see loader.py). The
target `cpu_adam` is DeepSpeed's CPU Adam op, which the offload configs step with.
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
        nargs="+",
        choices=("auto", "cpu", "cuda", "all", "cpu_adam"),
        default=["auto"],
        help="auto: cpu, plus cuda when this torch has CUDA and a toolkit is found (then a "
        "failed cuda build fails); all: cpu and cuda; cpu_adam: DeepSpeed's CPU Adam "
        "(deepspeed=*_offload)",
    )
    p.add_argument("--arch", help="CUDA archs without a visible GPU, e.g. '8.0;9.0'")
    p.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    builders = {"cpu": loader.load_cpu, "cuda": loader.load_cuda, "cpu_adam": loader.load_cpu_adam}
    # auto skips cuda where it cannot be built at all; a failed build is a failure anyway
    from torch.utils.cpp_extension import CUDA_HOME

    no_toolchain = torch.version.cuda is None or CUDA_HOME is None
    targets: dict[str, bool] = {}  # target -> optional (may be skipped)
    for t in args.target:
        for name in ("cpu", "cuda") if t in ("auto", "all") else (t,):
            optional = t == "auto" and name == "cuda" and no_toolchain
            targets[name] = targets.get(name, True) and optional
    print(f"extension cache: {loader.build_root()}")
    failed = False
    for target, optional in targets.items():
        t0 = time.perf_counter()
        try:
            builders[target](verbose=args.verbose)
        except loader.ExtensionBuildError as exc:
            print(f"{target}: {'skipped' if optional else 'FAILED'}: {exc}")
            failed |= not optional
            continue
        print(f"{target}: ready in {time.perf_counter() - t0:.1f} s (torch {torch.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
