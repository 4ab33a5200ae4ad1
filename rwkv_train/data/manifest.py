"""Reading a data-prep manifest: which shards hold the train and validation tokens."""

import json
from dataclasses import dataclass, field
from pathlib import Path


class ManifestError(ValueError):
    """A data folder or manifest that cannot be used for training."""


@dataclass(frozen=True)
class Manifest:
    """The parts of a data-prep manifest.json the trainer needs."""

    path: Path
    tokenizer_name: str
    vocab_size: int
    train: list[Path] = field(default_factory=list)  # shard prefixes (absolute)
    val: dict[str, list[Path]] = field(default_factory=dict)  # by source, in manifest order
    train_tokens: int = 0
    val_tokens: int = 0


def manifest_path(path: str | Path) -> Path:
    """The manifest.json for a data folder or a path to the manifest itself."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise ManifestError(f"no manifest.json at {p}: build the data with data_prep.build first")
    return p


def load_manifest(path: str | Path) -> Manifest:
    """Parse a manifest; shard prefixes in it are relative to its folder."""
    p = manifest_path(path)
    try:
        doc = json.loads(p.read_text())
        tok = doc["tokenizer"]
        shards = doc["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{p} is not a data-prep manifest: {e}") from e
    train: list[Path] = []
    val: dict[str, list[Path]] = {}
    counts = {"train": 0, "val": 0}
    for shard in shards:
        split = shard.get("split", "train")
        if split not in counts:
            raise ManifestError(f"{p}: shard {shard.get('prefix')} has unknown split {split!r}")
        prefix = p.parent / shard["prefix"]
        if split == "train":
            train.append(prefix)
        else:
            val.setdefault(str(shard.get("source", "data")), []).append(prefix)
        counts[split] += int(shard.get("tokens", 0))
    return Manifest(
        path=p,
        tokenizer_name=str(tok.get("name", "")),
        vocab_size=int(tok["vocab_size"]),
        train=train,
        val=val,
        train_tokens=counts["train"],
        val_tokens=counts["val"],
    )
