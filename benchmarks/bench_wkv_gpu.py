"""GPU benchmark of the fused WKV kernels against flash-linear-attention (fla), one run.

    python benchmarks/bench_wkv_gpu.py --out DIR  # on a CUDA machine
    python benchmarks/bench_wkv_gpu.py --dry-run  # tiny shapes on the CPU, to test the script
    python benchmarks/bench_wkv_gpu.py --baseline OLD_CUDA_DIR --out DIR  # also time old kernels

For each shape (B=8, T=4096, H=40, N=64: the Finch 3B layer; B=2, T=4096, H=40: that layer at
the micro-batch of conf/experiment/finch_3b.yaml; and B=1, T=16384, H=40), bf16:
forward and forward+backward times (CUDA events, median after warm-up, so Triton's autotuning
is done before timing) of ours (wkv6, wkv5; "ours_wkv6_unsplit" is the kernel without the time
segments `ops/segments.py` adds where B x H leaves SMs idle, "ours_wkv6_segN" the op forced into
N segments at B=1 and 2) and fla's `chunk_rwkv6` and
`fused_recurrent_rwkv6` (w passed as the log decay -exp(w), scale 1.0), with achieved GB/s and
TFLOP/s against the card's ceilings measured here (a device copy, a bf16 matrix product).
--baseline times a second copy of the CUDA sources (e.g. the previous commit's cuda/) as
"baseline_wkv6", so a kernel change is measured against its predecessor in the same run.
Accuracy: relative error of each against the float64 recurrence at a shorter T (output and
gradients). Needs torch only; fla is optional (skipped with a note if it does not import).
Every part is guarded, so one failure does not stop the rest; results go to stdout and, with
--out, to bench_wkv_gpu.json / .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.ops import fused, loader, segments
from rwkv_train.ops.testing import compare, make_case

RESULTS: dict = {"device": None, "ceilings": {}, "timings": [], "errors": [], "notes": []}
OUT: Path | None = None  # --out: results are rewritten there after every row


def save() -> None:
    """Write what is measured so far, so a run cut off by a time limit keeps its rows."""
    if OUT is not None:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "bench_wkv_gpu.json").write_text(json.dumps(RESULTS, indent=1))
        (OUT / "bench_wkv_gpu.md").write_text(markdown() + "\n")


def note(msg: str) -> None:
    print(msg, flush=True)
    RESULTS["notes"].append(msg)


def guarded(label: str, fn: Callable, *args, **kwargs):
    """Run one part; on failure print the traceback, record it and carry on."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # one failing part must not stop the others
        traceback.print_exc()
        note(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:300]}")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return None


def timer(fn: Callable, device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() after `warmup` calls (events on CUDA, clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- ceilings
def measure_ceilings(device: str, small: bool) -> None:
    n = (1 << 20) if small else (1 << 30)  # bytes per buffer
    x = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x), device, 3, 10)
    gbs = 2 * n / ms / 1e6  # read + write
    m = 256 if small else 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    ms_mm = timer(lambda: a @ b, device, 3, 10)
    tflops = 2 * m**3 / ms_mm / 1e9
    RESULTS["ceilings"] = {"copy_GBps": gbs, "bf16_matmul_TFLOPs": tflops}
    note(f"ceilings: device copy {gbs:.0f} GB/s (read+write), bf16 matmul {tflops:.0f} TFLOP/s")


# ----------------------------------------------------------------------------- implementations
def import_fla():
    try:
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
    except Exception as exc:
        note(f"fla not available ({type(exc).__name__}: {exc}); its rows are skipped")
        return {}
    return {"fla_chunk": chunk_rwkv6, "fla_fused_recurrent": fused_recurrent_rwkv6}


def load_baseline(src: Path) -> Callable:
    """wkv6 of the CUDA sources in `src`, built as a separate extension, with autograd."""
    from torch.utils.cpp_extension import load

    paths = [str(src / name) for name in loader.CUDA_SOURCES]
    mod = load(
        name="rwkv_wkv_cuda_baseline",
        sources=paths,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--extra-device-vectorization"],
        extra_include_paths=[str(src)],
    )

    class Baseline(torch.autograd.Function):
        @staticmethod
        def forward(ctx, r, k, v, w, u, s0):
            ctx.save_for_backward(r, k, v, w, u, s0)
            return tuple(mod.wkv56_forward(r, k, v, w, u, s0, False))

        @staticmethod
        def backward(ctx, gy, gsT):
            r, k, v, w, u, s0 = ctx.saved_tensors
            return tuple(
                mod.wkv56_backward(r, k, v, w, u, s0, gy.contiguous(), gsT.contiguous(), False)
            )

    return Baseline.apply


