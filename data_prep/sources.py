"""Reading documents from corpus sources, as a stream of small batches of raw records.

A source is a named set of inputs of one format: JSON lines (.jsonl, .jsonl.zst, .jsonl.gz),
Parquet, plain text (.txt/.md, one file = one document), a Hugging Face `datasets` folder saved
with `save_to_disk`, or a named dataset streamed from the Hub. Reading stays streaming: files
are decompressed chunk by chunk and records leave in batches of bounded size, so memory does not
grow with the corpus.

The reading process only splits records; turning a record into text (JSON parsing, checking the
text field, UTF-8 decoding) happens in `record_text`, which the tokenizing workers call, so that
work is spread over the workers. Every record has a position (file number, record number in the
file) so a resumed build can skip exactly what finished shards already hold.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "jsonl", "parquet", "text", "hf_disk", "hf_hub")

# Reasons a record is not written, as counted in the manifest.
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_a_json_object"
MISSING_FIELD = "missing_text_field"
NOT_A_STRING = "text_not_a_string"
EMPTY = "empty_document"
BLANK_LINE = "blank_line"
INVALID_UTF8 = "invalid_utf8"
SURROGATE = "lone_surrogate"
TRUNCATED = "truncated_input"
TOO_LONG = "too_long"


class BadInputError(ValueError):
    """An input that cannot be used: a record under strict=true (else it is counted), or a
    source that cannot be read as given (unknown format, a missing column)."""


@dataclass
class SourceSpec:
    """One named source of documents (a corpus config entry or a quick-form input).

    name: names its shards and its entry in the manifest.
    paths: files, globs or folders (hf_disk); expanded and sorted.
    format: auto (from the file name) | jsonl | parquet | text | hf_disk | hf_hub.
    text_field: the field/column holding the document text.
    hf_name, hf_config, hf_split: the Hub dataset streamed when format is hf_hub.
    val_fraction: overrides the build's validation fraction for this source.
    """

    name: str
    paths: list[str] = field(default_factory=list)
    format: str = "auto"
    text_field: str = "text"
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    val_fraction: float | None = None


@dataclass
class Batch:
    """Consecutive records of one file: what a worker turns into tokens.

    kind is the record type (jsonl: raw line bytes; text: raw file bytes; value: a field value
    already extracted). positions[k] is (file number, record number) of items[k].
    """

    source: int
    kind: str
    label: str
    items: list[Any]
    positions: list[tuple[int, int]]
    text_field: str = "text"
    nbytes: int = 0


@dataclass
class ReadProblem:
    """A problem found while reading (not per record): a truncated compressed file."""

    reason: str
    label: str
    position: tuple[int, int]
    message: str


def source_name(path: str) -> str:
    """A shard-safe source name from an input path: the file name without its extensions."""
    base = Path(path.rstrip("/")).name
    for ext in (".zst", ".gz", ".jsonl", ".json", ".parquet", ".txt", ".md"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return re.sub(r"[^A-Za-z0-9.-]+", "-", base).strip("-") or "source"


def detect_format(path: str) -> str:
    """The format of an input path from its name (or, for a folder, its contents)."""
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf_disk"
        raise BadInputError(
            f"{path}: a folder input must be a datasets save_to_disk folder "
            f"(for the files in it, give a glob such as {path}/*.jsonl)"
        )
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.zst", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".md")):
        return "text"
    raise BadInputError(
        f"{path}: unknown input format (known: .jsonl, .jsonl.zst, .jsonl.gz, .parquet, .txt, "
        ".md; a corpus source can name its format)"
    )


def expand_paths(spec: SourceSpec) -> list[str]:
    """The sorted list of inputs of a source; a pattern matching nothing is an error."""
    out: list[str] = []
    for pattern in spec.paths:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else []
        if not matches:
            if not glob.has_magic(pattern) and os.path.exists(pattern):
                matches = [pattern]
            else:
                raise FileNotFoundError(f"source {spec.name}: no input matches {pattern}")
        out.extend(matches)
    return out


def source_format(spec: SourceSpec, files: list[str]) -> str:
    """The one format of a source (all its files must agree)."""
    if spec.format != "auto":
        return spec.format
    if spec.hf_name:
        return "hf_hub"
    formats = {detect_format(f) for f in files}
    if len(formats) != 1:
        raise BadInputError(f"source {spec.name}: inputs of several formats {sorted(formats)}")
    return formats.pop()


def _chunks_plain(path: str, size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def _chunks_gzip(path: str, size: int) -> Iterator[bytes]:
    with gzip.open(path, "rb") as f:
        while True:
            try:
                chunk = f.read(size)
            except (EOFError, gzip.BadGzipFile, OSError) as exc:
                raise _Truncated(str(exc)) from None
            if not chunk:
                return
            yield chunk


def _chunks_zstd(path: str, size: int) -> Iterator[bytes]:
    """Decompress frame after frame; input ending inside a frame is reported as truncated.

    (zstandard's stream_reader returns a truncated stream's prefix without any error.)
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    pending = False  # input fed to a frame that has not ended yet
    with open(path, "rb") as f:
        while raw := f.read(size):
            while raw:
                try:
                    out = dobj.decompress(raw)
                except zstandard.ZstdError as exc:
                    raise _Truncated(f"corrupt zstd data: {exc}") from None
                if out:
                    yield out
                pending = not dobj.eof
                raw = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj = dctx.decompressobj()
    if pending:
        raise _Truncated("the zstd stream ends inside a frame")


