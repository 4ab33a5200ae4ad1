"""Tokenizer speed: ours (compiled core, pure Python) vs the reference and the Rust packages.

All engines encode the same mixed text, document by document, in one thread: standard-library
Python sources (code with English comments and docstrings) plus the standard library's UTF-8
CJK test texts (test/cjkencodings), repeated to make `--cjk-share` of the bytes. Every engine's
ids are checked against ours before timing. The Rust packages (`pip install .[bench]`:
pyrwkv-tokenizer, rwkv-tokenizer) are measured when installed.

    python benchmarks/bench_tokenizer.py --mb 20
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable

from data_prep.demo_corpus import cjk_texts, stdlib_dir
from data_prep.tokenizer import WorldTokenizer


def mixed_documents(total_bytes: int, cjk_share: float) -> list[str]:
    """Standard-library sources plus CJK texts, about total_bytes of UTF-8 in all."""
    docs: list[str] = []
    size = 0
    for path in sorted(stdlib_dir().rglob("*.py")):
        if size >= total_bytes * (1 - cjk_share):
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text.encode("utf-8"))
    cjk = [p.read_text(encoding="utf-8") for p in cjk_texts()]
    i = 0
    while cjk and size < total_bytes:
        docs.insert((i * 7) % (len(docs) + 1), cjk[i % len(cjk)])  # spread through the mix
        size += len(cjk[i % len(cjk)].encode("utf-8"))
        i += 1
    return docs


def timed(fn: Callable[[list[str]], object], docs: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(docs)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=20.0, help="size of the mixed text")
    parser.add_argument("--cjk-share", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--slow-mb", type=float, default=4.0, help="text for the slow engines")
    args = parser.parse_args()

    docs = mixed_documents(int(args.mb * 1e6), args.cjk_share)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    slow_docs = mixed_documents(int(args.slow_mb * 1e6), args.cjk_share)
    slow_bytes = sum(len(d.encode("utf-8")) for d in slow_docs)

    ours = WorldTokenizer(backend="cpp")
    ours_py = WorldTokenizer(backend="python")
    expected = [ours.encode(d) for d in slow_docs]
    n_tokens = sum(len(ours.encode(d)) for d in docs)

    engines: list[tuple[str, Callable[[list[str]], object], bool]] = [
        ("ours, compiled core: encode() -> list", lambda ds: [ours.encode(d) for d in ds], False),
        (
            "ours, compiled core: encode_array() -> uint16",
            lambda ds: [ours.encode_array(d) for d in ds],
            False,
        ),
        ("ours, pure Python", lambda ds: [ours_py.encode(d) for d in ds], True),
    ]
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    trie = TRIE_TOKENIZER(str(ours.vocab_path))
    engines.append(
        ("rwkv TRIE_TOKENIZER (reference)", lambda ds: [trie.encode(d) for d in ds], True)
    )
    for module in ("pyrwkv_tokenizer", "rwkv_tokenizer"):
        try:
            mod = __import__(module)
        except ImportError:
            print(f"({module} not installed: skipped)")
            continue
        t = mod.RWKVTokenizer()
        version = importlib.metadata.version(module.replace("_", "-"))
        engines.append(
            (f"{module} {version} (Rust)", lambda ds, t=t: [t.encode(d) for d in ds], False)
        )

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"text: {nbytes / 1e6:.1f} MB, {len(docs)} documents, {n_tokens / 1e6:.2f} M tokens")
    print(f"(slow engines on the first {slow_bytes / 1e6:.1f} MB)\n")
    print("| engine | MB/s | M tokens/s | same ids |")
    print("|---|---|---|---|")
    for name, fn, slow in engines:
        got = fn(slow_docs)
        same = all(list(g) == e for g, e in zip(got, expected, strict=True))
        data, size = (slow_docs, slow_bytes) if slow else (docs, nbytes)
        sec = timed(fn, data, 1 if slow else args.repeat)
        toks = n_tokens * size / nbytes
        print(f"| {name} | {size / sec / 1e6:.1f} | {toks / sec / 1e6:.2f} | {same} |")


if __name__ == "__main__":
    main()
