"""The built-in default job, end to end on a CPU: `make demo` (or `python -m rwkv_train.demo`).

1. writes a small real corpus from files every Python installation has (standard-library
   sources and docstrings, the CJK test texts) and packs it into binidx shards, verified;
2. trains a tiny Finch (conf/experiment/demo.yaml) on it, printing the falling loss;
3. exports the weights as a reference-layout .pth (loadable by the `rwkv` package);
4. samples text from that file in RNN mode.

`--quick` runs the same steps with a few training steps (what CI runs). Everything goes under
`--out` (default demo_out/); a rerun resumes where the last one stopped.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from data_prep.demo_corpus import build_demo_data
from data_prep.tokenizer import WorldTokenizer
from rwkv_train.export import export
from rwkv_train.generate import generate_text, load_model
from rwkv_train.metrics import read_metrics
from rwkv_train.train import compose_config, train
from rwkv_train.validation import summary

QUICK = [
    "trainer.max_steps=5",
    "trainer.val_every_n_steps=0",
    "checkpoint.every_n_steps=5",
    "data.val_samples=2",
    "data.ctx_len=32",
    "data.micro_batch_size=2",
    "data.global_batch_size=2",
    "trainer.progress_bar=false",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--quick", action="store_true", help="a few training steps (CI)")
    p.add_argument("--prompt", default="def main(")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("overrides", nargs="*", help="extra training overrides, key=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()

    print("== 1/4 data: demo corpus -> binidx shards", flush=True)
    data = build_demo_data(args.out, progress=not args.quick)
    manifest = json.loads((data / "manifest.json").read_text())
    print(f"   {data}: {manifest['total_tokens']:,} tokens in {len(manifest['shards'])} shards")

    print("== 2/4 train: tiny Finch on the CPU", flush=True)
    run_dir = args.out / ("run-quick" if args.quick else "run")
    overrides = ["experiment=demo", f"data.path={data}", f"run_dir={run_dir}"]
    train(compose_config(overrides + (QUICK if args.quick else []) + args.overrides))
    rows = read_metrics(run_dir / "metrics.jsonl")
    history = [r["train/loss"] for r in rows if "train/loss" in r]
    if history:
        print(f"   loss {history[0]:.3f} -> {history[-1]:.3f} over {len(history)} steps")
    val = [r for r in rows if "val/loss" in r]
    if val:
        print(f"   validation {summary(val[-1])}")

    print("== 3/4 export: reference-layout .pth", flush=True)
    pth = export(run_dir, args.out / ("demo-quick.pth" if args.quick else "demo.pth"))
    print(f"   {pth} ({pth.stat().st_size / 2**20:.1f} MiB)")

    print("== 4/4 sample: RNN mode", flush=True)
    net, tokenizer = load_model(pth), WorldTokenizer()
    sys.stdout.write(args.prompt)
    for piece in generate_text(net, args.prompt, tokenizer, max_tokens=args.max_tokens, seed=0):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(f"\n== done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
