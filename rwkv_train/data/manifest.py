"""Reading a data-prep manifest: which shards hold the train and validation tokens, by source."""

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path


class ManifestError(ValueError):
    """A data folder or manifest that cannot be used for training."""


@dataclass(frozen=True)
class Shard:
    prefix: Path  # absolute
    source: str
    split: str  # train | val
    tokens: int


@dataclass(frozen=True)
class Manifest:
    """The parts of a data-prep manifest.json the trainer needs."""

    path: Path
    tokenizer_name: str
    vocab_size: int
    shards: tuple[Shard, ...] = ()  # in manifest order
    fingerprint: str = ""  # of the shard records (names, sizes, checksums): the data itself

    @property
    def train(self) -> list[Path]:
        """The train shards' prefixes, read as one stream."""
        return [s.prefix for s in self.shards if s.split == "train"]

    @property
    def val(self) -> dict[str, list[Path]]:
        """The val shards' prefixes by source."""
        out: dict[str, list[Path]] = {}
        for s in self.shards:
            if s.split == "val":
                out.setdefault(s.source, []).append(s.prefix)
        return out

    @property
    def train_tokens(self) -> int:
        return sum(s.tokens for s in self.shards if s.split == "train")

    @property
    def val_tokens(self) -> int:
        return sum(s.tokens for s in self.shards if s.split == "val")

    def train_tokens_by_source(self) -> dict[str, int]:
        """Train tokens of every source with train shards, in manifest order."""
        out: dict[str, int] = {}
        for s in self.shards:
            if s.split == "train":
                out[s.source] = out.get(s.source, 0) + s.tokens
        return out

    def only(self, source: str) -> "Manifest":
        """This manifest restricted to one source's shards (train and val)."""
        return replace(self, shards=tuple(s for s in self.shards if s.source == source))


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
        records = doc["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{p} is not a data-prep manifest: {e}") from e
    shards = []
    for shard in records:
        split = shard.get("split", "train")
        if split not in ("train", "val"):
            raise ManifestError(f"{p}: shard {shard.get('prefix')} has unknown split {split!r}")
        source = str(shard.get("source", "data"))
        shards.append(Shard(p.parent / shard["prefix"], source, split, int(shard.get("tokens", 0))))
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    return Manifest(
        path=p,
        tokenizer_name=str(tok.get("name", "")),
        vocab_size=int(tok["vocab_size"]),
        shards=tuple(shards),
        fingerprint=digest[:16],
    )


def split_by_source(
    manifest: Manifest, multipliers: dict[str, float], ctx_len: int
) -> tuple[list[tuple[Manifest, float]], list[str]]:
    """One manifest per source of a build, with its share of the build's samples: its chunk
    count times its multiplier (1 if unlisted; 0 leaves it out), normalised. With every
    multiplier 1 the shares are the build's own proportions, each source finishing its
    epoch when the others do. Returns the parts and the sources left out for having no
    chunk of ctx_len+1 tokens."""
    tokens = manifest.train_tokens_by_source()
    unknown = sorted(set(multipliers) - set(tokens))
    if unknown:
        raise ValueError(
            f"no source {unknown} with train shards in {manifest.path}; it has {sorted(tokens)}"
        )
    bad = {s: m for s, m in multipliers.items() if not m >= 0}
    if bad:
        raise ValueError(f"source multipliers must be >= 0, got {bad}")
    mass: dict[str, float] = {}
    short = []
    for source, n in tokens.items():
        m = multipliers.get(source, 1.0)
        if m == 0:
            continue
        chunks = max(0, (n - 1) // ctx_len)
        if chunks == 0:
            short.append(source)
            continue
        mass[source] = chunks * m
    total = sum(mass.values())
    return [(manifest.only(s), w / total) for s, w in mass.items()], short