class _Truncated(Exception):
    pass


def _lines(path: str, chunk_size: int) -> Iterator[bytes]:
    """The lines of a (possibly compressed) file, without their newline."""
    name = path.lower()  # as detect_format: A.JSONL.GZ is compressed too
    if name.endswith(".zst"):
        chunks = _chunks_zstd(path, chunk_size)
    elif name.endswith(".gz"):
        chunks = _chunks_gzip(path, chunk_size)
    else:
        chunks = _chunks_plain(path, chunk_size)
    pending = b""
    for chunk in chunks:  # _Truncated propagates; the partial last line is dropped
        parts = (pending + chunk).split(b"\n")
        pending = parts.pop()
        yield from parts
    if pending:
        yield pending


def iter_batches(
    index: int,
    spec: SourceSpec,
    files: list[str],
    fmt: str,
    start: tuple[int, int],
    batch_bytes: int,
    batch_records: int,
    part: tuple[int, int] = (0, 1),
) -> Iterator[Batch | ReadProblem]:
    """The records of a source from position `start` = (file number, record number) on.

    `part` = (i, n) keeps part i of n of a dataset's rows (file sources are split by file by
    the caller instead).
    """
    if fmt == "hf_hub":
        yield from _hf_hub_batches(index, spec, start, batch_records, part)
        return
    for file_no, path in enumerate(files):
        if file_no < start[0]:
            continue
        skip = start[1] if file_no == start[0] else 0
        label = path
        if fmt == "jsonl":
            batch = Batch(index, "jsonl", label, [], [], spec.text_field)
            rec = 0
            try:
                for line in _lines(path, 1 << 20):
                    rec += 1
                    if rec <= skip:
                        continue
                    batch.items.append(line)
                    batch.positions.append((file_no, rec))
                    batch.nbytes += len(line) + 1
                    if batch.nbytes >= batch_bytes or len(batch.items) >= batch_records:
                        yield batch
                        batch = Batch(index, "jsonl", label, [], [], spec.text_field)
            except _Truncated as exc:
                if batch.items:
                    yield batch
                batch = Batch(index, "jsonl", label, [], [], spec.text_field)
                yield ReadProblem(TRUNCATED, label, (file_no, rec + 1), str(exc))
            if batch.items:
                yield batch
        elif fmt == "text":
            if skip == 0:
                data = Path(path).read_bytes()
                yield Batch(index, "text", label, [data], [(file_no, 1)], nbytes=len(data))
        elif fmt == "parquet":
            yield from _parquet_batches(index, spec, path, file_no, skip, batch_records)
        elif fmt == "hf_disk":
            yield from _hf_disk_batches(index, spec, path, file_no, skip, batch_records, part)
        else:
            raise BadInputError(f"source {spec.name}: unsupported format {fmt}")


