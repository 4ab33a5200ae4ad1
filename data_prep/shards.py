"""Packing a source's documents into numbered shard groups, with resume state.

A source's document stream is cut into groups: group g holds consecutive documents until their
tokens reach `shard_size_tokens`, and writes at most two shards, `<name>_train_<g>` and
`<name>_val_<g>` (the validation documents among them). Because a group ends at a record of
the input, its end is a position in the input; a small state file written after its shards
(.state/<name>_<g>.json) records that position, the source's counters so far and the shard
entries. A rerun after a crash resumes each source after its last recorded group: finished
shards are not touched, and the rest is rebuilt exactly as an uninterrupted run would.
"""

from __future__ import annotations

import copy
import json
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.binidx import BinIdxWriter
from data_prep.manifest import write_json_atomic

STATE_DIR = ".state"
SPLITS = ("train", "val")


def shard_prefix(name: str, split: str, group: int) -> str:
    """The file prefix of a shard, relative to the output folder."""
    return f"{name}_{split}_{group:05d}"


def shard_names(source_names: list[str], shard_index: int, num_shards: int) -> list[str]:
    """The names of a build's shards: its sources', with the part number in a cluster build."""
    if num_shards == 1:
        return list(source_names)
    return [f"{name}_p{shard_index:04d}" for name in source_names]


def shard_files(out_dir: Path, names: list[str]) -> list[Path]:
    """The shard files of sources `names` in out_dir, finished or temporary (a killed run's).

    What a build writes besides manifest.json and .state/, so all it may ever delete.
    """
    if not names or not out_dir.is_dir():
        return []
    alternatives = "|".join(re.escape(name) for name in names)
    pattern = re.compile(rf"({alternatives})_(train|val)_\d{{5,}}\.(bin|idx)(\.tmp(\.order)?)?")
    return sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))


class GroupWriter:
    """The (up to two) shards of one group; shuffles their documents when a seed is given."""

    def __init__(
        self, out_dir: Path, name: str, source: str, group: int, shuffle_seed: int | None
    ) -> None:
        self.out_dir, self.name, self.source, self.group = out_dir, name, source, group
        self.shuffle_seed = shuffle_seed
        self.writers: dict[str, BinIdxWriter] = {}
        self.pieces: dict[str, list[tuple[int, int]]] = {}  # split -> (first, count) of each
        self.tokens = 0

    def _writer(self, split: str) -> BinIdxWriter:
        writer = self.writers.get(split)
        if writer is None:
            prefix = self.out_dir / shard_prefix(self.name, split, self.group)
            writer = self.writers[split] = BinIdxWriter(prefix)
        return writer

    def add_pieces(self, split: str, pieces: list[np.ndarray]) -> None:
        """Append a long document as consecutive binidx documents (only the last ends in 0).

        The pieces stay together, in order, when the group is shuffled: a piece is not a
        document, and one moved elsewhere would run into an unrelated document.
        """
        writer = self._writer(split)
        self.pieces.setdefault(split, []).append((len(writer), len(pieces)))
        for piece in pieces:
            writer.add_document(piece)
            self.tokens += len(piece)

    def add_many(self, split: str, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append consecutive documents of one split in one write."""
        self._writer(split).add_documents(tokens, sizes)
        self.tokens += len(tokens)

    def finish(self) -> list[dict[str, Any]]:
        """Close the shards (atomically) and return their manifest entries."""
        entries = []
        for split in SPLITS:
            writer = self.writers.get(split)
            if writer is None:
                continue
            order = None
            if self.shuffle_seed is not None:
                order = self._order(split, len(writer))
            writer.close(order)
            entries.append(
                {
                    "prefix": shard_prefix(self.name, split, self.group),
                    "source": self.source,
                    "split": split,
                    "documents": len(writer),
                    "tokens": writer.num_tokens,
                    "sha256_bin": writer.bin_sha256,
                    "sha256_idx": writer.idx_sha256,
                }
            )
        return entries

    def _order(self, split: str, n: int) -> np.ndarray:
        """A seeded permutation of the documents, keeping each split document's pieces together.

        The binidx documents (pieces included) are numbered 0..n-1; a permutation of the whole
        documents is expanded into theirs, so without split documents it is the permutation.
        """
        first = np.ones(n, dtype=bool)  # whether binidx document i starts a document
        for start, count in self.pieces.get(split, []):
            first[start + 1 : start + count] = False
        document = np.cumsum(first) - 1  # the document each binidx document belongs to
        key = [self.shuffle_seed, zlib.crc32(self.name.encode()), self.group, len(split)]
        perm = np.random.default_rng(key).permutation(int(document[-1]) + 1)
        rank = np.empty_like(perm)
        rank[perm] = np.arange(len(perm))
        return np.argsort(rank[document], kind="stable")

    def abort(self) -> None:
        """Remove the temporary files of an unfinished group."""
        for writer in self.writers.values():
            writer.abort()


def state_path(out_dir: Path, name: str, group: int) -> Path:
    return out_dir / STATE_DIR / f"{name}_{group:05d}.json"


def save_group_state(
    out_dir: Path,
    name: str,
    group: int,
    position: tuple[int, int],
    final: bool,
    counters: dict[str, Any],
    shards: list[dict[str, Any]],
) -> None:
    """Record a finished group: written after its shards, so its presence means they are done."""
    (out_dir / STATE_DIR).mkdir(exist_ok=True)
    state = {
        "group": group,
        "position": list(position),
        "final": final,
        "counters": copy.deepcopy(counters),
        "shards": shards,
    }
    write_json_atomic(state_path(out_dir, name, group), state)


def load_group_states(out_dir: Path, name: str) -> list[dict[str, Any]]:
    """The recorded groups 0, 1, ... of a source, up to the first missing one."""
    states = []
    while (path := state_path(out_dir, name, len(states))).is_file():
        state = json.loads(path.read_text(encoding="utf-8"))
        if any(not _shard_files_exist(out_dir, s["prefix"]) for s in state["shards"]):
            break  # a shard vanished: rebuild from here
        states.append(state)
    return states


def _shard_files_exist(out_dir: Path, prefix: str) -> bool:
    return (out_dir / f"{prefix}.bin").is_file() and (out_dir / f"{prefix}.idx").is_file()