def impls(fla: dict, baseline: Callable | None) -> dict[str, Callable]:
    """name -> f(r, k, v, w_raw, u, s0) -> (y, sT); fla gets the log decay -exp(w) in fp32."""
    out: dict[str, Callable] = {"ours_wkv6": fused.wkv6, "ours_wkv6_unsplit": torch.ops.rwkv.wkv6}
    if baseline is not None:
        out["baseline_wkv6"] = baseline
    for name, fn in fla.items():

        def call(r, k, v, w, u, s0, _fn=fn):
            logd = -torch.exp(w.float())
            return _fn(
                r, k, v, logd, u.to(r.dtype), scale=1.0, initial_state=s0, output_final_state=True
            )

        out[name] = call
    return out


# ----------------------------------------------------------------------------- accuracy
def accuracy(fns: dict[str, Callable], device: str, small: bool) -> None:
    B, T, H = (1, 16, 2) if small else (2, 256, 4)
    for dtype in (torch.bfloat16, torch.float32):
        case = make_case("wkv6", B=B, T=T, H=H, dtype=dtype, device=device, seed=11)
        split4 = {"ours_wkv6_4_segments": split_into(4)}
        for name, fn in {**fns, **split4}.items():
            errs = guarded(f"accuracy {name} {dtype}", compare, case, fn)
            if errs is None:
                continue
            row = {"impl": name, "dtype": str(dtype).split(".")[-1], "B": B, "T": T, "H": H}
            row.update(errs)
            RESULTS["errors"].append(row)
            worst = max(errs.values())
            note(
                f"error vs float64 {name:22s} {row['dtype']:8s} T={T}: y {errs['y']:.2e} "
                f"state {errs['state_out']:.2e} grads max {worst:.2e} (g_w {errs['g_w']:.2e})"
            )
        case5 = make_case("wkv5", B=B, T=T, H=H, dtype=dtype, device=device, seed=12)
        errs = guarded(f"accuracy wkv5 {dtype}", compare, case5, fused.wkv5)
        if errs:
            note(f"error vs float64 ours_wkv5 {str(dtype)[6:]}: max {max(errs.values()):.2e}")
            RESULTS["errors"].append({"impl": "ours_wkv5", "dtype": str(dtype)[6:], **errs})
        save()


# ----------------------------------------------------------------------------- speed
def flops_bytes(B: int, T: int, H: int, N: int, backward: bool) -> tuple[float, float]:
    """Work of the recurrent form and the fewest bytes moved (bf16 in/out, fp32 state).

    Forward: y_t = r_t S + bonus and S update, 4 N^2 flops per token and head; the backward
    is counted as twice that. Bytes: r, k, v, w read and y written once (forward), plus gy
    read and gr, gk, gv, gw written (backward); states are negligible at these T.
    """
    tok = B * T * H
    fl = 4 * N * N * tok * (3 if backward else 1)
    by = 2 * N * tok * (5 + (5 + 4 if backward else 0))
    return fl, by


def speed(fns: dict[str, Callable], device: str, small: bool, reps: int) -> None:
    shapes = [(1, 32, 2, 64), (1, 64, 2, 64)]
    if not small:
        shapes = [(8, 4096, 40, 64), (2, 4096, 40, 64), (1, 16384, 40, 64)]
    # Ours (and the baseline) at every shape before fla at any: fla's autotuning may use up
    # what a short GPU lease has left.
    todo = {"ours_wkv6": fns["ours_wkv6"], "ours_wkv5": fused.wkv5, **fns}
    ours = [n for n in todo if not n.startswith("fla")]
    cases = {  # drawn once: a few GB at most, and drawing them takes seconds per shape
        (shape, op): make_case(op, *shape, dtype=torch.bfloat16, device=device).args
        for shape in shapes
        for op in ("wkv6", "wkv5")
    }
    # ours_wkv6 forced into n time segments, at the shapes with few (batch, head) pairs: the
    # rule in ops/segments.py (how many segments, from which B x H on) is tuned from these.
    forced = {f"ours_wkv6_seg{n}": n for n in (4, 8, 16)}
    for group in (ours, list(forced), [n for n in todo if n not in ours]):
        for B, T, H, N in shapes:
            for name in group:
                n_seg = forced.get(name)
                if n_seg and (B * H > 128 or T % n_seg):
                    continue
                op = "wkv5" if name == "ours_wkv5" else "wkv6"
                args = cases[(B, T, H, N), op]
                fn = split_into(n_seg) if n_seg else todo[name]
                label = f"speed {name} {B}x{T}"
                guarded(label, time_one, name, fn, args, (B, T, H, N), device, reps)
                if device == "cuda":
                    torch.cuda.empty_cache()


