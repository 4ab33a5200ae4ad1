"""CPU speed of the WKV6 implementations: forward and forward+backward tokens/s.

    python benchmarks/bench_wkv.py                       # B=2, H=4, N=64, T=512 and 2048
    python benchmarks/bench_wkv.py --T 512 --backends torch,cpp --repeats 5

tokens/s = B*T / time of one call (the best of --repeats after one warm-up call; a call
slower than 15 s / --repeats is timed once), fp32,
--threads torch threads (2 by default, like CI). "fwd+bwd" runs the forward and the backward
with random cotangents for y and the final state, with gradients into r, k, v, w, u and the
initial state. Rows:

* reference: the per-timestep loop in rwkv_train.ops.reference (the maths the tests trust);
* every backend name in --backends, called through rwkv_train.ops.wkv6(..., backend=name);
  a backend that raises (not built, no compiler, ...) is listed as skipped with the reason.

The table ends with the figures of existing implementations measured on a 2-core machine
(from the project's RWKV reference notes) for comparison; only rows measured in the same run
are comparable with each other. Imports only torch and rwkv_train.ops.
"""

import argparse
import time
from collections.abc import Callable

import torch

from rwkv_train.ops import wkv6
from rwkv_train.ops.reference import wkv6_reference

# Figures of existing implementations: (name, fwd 512, fwd+bwd 512, fwd 2048, fwd+bwd 2048),
# tokens/s on a 2-core machine, torch 2.13 CPU, 2 threads, fp32, B=2, H=4, N=64.
EXISTING = [
    ("plain per-timestep PyTorch loop", "52K", "6.3K", "50K", "2.9K"),
    ("fla `naive_recurrent_rwkv6`", "45K", "6.2K", "45K", "2.0K"),
    ("fla `naive_chunk_rwkv6` (chunk 32; no backward)", "127K", "—", "111K", "—"),
    ("infctx trainer `rwkv_inner` (chunk 128, fp64 inside)", "285K", "89K", "243K", "85K"),
]

WKV = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> list[torch.Tensor]:
    """r, k, v, w, u, state at typical magnitudes; w spans the decays seen in trained models."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = torch.rand(B, T, H, N, generator=g) * 7 - 6  # d = exp(-exp(w)), w in [-6, 1]
    u = torch.randn(H, N, generator=g) * 0.5
    s0 = torch.randn(B, H, N, N, generator=g) * 0.1
    return [r, k, v, w, u, s0]


def time_call(fn: Callable[[], object], repeats: int, budget_s: float = 15.0) -> float:
    """Best wall time of `repeats` calls after one warm-up call.

    A call so slow that the repeats would exceed `budget_s` (the per-step loop at T = 2048)
    is timed once: the warm-up call is the figure, which keeps the whole run to minutes.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first * repeats > budget_s:
        return first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(f: WKV, B: int, T: int, H: int, N: int, repeats: int) -> tuple[float, float]:
    """(forward tokens/s, forward+backward tokens/s) of one implementation."""
    inputs = make_inputs(B, T, H, N)
    gy = torch.randn(B, T, H, N)
    gs = torch.randn(B, H, N, N)

    def fwd() -> None:
        with torch.no_grad():
            f(*inputs)

    leaves = [x.clone().requires_grad_() for x in inputs]

    def fwd_bwd() -> None:
        y, s = f(*leaves)
        torch.autograd.backward([y, s], [gy, gs])
        for x in leaves:
            x.grad = None

    tokens = B * T
    return tokens / time_call(fwd, repeats), tokens / time_call(fwd_bwd, repeats)


def implementations(backends: list[str]) -> dict[str, WKV]:
    """The reference loop plus each backend through the public entry point."""
    impls: dict[str, WKV] = {"reference": wkv6_reference}
    for name in backends:

        def call(*args: torch.Tensor, _name: str = name) -> tuple[torch.Tensor, torch.Tensor]:
            return wkv6(*args, backend=_name)

        impls[name] = call
    return impls


def fmt(x: float | None) -> str:
    """Tokens/s as 12.3K."""
    return "—" if x is None else f"{x / 1e3:.1f}K"


def main() -> None:
    """Parse arguments, measure, print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[512, 2048], help="sequence lengths")
    p.add_argument(
        "--backends", default="torch,cpp", help="comma-separated backends of wkv6 to time"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed calls per figure (best kept)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--N", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b]

    results: dict[str, dict[int, tuple[float, float]]] = {}
    skipped: dict[str, str] = {}
    for name, f in implementations(backends).items():
        for i, T in enumerate(args.T):
            try:
                if i == 0:  # builds or loads an extension outside the timed calls
                    f(*make_inputs(1, 16, 1, args.N))
                results.setdefault(name, {})[T] = measure(
                    f, args.B, T, args.H, args.N, args.repeats
                )
            except Exception as e:  # a backend that cannot run here
                skipped[name] = f"{type(e).__name__}: {e}".splitlines()[0]
                results.pop(name, None)
                break
            print(f"# measured {name} T={T}", flush=True)

    print(
        f"\nWKV6 on CPU, torch {torch.__version__}, {args.threads} threads, fp32, "
        f"B={args.B}, H={args.H}, N={args.N}; tokens/s = B*T / best of {args.repeats}\n"
    )
    cols = [f"{kind} T={T}" for T in args.T for kind in ("fwd", "fwd+bwd")]
    print("| implementation | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, by_T in results.items():
        cells = [fmt(x) for T in args.T for x in by_T[T]]
        print(f"| {name} (this run) | " + " | ".join(cells) + " |")
    for name, reason in skipped.items():
        print(f"| {name} (this run) | skipped: {reason} |" + " |" * (len(cols) - 1))
    if sorted(args.T) == [512, 2048] and (args.B, args.H, args.N) == (2, 4, 64):
        for row in EXISTING:
            name, f512, fb512, f2048, fb2048 = row
            cells = {512: (f512, fb512), 2048: (f2048, fb2048)}
            print(
                f"| {name} (reference notes) | "
                + " | ".join(c for T in args.T for c in cells[T])
                + " |"
            )


if __name__ == "__main__":
    main()
