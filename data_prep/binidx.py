"""The Megatron MMIDIDX ("binidx") format: the one reader and the one writer in the project.

A shard is two files: PREFIX.bin holds the tokens of every document back to back, and
PREFIX.idx the header, the length of every document, its byte offset and the document index.
All integers are little-endian. Readers elsewhere (megatron-core's IndexedDataset, RWKV-LM)
read what this writes; the tests check that.
"""

import hashlib
import os
import struct
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
# Codes as Megatron numbers them; 7 is ambiguous between versions and never written.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class BinIdxFormatError(ValueError):
    """A .idx/.bin pair that does not follow the format."""


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class BinIdxWriter:
    """Streams documents into PREFIX.bin and writes PREFIX.idx on `close()`.

    Both files are written under temporary names and renamed at the end, so a killed
    process never leaves a shard that looks complete. Use as a context manager; an
    exception inside the block removes the temporary files instead of finishing them.
    After `close()`, `bin_sha256` and `idx_sha256` hold the checksums of the finished files
    (computed while writing, so manifests need no second pass over the data).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type = np.uint16) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no binidx code")
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self._bin = open(_tmp(self.bin_path), "wb")  # noqa: SIM115 - closed in close()/abort()
        self._sizes = array("q")  # 8 bytes per document, not a Python int each
        self._hash = hashlib.sha256()
        self.num_tokens = 0
        self.bin_sha256: str | None = None
        self.idx_sha256: str | None = None

    def __len__(self) -> int:
        return len(self._sizes)

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document (the caller adds the end-of-document token)."""
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype}")
        data = arr.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._hash.update(data)
        self._sizes.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append several documents at once: `tokens` back to back, `sizes` their lengths.

        One write for many documents: the packing loop of data_prep calls this per run of
        documents, not per document.
        """
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != tokens.size or (sizes.size and sizes.min() < 0):
            raise ValueError("sizes must be non-negative and add up to the number of tokens")
        data = tokens.tobytes()
        self._bin.write(data)
        self._hash.update(data)
        self._sizes.frombytes(sizes.tobytes())
        self.num_tokens += int(tokens.size)

    def close(self, order: Sequence[int] | np.ndarray | None = None) -> None:
        """Finish both files and move them to their final names (.idx last).

        `order`, a permutation of the document numbers, stores the documents in that order
        (a seeded shuffle): the data is rewritten from the temporary file through a memory map,
        so shuffling a shard costs disk reads, not memory.
        """
        self._bin.flush()
        self._bin.close()
        sizes: Sequence[int] | np.ndarray = self._sizes
        if order is not None:
            sizes = self._reorder(np.asarray(order, dtype=np.int64))
        else:
            with open(_tmp(self.bin_path), "rb+") as f:
                os.fsync(f.fileno())
        self.bin_sha256 = self._hash.hexdigest()
        self.idx_sha256 = write_index(_tmp(self.idx_path), sizes, self.dtype)
        os.replace(_tmp(self.bin_path), self.bin_path)
        os.replace(_tmp(self.idx_path), self.idx_path)

    def _reorder(self, order: np.ndarray) -> np.ndarray:
        sizes = np.frombuffer(self._sizes, dtype=np.int64)
        if len(order) != len(sizes) or not np.array_equal(np.sort(order), np.arange(len(sizes))):
            raise ValueError("order must be a permutation of the document numbers")
        src_path = _tmp(self.bin_path)
        dst_path = src_path.with_name(src_path.name + ".order")
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        src = np.memmap(src_path, dtype=self.dtype, mode="r") if starts[-1] else None
        self._hash = hashlib.sha256()
        with open(dst_path, "wb") as dst:
            for i in order.tolist():
                data = src[starts[i] : starts[i + 1]].tobytes() if src is not None else b""
                dst.write(data)
                self._hash.update(data)
            dst.flush()
            os.fsync(dst.fileno())
        del src
        os.replace(dst_path, src_path)
        return sizes[order]

    def abort(self) -> None:
        """Drop the partial shard."""
        self._bin.close()
        for p in (_tmp(self.bin_path), _tmp(self.idx_path)):
            p.unlink(missing_ok=True)

    def __enter__(self) -> "BinIdxWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_index(path: Path, sizes: Sequence[int] | np.ndarray, dtype: np.dtype) -> str:
    """Write a .idx for documents of the given lengths, one sequence per document.

    Returns the sha256 of the file written.
    """
    n = len(sizes)
    sizes_arr = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(sizes_arr[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    data = b"".join(
        [
            MAGIC,
            struct.pack("<Q", VERSION),
            struct.pack("<B", CODE_OF[dtype]),
            struct.pack("<Q", n),
            struct.pack("<Q", n + 1),
            sizes_arr.astype("<i4").tobytes(),
            pointers.astype("<i8").tobytes(),
            doc_idx.astype("<i8").tobytes(),
        ]
    )
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


class BinIdxReader:
    """Random access to the documents of a shard through a memory map.

    Nothing is read until used, and the memory map is opened on first access, so a reader
    can be created in one process and used in DataLoader workers (fork or spawn) without
    copying the data.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self.dtype, self.sizes, self.pointers, self.doc_idx = read_index(self.idx_path)
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the shard as one flat read-only array."""
        if self._tokens is None:
            expected = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
            actual = self.bin_path.stat().st_size
            if actual != expected:
                raise BinIdxFormatError(
                    f"{self.bin_path}: {actual} bytes, the index describes {expected}"
                )
            if expected == 0:
                self._tokens = np.zeros(0, dtype=self.dtype)
            else:
                self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        return self._tokens

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tokens"] = None  # reopen the map in the receiving process
        return state


def read_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Parse and check a .idx file: (dtype, sizes, pointers, doc_idx)."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_SIZE or data[: len(MAGIC)] != MAGIC:
        raise BinIdxFormatError(f"{path}: not a binidx index (bad magic)")
    off = len(MAGIC)
    (version,) = struct.unpack_from("<Q", data, off)
    (code,) = struct.unpack_from("<B", data, off + 8)
    n, m = struct.unpack_from("<QQ", data, off + 9)
    if version != VERSION:
        raise BinIdxFormatError(f"{path}: version {version}, expected {VERSION}")
    if code not in DTYPE_CODES:
        raise BinIdxFormatError(f"{path}: unknown dtype code {code}")
    if len(data) != HEADER_SIZE + 12 * n + 8 * m:
        raise BinIdxFormatError(
            f"{path}: {len(data)} bytes, the header implies {HEADER_SIZE + 12 * n + 8 * m}"
        )
    sizes = np.frombuffer(data, dtype="<i4", count=n, offset=HEADER_SIZE)
    pointers = np.frombuffer(data, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n)
    doc_idx = np.frombuffer(data, dtype="<i8", count=m, offset=HEADER_SIZE + 12 * n)
    return np.dtype(DTYPE_CODES[code]), sizes, pointers, doc_idx