def split_into(n: int) -> Callable:
    """wkv6 over n time segments whatever the segment rule says."""
    return lambda r, k, v, w, u, s0: segments.wkv56(r, k, v, w, u, s0, n, False)


def time_one(name, fn, args, shape, device, reps) -> None:
    B, T, H, N = shape
    r, k, v, w, u, s0 = args

    def fwd():
        with torch.no_grad():
            fn(r, k, v, w, u, s0)

    leaves = [x.detach().clone().requires_grad_() for x in (r, k, v, w, u, s0)]
    gy = torch.randn_like(r)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        y, sT = fn(*leaves)
        torch.autograd.backward([y, sT], [gy, torch.zeros_like(sT)])

    warm = 3 if device == "cuda" else 1
    t_f = timer(fwd, device, warm, reps)
    t_fb = timer(fwd_bwd, device, warm, reps)
    ceil = RESULTS["ceilings"]
    for mode, ms in (("fwd", t_f), ("fwd+bwd", t_fb)):
        fl, by = flops_bytes(B, T, H, N, mode != "fwd")
        row = {
            "impl": name,
            "mode": mode,
            "B": B,
            "T": T,
            "H": H,
            "N": N,
            "ms": ms,
            "Mtok_s": B * T / ms / 1e3,
            "GBps": by / ms / 1e6,
            "TFLOPs": fl / ms / 1e9,
        }
        if ceil:
            row["pct_bw"] = 100 * row["GBps"] / ceil["copy_GBps"]
            row["pct_flops"] = 100 * row["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
        RESULTS["timings"].append(row)
        note(
            f"{name:22s} {mode:8s} B={B} T={T} H={H}: {ms:8.3f} ms  {row['Mtok_s']:7.2f} Mtok/s"
            f"  {row['GBps']:7.1f} GB/s  {row['TFLOPs']:6.2f} TFLOP/s"
        )
    save()


# ----------------------------------------------------------------------------- report
def markdown() -> str:
    lines = [f"device: {RESULTS['device']}", f"ceilings: {RESULTS['ceilings']}", ""]
    lines += ["| impl | mode | B | T | H | ms | Mtok/s | GB/s | TFLOP/s |", "|" + "---|" * 9]
    for r in RESULTS["timings"]:
        lines.append(
            f"| {r['impl']} | {r['mode']} | {r['B']} | {r['T']} | {r['H']} | {r['ms']:.3f} | "
            f"{r['Mtok_s']:.2f} | {r['GBps']:.0f} | {r['TFLOPs']:.2f} |"
        )
    lines += ["", "| impl | dtype | y | state | g_r | g_k | g_v | g_w | g_u | g_state |"]
    lines += ["|" + "---|" * 10]
    for e in RESULTS["errors"]:
        cols = ["y", "state_out", "g_r", "g_k", "g_v", "g_w", "g_u", "g_state"]
        lines.append(
            f"| {e['impl']} | {e['dtype']} | "
            + " | ".join(f"{e.get(c, float('nan')):.1e}" for c in cols)
            + " |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for bench_wkv_gpu.json / .md")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (script test)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--baseline", type=Path, help="folder of other CUDA sources to time too")
    args = p.parse_args()
    global OUT
    OUT = args.out
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    small = device == "cpu"
    if small and not args.dry_run:
        note("no CUDA device: running the tiny CPU dry run")
    RESULTS["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    note(f"device {RESULTS['device']}, torch {torch.__version__}")
    t0 = time.perf_counter()
    ok = guarded("build", loader.load_for, torch.device(device))
    note(
        f"extension for {device}: {'ready' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s"
    )
    if ok is None:
        return 1
    fla = import_fla() if device == "cuda" else {}
    baseline = None
    if args.baseline and device == "cuda":
        t0 = time.perf_counter()
        baseline = guarded("baseline build", load_baseline, args.baseline)
        note(f"baseline from {args.baseline}: built in {time.perf_counter() - t0:.1f} s")
    fns = impls(fla, baseline)
    guarded("ceilings", measure_ceilings, device, small)
    # Speed first: fla's Triton autotuning and the float64 references are slow, and the
    # timings are what a short GPU lease must not lose.
    guarded("speed", speed, fns, device, small, 2 if small else args.reps)
    guarded("accuracy", accuracy, fns, device, small)
    print("\n" + markdown())
    save()
    failed = [n for n in RESULTS["notes"] if n.startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
