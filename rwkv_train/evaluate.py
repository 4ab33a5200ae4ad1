"""Evaluate saved models on validation shards, outside training: the learning curve of a run's
milestone checkpoints (`checkpoint.keep_every_n_steps`), or a reference .pth on your data.

    python -m rwkv_train.evaluate runs/NAME/checkpoints/step*.ckpt --data DIR [--ctx-len 4096]
        [--samples 64] [--segment-len 0] [--batch-size 4] [--device cuda] [--json out.jsonl]
        [--lambada lambada_test.jsonl]

A model is a run folder (its newest valid checkpoint), a training checkpoint (a file, or a
folder under ZeRO) or a reference-layout .pth. The samples and the metrics are the trainer's
validation (rwkv_train/validation.py): the first chunks of every source's val shards taken in
turn, and val/loss, val/ppl, val/loss/<source>, val/loss_by_pos/<first>-<last>. So the step-N
checkpoint evaluated with the run's data, ctx_len and data.val_samples gives the val/loss the
run logged at step N. `--lambada` adds LAMBADA's last-word perplexity and accuracy
(rwkv_train/lambada.py), with or without `--data`. On a GPU the model runs under bf16
autocast, as trainer=gpu trains.
"""

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from rwkv_train.bptt import segmented_loss
from rwkv_train.checkpoint import checkpoint_step
from rwkv_train.data import load_manifest
from rwkv_train.data.dataset import TokenStream, ValidationChunks
from rwkv_train.data.loader import val_sources
from rwkv_train.data.manifest import ManifestError
from rwkv_train.export import ModelFileError, resolve_checkpoint
from rwkv_train.generate import load_model
from rwkv_train.lambada import encode, largest_id, read_passages, score
from rwkv_train.model import RWKV
from rwkv_train.validation import ValidationLoss, summary


@torch.no_grad()
def evaluate(
    net: RWKV,
    names: list[str],
    streams: Sequence[TokenStream],
    ctx_len: int,
    samples: int,
    segment_len: int = 0,
    batch_size: int = 4,
) -> dict[str, float]:
    """The validation metrics of `net` on `samples` chunks taken from `streams` in turn."""
    device = next(net.parameters()).device
    chunks = ValidationChunks(streams, ctx_len, samples)
    result = ValidationLoss(names, ctx_len, device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    for x, y, source in DataLoader(chunks, batch_size=batch_size):
        x, y, source = x.to(device), y.to(device), source.to(device)
        with autocast:
            _, ce = segmented_loss(net, x, y, segment_len or ctx_len)
        result.add(ce, source)
    return result.metrics(lambda t: t)


def model_step(path: Path) -> int | None:
    """The optimizer step of a checkpoint (None for a .pth)."""
    try:
        return checkpoint_step(path)
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="run folders, checkpoints or .pth files")
    p.add_argument("--data", nargs="+", default=[], help="data-prep folders (their val shards)")
    p.add_argument("--lambada", type=Path, help="LAMBADA passages (lambada_test.jsonl)")
    p.add_argument("--ctx-len", type=int, default=4096)
    p.add_argument("--samples", type=int, default=64, help="chunks in all (data.val_samples)")
    p.add_argument("--segment-len", type=int, default=0, help="tokens per forward (0: whole)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="append one JSON line per model to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.ctx_len < 1 or args.samples < 1 or args.batch_size < 1 or args.segment_len < 0:
        p.error("--ctx-len, --samples and --batch-size must be positive, --segment-len >= 0")
    if not args.data and args.lambada is None:
        p.error("nothing to evaluate on: give --data folders, --lambada, or both")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but torch sees no CUDA device here: use --device cpu")
    missing = [str(m) for m in args.models if not m.exists()]
    if missing:
        p.error(f"no model at {', '.join(missing)}")
    try:
        manifests = [load_manifest(d) for d in args.data]
        # a run folder stands for its newest checkpoint, fixed here so the step is its own
        sources = [m if m.suffix == ".pth" else resolve_checkpoint(m) for m in args.models]
        lambada = None if args.lambada is None else encode(read_passages(args.lambada))
    except (ManifestError, OSError, ValueError) as e:  # a folder for a file, unreadable ...
        p.error(str(e))
    names, streams = val_sources(manifests, args.ctx_len)
    if manifests and not streams:
        p.error(f"no val shards with ctx_len+1 = {args.ctx_len + 1} tokens in {args.data}")
    vocab = max((m.vocab_size for m in manifests), default=0)
    if lambada is not None:  # the largest id of its passages must be one the model has
        vocab = max(vocab, 1 + largest_id(lambada))
    for path, source in zip(args.models, sources, strict=True):
        try:
            net = load_model(source).to(args.device)
        except ModelFileError as e:  # truncated, or not a model: say which, not a traceback
            p.error(str(e))
        if net.cfg.vocab_size < vocab:
            p.error(f"{path} has {net.cfg.vocab_size} token ids, the data {vocab}")
        metrics: dict[str, float] = {}
        lines = []
        if streams:
            metrics |= evaluate(
                net, names, streams, args.ctx_len, args.samples, args.segment_len, args.batch_size
            )
            lines.append(summary(metrics))
        if lambada is not None:
            metrics |= score(net, lambada, args.batch_size)
            lines.append(
                f"lambada ppl {metrics['lambada/ppl']:.2f}, acc {metrics['lambada/acc']:.2%}"
            )
        print(f"{path}: {'; '.join(lines)}", flush=True)
        if args.json is not None:
            with args.json.open("a") as f:
                row = {"model": str(path), "step": model_step(source), **metrics}
                f.write(json.dumps(row) + "\n")
        del net
    return 0


if __name__ == "__main__":
    sys.exit(main())