def _value_batches(
    index: int,
    label: str,
    file_no: int,
    first_rec: int,
    values: list[Any],
    batch_records: int,
) -> Iterator[Batch]:
    for k in range(0, len(values), batch_records):
        part = values[k : k + batch_records]
        positions = [(file_no, first_rec + k + j + 1) for j in range(len(part))]
        nbytes = sum(len(v) for v in part if isinstance(v, str))
        yield Batch(index, "value", label, part, positions, nbytes=nbytes)


def _parquet_batches(
    index: int, spec: SourceSpec, path: str, file_no: int, skip: int, batch_records: int
) -> Iterator[Batch]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if spec.text_field not in pf.schema_arrow.names:
        # Every row lacks the field: report each as a missing field, as for JSON lines.
        for k in range(skip, pf.metadata.num_rows, batch_records):
            n = min(batch_records, pf.metadata.num_rows - k)
            yield Batch(
                index, "value", path, [_Missing()] * n, [(file_no, k + j + 1) for j in range(n)]
            )
        return
    rec = 0
    for rb in pf.iter_batches(batch_size=batch_records, columns=[spec.text_field]):
        n = rb.num_rows
        if rec + n <= skip:
            rec += n
            continue
        values = rb.column(0).to_pylist()
        lo = max(0, skip - rec)
        yield from _value_batches(index, path, file_no, rec + lo, values[lo:], batch_records)
        rec += n


def _hf_disk_batches(
    index: int,
    spec: SourceSpec,
    path: str,
    file_no: int,
    skip: int,
    batch_records: int,
    part: tuple[int, int],
) -> Iterator[Batch]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[spec.hf_split]
    if part[1] > 1:
        ds = ds.shard(num_shards=part[1], index=part[0], contiguous=True)
    if spec.text_field not in ds.column_names:
        raise BadInputError(f"source {spec.name}: {path} has no column {spec.text_field!r}")
    for k in range(skip, len(ds), batch_records):
        values = ds[k : k + batch_records][spec.text_field]
        yield from _value_batches(index, path, file_no, k, values, batch_records)


def _hf_hub_batches(
    index: int,
    spec: SourceSpec,
    start: tuple[int, int],
    batch_records: int,
    part: tuple[int, int],
) -> Iterator[Batch]:
    import datasets
    from datasets.distributed import split_dataset_by_node

    ds = datasets.load_dataset(spec.hf_name, spec.hf_config, split=spec.hf_split, streaming=True)
    if part[1] > 1:
        ds = split_dataset_by_node(ds, rank=part[0], world_size=part[1])
    if start[1]:
        ds = ds.skip(start[1])
    label = f"hf:{spec.hf_name}"
    rec = start[1]
    values: list[Any] = []
    for row in ds:
        values.append(row.get(spec.text_field, _Missing()))
        if len(values) >= batch_records:
            yield from _value_batches(index, label, 0, rec, values, batch_records)
            rec += len(values)
            values = []
    if values:
        yield from _value_batches(index, label, 0, rec, values, batch_records)


class _Missing:
    """Marks a record without the text field (pickles to the workers)."""


def record_text(kind: str, item: Any, text_field: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable record, (None, reason) otherwise."""
    if kind == "jsonl":
        if not item.strip():
            return None, BLANK_LINE
        try:
            obj = json.loads(item)
        except UnicodeDecodeError:
            return None, INVALID_UTF8
        except ValueError:
            return None, INVALID_JSON
        if not isinstance(obj, dict):
            return None, NOT_AN_OBJECT
        if text_field not in obj:
            return None, MISSING_FIELD
        text = obj[text_field]
    elif kind == "text":
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            return None, INVALID_UTF8
    else:
        if isinstance(item, _Missing):
            return None, MISSING_FIELD
        text = item
    if not isinstance(text, str):
        return None, NOT_A_STRING
    if not text.strip():
        return None, EMPTY
    return text, None
