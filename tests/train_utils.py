"""Helpers for the trainer tests: tiny data folders and composing the training config."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from data_prep.binidx import BinIdxWriter
from rwkv_train.generate import load_model
from rwkv_train.train import compose_config

# A small model every test can afford on two CPU cores: finch_debug's 2 x 128 layers with a
# small vocabulary (allowed because the test manifests declare a small tokenizer).
TINY_VOCAB = 128
TINY = [
    "model=finch_debug",
    f"model.vocab_size={TINY_VOCAB}",
    "model.wkv_backend=torch",
    "data.ctx_len=16",
    "data.micro_batch_size=2",
    "data.global_batch_size=2",
    "data.val_samples=4",
    "trainer=cpu",
    "trainer.progress_bar=false",
    "optim.warmup_steps=2",
    "logger=none",
]


def markov_documents(
    n_docs: int, doc_len: int, vocab: int, seed: int = 0, branching: int = 2, chain: int = 0
) -> list[np.ndarray]:
    """Documents from a sparse first-order Markov chain (fixed by `chain`) over tokens
    1..vocab-1, each ending in token 0: its conditional entropy (log2(branching) bits) is far
    below its unigram entropy, so a model that learns anything beats the unigram bound."""
    nxt = np.random.default_rng(10_000 + chain).integers(1, vocab, size=(vocab, branching))
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        t = int(rng.integers(1, vocab))
        doc = [t]
        for _ in range(doc_len - 1):
            t = int(nxt[t, rng.integers(branching)])
            doc.append(t)
        docs.append(np.array([*doc, 0], dtype=np.uint16))
    return docs


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_data_folder(
    folder: Path,
    train_docs: list[list[np.ndarray]],
    val_docs: list[np.ndarray] | dict[str, list[np.ndarray]] | None = None,
    vocab_size: int = TINY_VOCAB,
    tokenizer: str = "test",
    train_sources: list[str] | None = None,
) -> Path:
    """A data-prep-style folder: one train shard per list in `train_docs` (of the source
    named in `train_sources`, default "synthetic"), optional val shards (one, or one per
    named source), and a manifest.json with the keys data_prep.build writes."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    if not isinstance(val_docs, dict):
        val_docs = {"synthetic": val_docs} if val_docs else {}
    names = train_sources or ["synthetic"] * len(train_docs)
    parts = [("train", name, docs) for name, docs in zip(names, train_docs, strict=True)]
    parts += [("val", source, docs) for source, docs in val_docs.items()]
    for i, (split, source, docs) in enumerate(parts):
        prefix = f"{split}_{i:03d}"
        with BinIdxWriter(folder / prefix) as w:
            for d in docs:
                w.add_document(d)
        shards.append(
            {
                "prefix": prefix,
                "source": source,
                "split": split,
                "documents": len(docs),
                "tokens": int(sum(len(d) for d in docs)),
                "sha256_bin": _sha(folder / f"{prefix}.bin"),
                "sha256_idx": _sha(folder / f"{prefix}.idx"),
            }
        )
    manifest = {
        "tokenizer": {"name": tokenizer, "vocab_size": vocab_size, "sha256": "0" * 64},
        "total_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "sources": [{"name": "synthetic"}],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def tiny_data(folder: Path, n_docs: int = 40, doc_len: int = 60, seed: int = 0) -> Path:
    """The default test folder: two train shards and a val shard of Markov text."""
    docs = markov_documents(n_docs, doc_len, TINY_VOCAB, seed)
    val = markov_documents(8, doc_len, TINY_VOCAB, seed + 1)
    half = n_docs // 2
    return write_data_folder(folder, [docs[:half], docs[half:]], val)


def compose_train(overrides: list[str]) -> DictConfig:
    """Compose conf/train.yaml as `python -m rwkv_train.train` would."""
    return compose_config(overrides)


def train_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """TINY plus the data folder and run folder."""
    return [*TINY, f"data.path={data}", f"run_dir={run_dir}", *extra]


def assert_matches_rwkv_package(
    pth: Path, tokens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exported .pth gives the same logits in the `rwkv` package as in our model (1e-4)."""
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    monkeypatch.delenv("RWKV_V7_ON", raising=False)
    from rwkv.model import RWKV as Reference

    ref = Reference(model=str(pth.with_suffix("")), strategy="cpu fp32")
    ref_logits, _ = ref.forward(tokens, None, full_output=True)
    ours = load_model(pth, wkv_backend="torch")
    with torch.no_grad():
        our_logits = ours(torch.tensor([tokens]))[0]
    assert torch.allclose(our_logits, ref_logits.float(), atol=1e-4, rtol=1e-4)
