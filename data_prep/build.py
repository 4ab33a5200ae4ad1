"""`python -m data_prep.build`: corpus files in, tokenized binidx shards and manifest.json out.

The pipeline, for each source in turn (conf/corpus/*.yaml or the quick form `inputs=[...]`):

1. read (this process, data_prep/sources.py): files are streamed and cut into batches of raw
   records (JSON lines, Parquet values, text files, dataset rows) tagged with their position;
2. encode (`workers` processes, data_prep/encode.py): each record becomes text or a reject
   reason, is assigned to train or val by a hash of its bytes, and is tokenized with token 0
   appended. At most a few batches per worker are in flight, so memory stays flat;
3. pack (this process, data_prep/shards.py): results are consumed in input order, whatever
   the worker count, so the output is byte-identical for 1 or N workers. Documents fill shard
   groups of `shard_size_tokens`; each finished group is renamed into place atomically and
   recorded in .state/, so a killed build rerun with the same settings resumes after the last
   finished group, leaving the finished shards untouched;
4. manifest (data_prep/manifest.py): tokenizer, shards and per-source counters, written last.

Sources are never mixed here: mixture weights are a training-time choice (the training data
config), so a new mixture never needs re-tokenizing. `data_prep.verify` checks the result and
`data_prep.merge` joins the manifests of a cluster build split with shard_index/num_shards.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from data_prep import encode, usable_cpus
from data_prep.fingerprint import describe_difference, few, stamp
from data_prep.manifest import MANIFEST, empty_source, make_manifest, write_json_atomic
from data_prep.progress import Progress
from data_prep.shards import (
    STATE_DIR,
    GroupWriter,
    load_group_states,
    save_group_state,
    shard_files,
    shard_names,
)
from data_prep.sources import (
    FORMATS,
    TOO_LONG,
    BadInputError,
    Batch,
    ReadProblem,
    SourceSpec,
    expand_paths,
    iter_batches,
    source_format,
    source_name,
)
from data_prep.tokenizer import WorldTokenizer
from rwkv_train.paths import conf_dir

log = logging.getLogger("data_prep.build")


@dataclass
class BuildConfig:
    """Settings of a build; the YAML in conf/data_prep.yaml gives their defaults.

    output_dir: folder for the shards, manifest.json and resume state.
    inputs: quick form, files or globs, one source per entry named after the file.
    corpus: the selected conf/corpus/*.yaml (a `sources:` list of SourceSpec fields).
    text_field: field holding the text, for quick-form inputs.
    seed: seeds the shuffle (the validation split is chosen by a hash, not by the seed).
    val_fraction: share of each source's documents held out as validation (by hash).
    shard_size_tokens: a shard group is closed once it holds this many tokens.
    max_doc_tokens: longer documents are split or rejected (`long_docs`), never truncated.
    long_docs: split | reject.
    shuffle: permute the documents within each shard, seeded by `seed` (a split document moves
        as one, its pieces in order).
    workers: tokenizing processes; null means one per available core.
    batch_bytes / batch_records: size of a unit of work sent to a worker.
    in_flight_per_worker: batches queued per worker (bounds memory).
    strict: a bad record is an error naming file and line instead of a counted reject.
    overwrite: delete a previous build in output_dir (its files only) instead of resuming it.
    shard_index / num_shards: build only part shard_index of num_shards (clusters).
    tokenizer_backend: auto | cpp | python.
    progress: show progress (a bar on a terminal, a line a minute in a log file).
    """

    output_dir: str = "???"
    inputs: list[str] = field(default_factory=list)
    corpus: dict[str, Any] | None = None
    text_field: str = "text"
    val_fraction: float = 0.001
    seed: int = 0
    shuffle: bool = False
    shard_size_tokens: int = 1 << 28
    max_doc_tokens: int = 1_000_000
    long_docs: str = "split"
    workers: int | None = None
    batch_bytes: int = 1 << 20
    batch_records: int = 4096
    in_flight_per_worker: int = 4
    strict: bool = False
    overwrite: bool = False
    shard_index: int = 0
    num_shards: int = 1
    tokenizer_backend: str = "auto"
    progress: bool = True


class BuildError(RuntimeError):
    """A build that cannot proceed (bad settings, a changed input under resume, bad input)."""


# Keys of a corpus source that only document it (conf/corpus/world_v2.yaml); any other key
# that SourceSpec lacks is a typo and an error.
DOC_KEYS = frozenset({"domain", "note"})
# A source name starts its shard files' names: no folders, nothing hidden.
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def source_specs(cfg: BuildConfig) -> list[SourceSpec]:
    """The sources of a build: the corpus config's, then one per quick-form input."""
    specs: list[SourceSpec] = []
    corpus = cfg.corpus or {}
    for i, entry in enumerate(corpus.get("sources", []) or []):
        entry = {k: v for k, v in dict(entry).items() if k not in DOC_KEYS}
        unknown = sorted(set(entry) - set(SourceSpec.__dataclass_fields__))
        if unknown:
            known = sorted(SourceSpec.__dataclass_fields__) + sorted(DOC_KEYS)
            raise BuildError(
                f"corpus source {i} ({entry.get('name')}): unknown keys {unknown}; "
                f"a source takes {known}"
            )
        name = entry.get("name")
        if not isinstance(name, str) or not SOURCE_NAME.fullmatch(name):
            raise BuildError(
                f"corpus source {i}: name {name!r} must be letters, digits, '.', '_' and '-' "
                "(it starts the names of its shard files)"
            )
        paths = entry.get("paths") or []
        entry["paths"] = [paths] if isinstance(paths, str) else list(paths)
        spec = SourceSpec(**entry)
        if spec.format not in FORMATS:
            raise BuildError(
                f"corpus source {i} ({spec.name}): format {spec.format!r} is none of {FORMATS}"
            )
        if spec.val_fraction is not None and not 0.0 <= spec.val_fraction < 1.0:
            raise BuildError(
                f"corpus source {i} ({spec.name}): val_fraction must be in [0, 1), "
                f"not {spec.val_fraction}"
            )
        specs.append(spec)
    for path in cfg.inputs:
        name = source_name(str(path))
        taken = {s.name for s in specs}
        n = 2
        while name in taken:  # a.jsonl and a.jsonl.zst: a, a-2
            name = f"{source_name(str(path))}-{n}"
            n += 1
        specs.append(SourceSpec(name, [str(path)], text_field=cfg.text_field))
    names = [s.name for s in specs]
    if not specs:
        raise BuildError("nothing to build: give inputs='[...]' or corpus=<name>")
    if len(set(names)) != len(names):
        raise BuildError(f"source names must be unique, got {names}")
    return specs


def check_config(cfg: BuildConfig) -> None:
    if cfg.output_dir in ("???", "", None):
        raise BuildError("output_dir=DIR is required")
    if cfg.long_docs not in ("split", "reject"):
        raise BuildError(f"long_docs must be split or reject, not {cfg.long_docs!r}")
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise BuildError(f"need 0 <= shard_index < num_shards, got {cfg.shard_index}")
    if cfg.shard_size_tokens < 1 or cfg.max_doc_tokens < 1:
        raise BuildError("shard_size_tokens and max_doc_tokens must be positive")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise BuildError(f"val_fraction must be in [0, 1), not {cfg.val_fraction}")
    if cfg.workers is not None and cfg.workers < 1:
        raise BuildError(f"workers must be positive (or null: one per core), not {cfg.workers}")
    if cfg.batch_records < 1 or cfg.batch_bytes < 1 or cfg.in_flight_per_worker < 1:
        raise BuildError("batch_records, batch_bytes and in_flight_per_worker must be positive")
    if cfg.tokenizer_backend not in ("auto", "cpp", "python"):
        raise BuildError(
            f"tokenizer_backend must be auto, cpp or python, not {cfg.tokenizer_backend!r}"
        )
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise BuildError(f"output_dir={cfg.output_dir} is a file, not a folder")


def _ordered_results(
    batches: Iterator[Batch | ReadProblem],
    pool: Any,
    window: int,
    val_fraction: float,
    strict: bool,
) -> Iterator[tuple[Batch | ReadProblem, encode.EncodedBatch | None]]:
    """Encode batches on the pool, yielding results in input order with a bounded window."""
    if pool is None:
        for b in batches:
            if isinstance(b, ReadProblem):
                yield b, None
            else:
                yield b, encode.encode_batch(b, val_fraction, strict)
        return
    pending: deque = deque()
    for b in batches:
        if isinstance(b, ReadProblem):
            pending.append((b, None))
        else:
            job = pool.apply_async(encode.encode_batch, (b, val_fraction, strict))
            # Keep only what the packer needs, not the raw records.
            pending.append((Batch(b.source, b.kind, b.label, [], b.positions), job))
        while len(pending) > window:
            head, job = pending.popleft()
            yield head, (job.get() if job is not None else None)
    while pending:
        head, job = pending.popleft()
        yield head, (job.get() if job is not None else None)


class _Packer:
    """Consumes one source's results in order and cuts them into shard groups."""

    def __init__(self, cfg: BuildConfig, out: Path, spec: SourceSpec, name: str) -> None:
        self.cfg, self.out, self.spec, self.name = cfg, out, spec, name
        states = load_group_states(out, name)
        self.states = states
        self.done = bool(states) and states[-1]["final"]
        self.counters = states[-1]["counters"] if states else empty_source(spec.name)
        self.position: tuple[int, int] = tuple(states[-1]["position"]) if states else (0, 0)
        self.shards = [s for st in states for s in st["shards"]]
        self.group = len(states)
        self.shuffle_seed = cfg.seed if cfg.shuffle else None
        self.writer = self._new_writer()

    def _new_writer(self) -> GroupWriter:
        return GroupWriter(self.out, self.name, self.spec.name, self.group, self.shuffle_seed)

    def _reject(self, reason: str, where: str) -> None:
        if self.cfg.strict:
            raise BadInputError(f"{where}: {reason}")
        rejected = self.counters["rejected"]
        rejected[reason] = rejected.get(reason, 0) + 1

    def problem(self, p: ReadProblem) -> None:
        self.counters["documents_in"] += 1
        log.warning("%s: line %d: %s (%s)", p.label, p.position[1], p.reason, p.message)
        self._reject(p.reason, f"{p.label}: line {p.position[1]} ({p.message})")
        self.position = (p.position[0] + 1, 0)  # the rest of the file is unreadable

    def batch(self, b: Batch, enc: encode.EncodedBatch) -> None:
        """Pack a batch's results in order; runs of same-split documents go out in one write."""
        offsets = np.zeros(len(enc.lengths) + 1, dtype=np.int64)
        np.cumsum(enc.lengths, out=offsets[1:])
        lengths = enc.lengths.tolist()
        val = enc.val.tolist()
        limit, shard_size = self.cfg.max_doc_tokens, self.cfg.shard_size_tokens
        counters = self.counters
        run_split, run_start, run_tokens = "", 0, 0  # pending documents [run_start, doc)
        doc = 0

        def flush() -> None:
            if doc > run_start:
                tokens = enc.tokens[offsets[run_start] : offsets[doc]]
                self.writer.add_many(run_split, tokens, enc.lengths[run_start:doc])

        for reason, pos in zip(enc.reasons, b.positions, strict=True):
            counters["documents_in"] += 1
            self.position = pos
            if reason is not None:
                self._reject(reason, f"{b.label}: record {pos[1]}")
            else:
                split = "val" if val[doc] else "train"
                n = lengths[doc]
                if n - 1 > limit:
                    flush()
                    run_start, run_tokens = doc + 1, 0
                    if self.cfg.long_docs == "reject":
                        self._reject(TOO_LONG, f"{b.label}: record {pos[1]}")
                    else:
                        self._write_split(split, enc.tokens[offsets[doc] : offsets[doc + 1]], limit)
                else:
                    if split != run_split:
                        flush()
                        run_split, run_start, run_tokens = split, doc, 0
                    run_tokens += n
                    counters["documents_written"] += 1
                    counters["tokens"] += n
                doc += 1
            if self.writer.tokens + run_tokens >= shard_size:
                flush()
                run_start, run_tokens = doc, 0
                self.finish_group(final=False)
        flush()

    def _write_split(self, split: str, tokens: np.ndarray, limit: int) -> None:
        """A document over the limit: pieces of `limit` tokens, the last with the token 0."""
        starts = range(0, len(tokens) - 1, limit)
        pieces = [tokens[start : start + limit] for start in starts[:-1]] + [tokens[starts[-1] :]]
        self.writer.add_pieces(split, pieces)
        self.counters["documents_split"] += 1
        self.counters["extra_pieces"] += len(pieces) - 1
        self.counters["documents_written"] += 1
        self.counters["tokens"] += len(tokens)

    def finish_group(self, final: bool) -> None:
        entries = self.writer.finish()
        # A new dict, so count rejects through self.counters (or _reject), never a saved one.
        self.counters["rejected"] = dict(sorted(self.counters["rejected"].items()))
        save_group_state(
            self.out, self.name, self.group, self.position, final, self.counters, entries
        )
        self.shards.extend(entries)
        self.group += 1
        self.writer = self._new_writer()


def _fingerprint(
    cfg: BuildConfig, specs: list[SourceSpec], tokenizer: dict, inputs: list[str]
) -> dict:
    """Everything that decides the bytes of the output (not workers, not progress).

    `inputs` are all the sources' files, also in a cluster build, where a part's share follows
    from shard_index: so the fingerprints of a build's parts differ in shard_index only.
    """
    return {
        "tokenizer": tokenizer,
        "sources": [asdict(s) for s in specs],
        "files": [stamp(path) for path in inputs],
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "shuffle": cfg.shuffle,
        "shard_size_tokens": cfg.shard_size_tokens,
        "max_doc_tokens": cfg.max_doc_tokens,
        "long_docs": cfg.long_docs,
        "shard_index": cfg.shard_index,
        "num_shards": cfg.num_shards,
    }


def _recorded_shard_names(out: Path) -> list[str]:
    """The shard names of the build recorded in out (.state/build.json, manifest.json)."""
    names = []
    for path in (out / STATE_DIR / "build.json", out / MANIFEST):
        if path.is_file():
            info = json.loads(path.read_text(encoding="utf-8"))
            settings = info.get("build", info)  # a manifest keeps them under "build"
            sources = [s["name"] for s in info.get("sources", [])]
            index, n = settings.get("shard_index", 0), settings.get("num_shards", 1)
            names += shard_names(sources, index, n)
    return names


def _remove_build(out: Path) -> None:
    """Delete the build that out holds (overwrite=true), and nothing else of the folder.

    Only what a build writes goes: its shards and their temporaries, manifest.json and
    .state/. A folder holding files but no build is refused rather than emptied.
    """
    state, manifest = out / STATE_DIR, out / MANIFEST
    if not state.exists() and not manifest.exists():
        others = sorted(p.name for p in out.iterdir() if p.name != ".hydra")  # Hydra's logs
        if others:
            raise BuildError(
                f"overwrite=true: {out} holds no build to replace but other files "
                f"({few(others)}); "
                "use an empty or new output_dir"
            )
        return
    for p in shard_files(out, _recorded_shard_names(out)):
        p.unlink()
    manifest.unlink(missing_ok=True)
    shutil.rmtree(state, ignore_errors=True)


def _prepare_output(out: Path, fingerprint: dict, overwrite: bool) -> None:
    state = out / STATE_DIR
    if overwrite and out.exists():
        _remove_build(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"output_dir={out} cannot be created: {exc.strerror}") from exc
    state.mkdir(exist_ok=True)
    fp_path = state / "build.json"
    if fp_path.is_file():
        previous = json.loads(fp_path.read_text(encoding="utf-8"))
        difference = describe_difference(previous, json.loads(json.dumps(fingerprint)))
        if difference:
            raise BuildError(
                f"{out} holds a build with other settings or inputs ({difference}); "
                "use another output_dir or overwrite=true"
            )
    else:
        write_json_atomic(fp_path, fingerprint)
    names = [s["name"] for s in fingerprint["sources"]]
    index, n = fingerprint["shard_index"], fingerprint["num_shards"]
    for p in shard_files(out, shard_names(names, index, n)):
        if p.name.endswith((".tmp", ".order")):
            p.unlink()  # leftovers of a killed run; their groups are rebuilt


def _make_pool(workers: int, tok: WorldTokenizer) -> Any:
    """Worker processes holding a tokenizer each.

    Forked workers share the parent's loaded vocabulary and core (copy-on-write) and start at
    once; where fork is unavailable, or torch is loaded (it starts threads that must not be
    forked), spawned workers load the built core from its file and never import torch.
    """
    if "fork" in mp.get_all_start_methods() and "torch" not in sys.modules:
        return mp.get_context("fork").Pool(workers)
    ctx = mp.get_context("spawn")
    return ctx.Pool(workers, encode.init_worker, (tok.core_path, tok.backend))


def _partition(files: list[str], fmt: str, cfg: BuildConfig) -> list[str]:
    if cfg.num_shards == 1 or fmt in ("hf_disk", "hf_hub"):
        return files  # datasets are split by rows, see iter_batches
    return files[cfg.shard_index :: cfg.num_shards]


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Run a build (or resume one) and return its manifest."""
    check_config(cfg)
    out = Path(cfg.output_dir)
    specs = source_specs(cfg)
    tok = WorldTokenizer(backend=cfg.tokenizer_backend)  # type: ignore[arg-type]
    log.info("tokenizer engine: %s", tok.backend)
    tok_info = {"name": tok.name, "vocab_size": tok.vocab_size, "sha256": tok.vocab_sha256()}
    plans, inputs = [], []
    for spec in specs:
        files = expand_paths(spec) if spec.paths else []
        fmt = source_format(spec, files)
        inputs += files
        plans.append((spec, _partition(files, fmt, cfg), fmt))
    fingerprint = _fingerprint(cfg, specs, tok_info, inputs)
    _prepare_output(out, fingerprint, cfg.overwrite)

    workers = usable_cpus() if cfg.workers is None else cfg.workers
    encode.set_tokenizer(tok)
    pool = _make_pool(workers, tok) if workers > 1 else None
    part = (cfg.shard_index, cfg.num_shards)
    shards: list[dict] = []
    sources: list[dict] = []
    try:
        for index, (spec, files, fmt) in enumerate(plans):
            (name,) = shard_names([spec.name], cfg.shard_index, cfg.num_shards)
            packer = _Packer(cfg, out, spec, name)
            if not packer.done:
                _run_source(cfg, index, spec, files, fmt, packer, pool, workers, part)
            else:
                log.info("%s: already built, skipped", spec.name)
            shards.extend(packer.shards)
            sources.append(packer.counters)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    build_info = {
        k: v for k, v in fingerprint.items() if k not in ("tokenizer", "sources", "files")
    }
    manifest = make_manifest(tok_info, shards, sources, build_info)
    _summary(manifest)
    _check_written(manifest, cfg.num_shards)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _check_written(manifest: dict, num_shards: int) -> None:
    """A build that wrote no document at all is an error (wrong text_field, wrong format...),
    not an empty data folder that training refuses later; a source that wrote none is
    named. One part of a cluster build may be empty, so parts are not checked."""
    if num_shards > 1:
        return
    empty = [s["name"] for s in manifest["sources"] if s["documents_written"] == 0]
    if empty and len(empty) == len(manifest["sources"]):
        raise BuildError(
            "no document was written (the counts above say why: check text_field and the "
            "input format); no manifest was written"
        )
    if empty:
        log.warning("no document written for source(s) %s", ", ".join(empty))


def _run_source(
    cfg: BuildConfig,
    index: int,
    spec: SourceSpec,
    files: list[str],
    fmt: str,
    packer: _Packer,
    pool: Any,
    workers: int,
    part: tuple[int, int],
) -> None:
    val_fraction = cfg.val_fraction if spec.val_fraction is None else spec.val_fraction
    batches = iter_batches(
        index, spec, files, fmt, packer.position, cfg.batch_bytes, cfg.batch_records, part
    )
    window = max(1, workers * cfg.in_flight_per_worker)
    bar = Progress(spec.name, enabled=cfg.progress)
    try:
        for head, enc in _ordered_results(batches, pool, window, val_fraction, cfg.strict):
            if enc is None:
                packer.problem(head)  # type: ignore[arg-type]
                continue
            packer.batch(head, enc)  # type: ignore[arg-type]
            counters = packer.counters
            bar.update(enc.nbytes, docs=counters["documents_written"], tokens=counters["tokens"])
        packer.finish_group(final=True)
    except BaseException:
        packer.writer.abort()
        raise
    finally:
        bar.close()


def _summary(manifest: dict) -> None:
    log.info(
        "%d shards, %d documents, %d tokens",
        len(manifest["shards"]),
        manifest["total_documents"],
        manifest["total_tokens"],
    )
    for s in manifest["sources"]:
        rejected = Counter(s["rejected"])
        line = ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "none"
        log.info(
            "source %s: %d in, %d written, rejected: %s",
            s["name"],
            s["documents_in"],
            s["documents_written"],
            line,
        )


def config_from_hydra(cfg: DictConfig) -> BuildConfig:
    """Check the composed config against BuildConfig (a typo'd key fails here, clearly)."""
    schema = OmegaConf.structured(BuildConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except ConfigKeyError as exc:
        raise BuildError(f"{exc.full_key}: no such setting (--help lists them)") from exc
    except ValidationError as exc:
        raise BuildError(f"{exc.full_key}: {exc.msg.splitlines()[0]}") from exc
    return BuildConfig(**OmegaConf.to_container(merged, resolve=True))  # type: ignore[arg-type]


def hydra_run_dir(output_dir: str) -> str:
    """Where Hydra keeps the build's log (hydra.run.dir): output_dir/.hydra.

    Hydra creates that folder before the build starts, so where output_dir is missing or
    cannot be a folder this gives one in the temporary folder instead, and the build reports
    the problem in one line rather than Hydra with a traceback.
    """
    if output_dir not in ("", "???"):
        run_dir = Path(output_dir) / ".hydra"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            return str(run_dir)
        except OSError:
            pass
    return str(Path(tempfile.gettempdir()) / f"data_prep-{os.getuid()}")


OmegaConf.register_new_resolver("data_prep_run_dir", hydra_run_dir, replace=True)


@hydra.main(config_path=str(conf_dir()), config_name="data_prep", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m data_prep.build inputs='[a.jsonl]' output_dir=DIR`."""
    try:
        build(config_from_hydra(cfg))
    except (BuildError, BadInputError, FileNotFoundError) as exc:
        log.error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
