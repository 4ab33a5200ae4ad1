"""The Megatron MMIDIDX ("binidx") format: the one reader and the one writer in the project.

A shard is two files: PREFIX.bin holds the tokens of every document back to back, and
PREFIX.idx the header, the length of every document, its byte offset and the document index.
All integers are little-endian. Readers elsewhere (megatron-core's IndexedDataset, RWKV-LM)
read what this writes; the tests check that.
"""

import os
import struct
from collections.abc import Iterable
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
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type = np.uint16) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no binidx code")
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self._bin = open(_tmp(self.bin_path), "wb")  # noqa: SIM115 - closed in close()/abort()
        self._sizes: list[int] = []

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document (the caller adds the end-of-document token)."""
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(int(arr.size))

    def close(self) -> None:
        """Finish both files and move them to their final names (.idx last)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(_tmp(self.idx_path), self._sizes, self.dtype)
        os.replace(_tmp(self.bin_path), self.bin_path)
        os.replace(_tmp(self.idx_path), self.idx_path)

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


def write_index(path: Path, sizes: list[int], dtype: np.dtype) -> None:
    """Write a .idx for documents of the given lengths, one sequence per document."""
    n = len(sizes)
    sizes_arr = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(sizes_arr[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF[dtype]))
        f.write(struct.pack("<Q", n))
        f.write(struct.pack("<Q", n + 1))
        f.write(sizes_arr.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_idx.astype("<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())


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
