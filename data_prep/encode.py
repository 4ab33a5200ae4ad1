"""The work of one tokenizing worker: a batch of raw records in, token arrays out.

Each record becomes text (or a reject reason, see sources.record_text), is assigned to the
train or validation split by a hash of its bytes (so the choice is the same in every rerun and
for every worker count) and is encoded with token 0 appended. Runs inside worker processes;
the process-wide tokenizer is created once per worker by `init_worker`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from data_prep.sources import SURROGATE, BadInputError, Batch, record_text
from data_prep.tokenizer import END_OF_DOC, WorldTokenizer

_tokenizer: WorldTokenizer | None = None


@dataclass
class EncodedBatch:
    """The outcome of a batch, in record order.

    reasons[k] is None when record k was written, else why it was rejected; the written
    records' tokens are concatenated in `tokens` (each ending in token 0), `lengths` and
    `val` hold one entry per written record.
    """

    source: int
    reasons: list[str | None]
    tokens: np.ndarray
    lengths: np.ndarray
    val: np.ndarray
    nbytes: int


def init_worker(core_path: str | None, backend: str) -> None:
    """Create this process's tokenizer (loading the already built core without torch)."""
    global _tokenizer
    _tokenizer = WorldTokenizer(backend=backend, core_path=core_path)  # type: ignore[arg-type]


def set_tokenizer(tokenizer: WorldTokenizer) -> None:
    """Use an existing tokenizer (the single-process build)."""
    global _tokenizer
    _tokenizer = tokenizer


def val_split(data: bytes, fraction: float) -> bool:
    """Whether a document goes to the validation split: its hash, read as a number in [0, 1)."""
    if fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


def encode_batch(batch: Batch, val_fraction: float, strict: bool) -> EncodedBatch:
    """Turn a batch of records into tokens; with strict, the first bad record raises."""
    assert _tokenizer is not None, "init_worker() or set_tokenizer() first"
    reasons: list[str | None] = []
    arrays: list[np.ndarray] = []
    val: list[bool] = []
    end = np.array([END_OF_DOC], dtype=np.uint16)
    for item, pos in zip(batch.items, batch.positions, strict=True):
        text, reason = record_text(batch.kind, item, batch.text_field)
        data = b""
        if text is not None:
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                reason = SURROGATE
        if reason is not None:
            if strict:
                where = "line" if batch.kind == "jsonl" else "record"
                raise BadInputError(f"{batch.label}: {where} {pos[1]}: {reason}")
            reasons.append(reason)
            continue
        reasons.append(None)
        arrays.append(_tokenizer.encode_array(data))
        arrays.append(end)
        val.append(val_split(data, val_fraction))
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)
    lengths = np.array([len(a) + 1 for a in arrays[::2]], dtype=np.int64)
    return EncodedBatch(
        batch.source, reasons, tokens, lengths, np.array(val, dtype=bool), batch.nbytes
    )
