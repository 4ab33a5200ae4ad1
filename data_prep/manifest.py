"""manifest.json: what a built corpus holds, the contract between data prep and training.

One file per output folder lists the tokenizer (name, vocabulary size, sha256 of the vocabulary
file), every shard (prefix relative to the folder, source, split, documents, tokens, checksums)
and every source (documents read, written, rejected by reason). The training data config
reads it to find shards and weigh sources; `data_prep.verify` checks a folder against it;
`data_prep.merge` joins the manifests of a cluster build's parts. Nothing in it depends on how
the build ran (worker count, timing), so equal inputs give byte-identical manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """The sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON under a temporary name, fsync, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Load DIR/manifest.json, with a clear error when it is missing or not a manifest."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a built corpus folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a data_prep manifest (not a JSON object)")
    for key in ("tokenizer", "total_tokens", "shards", "sources"):
        if key not in manifest:
            raise ValueError(f"{path}: no '{key}' key, not a data_prep manifest")
    return manifest


def empty_source(name: str) -> dict[str, Any]:
    """The per-source counters of the manifest, all zero."""
    return {
        "name": name,
        "documents_in": 0,
        "documents_written": 0,
        "documents_split": 0,
        "extra_pieces": 0,
        "tokens": 0,
        "rejected": {},
    }


def make_manifest(
    tokenizer: dict[str, Any],
    shards: list[dict[str, Any]],
    sources: list[dict[str, Any]],
    build: dict[str, Any],
) -> dict[str, Any]:
    """Assemble a manifest; totals are derived from the shards so they cannot disagree."""
    return {
        "format_version": FORMAT_VERSION,
        "format": "binidx",
        "dtype": "uint16",
        "end_of_document": 0,
        "tokenizer": tokenizer,
        "total_tokens": sum(s["tokens"] for s in shards),
        "total_documents": sum(s["documents"] for s in shards),
        "shards": shards,
        "sources": sources,
        "build": build,
    }
