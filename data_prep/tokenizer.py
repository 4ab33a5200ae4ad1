"""The RWKV World tokenizer: greedy longest match of UTF-8 bytes against a fixed vocabulary.

The ids are exactly those of `rwkv.rwkv_tokenizer.TRIE_TOKENIZER` (the reference), on any
input: every single byte is a token (ids 1..256), so every byte string is encodable, and
id 0 is the end-of-document marker, never produced by encoding. The vocabulary file is the one
shipped in the `rwkv` package, so there is one source of truth for it.

Two interchangeable engines: the compiled core (data_prep/tokenizer_core.cpp, built on first
use, see data_prep/core.py) and a pure-Python trie walk used when no compiler is available.
`WorldTokenizer.backend` says which one runs. Importing this module imports neither torch nor
the core.
"""

from __future__ import annotations

import ast
import codecs
import functools
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

VOCAB_NAME = "rwkv_vocab_v20230424"
VOCAB_SIZE = 65536  # the model's embedding rows; ids in the file are 1..65529
END_OF_DOC = 0

Backend = Literal["auto", "cpp", "python"]


def default_vocab_path() -> Path:
    """The vocabulary file inside the installed `rwkv` package (located without importing it)."""
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `rwkv` package is not installed; it ships the vocabulary")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / f"{VOCAB_NAME}.txt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{VOCAB_NAME}.txt not found in the `rwkv` package")


@functools.lru_cache(maxsize=4)
def read_vocab(path: str | os.PathLike) -> tuple[bytes | None, ...]:
    """Parse the vocabulary file into tokens[id] = bytes (None for ids not in the file).

    Lines are `<id> <python str or bytes literal> <byte length>`; str literals mean their UTF-8
    bytes. Literals are parsed with ast.literal_eval, never eval, except plain quoted strings
    without escapes (most lines), taken as they are: that halves the start-up time.
    Cached per process, as tokenizers are created once per build and per test.
    """
    by_id: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            first, last = line.index(" "), line.rindex(" ")
            lit = line[first + 1 : last]
            if len(lit) >= 2 and lit[0] in "'\"" and lit[-1] == lit[0] and "\\" not in lit:
                value: str | bytes = lit[1:-1]
            else:
                value = ast.literal_eval(lit)
            token = value.encode("utf-8") if isinstance(value, str) else value
            if not isinstance(token, bytes) or len(token) != int(line[last:]):
                raise ValueError(f"{path}:{lineno}: malformed vocabulary line")
            by_id[int(line[:first])] = token
    tokens: list[bytes | None] = [None] * (max(by_id) + 1)
    for i, token in by_id.items():
        tokens[i] = token
    return tuple(tokens)


class _PythonTrie:
    """Pure-Python greedy longest match: a trie kept as one flat dict of edges.

    A node is a multiple of 256 (its number shifted left by 8); the edge for byte b from node k
    is the dict entry k | b. One flat dict of ints is a tenth of the memory of nested dicts.
    """

    def __init__(self, tokens: Sequence[bytes | None]) -> None:
        self.edges: dict[int, int] = {}
        self.ids: list[int] = [0]
        for token_id, token in enumerate(tokens):
            if token is None:
                continue
            node = 0
            for b in token:
                key = node | b
                child = self.edges.get(key)
                if child is None:
                    child = len(self.ids) << 8
                    self.ids.append(0)
                    self.edges[key] = child
                node = child
            self.ids[node >> 8] = token_id

    def encode(self, data: bytes) -> list[int]:
        edges, ids = self.edges, self.ids
        out: list[int] = []
        append = out.append
        i, n = 0, len(data)
        while i < n:
            node = edges[data[i]]  # every single byte is a token
            best_id, best_end = ids[node >> 8], i + 1
            j = i + 1
            while j < n:
                node = edges.get(node | data[j])
                if node is None:
                    break
                j += 1
                token_id = ids[node >> 8]
                if token_id:
                    best_id, best_end = token_id, j
            if not best_id:
                raise ValueError("the vocabulary cannot encode some byte of the input")
            append(best_id)
            i = best_end
        return out


class WorldTokenizer:
    """Encode text to RWKV World ids and back.

    backend="auto" uses the compiled core when it can be built and the Python trie otherwise;
    "cpp" insists on the core, "python" never builds it. `core_path` loads an already built core
    from its file (how the data-prep workers avoid importing torch).
    """

    def __init__(
        self,
        vocab_path: str | os.PathLike | None = None,
        backend: Backend = "auto",
        core_path: str | os.PathLike | None = None,
    ) -> None:
        self.vocab_path = Path(vocab_path) if vocab_path else default_vocab_path()
        self.tokens = read_vocab(self.vocab_path)
        self.vocab_size = VOCAB_SIZE
        self.name = self.vocab_path.stem
        self._core = None
        self._vocab = None
        self._trie: _PythonTrie | None = None
        if backend not in ("auto", "cpp", "python"):
            raise ValueError(f"backend must be auto, cpp or python, not {backend!r}")
        if backend != "python":
            from data_prep import core as core_lib

            if backend == "cpp":
                self._core = (
                    core_lib.load_core_file(core_path) if core_path else core_lib.build_core()
                )
            else:
                self._core = core_lib.get_core(core_path)
        if self._core is not None:
            self._vocab = self._core.new_vocab(list(self.tokens))
            self.backend = "cpp"
        else:
            self._trie = _PythonTrie(self.tokens)
            self.backend = "python"
        log.info("World tokenizer: %s engine", self.backend)

    @property
    def core_path(self) -> str | None:
        """The file of the compiled core in use (None for the Python engine)."""
        return None if self._core is None else str(self._core.__file__)

    def vocab_sha256(self) -> str:
        """Checksum of the vocabulary file, recorded in every manifest."""
        return hashlib.sha256(self.vocab_path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ids of the UTF-8 bytes of `text` (lone surrogates raise, as in the reference)."""
        if self._core is not None:
            return self._core.encode(self._vocab, text)
        return self._trie.encode(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids of arbitrary bytes, valid UTF-8 or not."""
        if self._core is not None:
            return self._core.encode(self._vocab, data)
        return self._trie.encode(bytes(data))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """encode() of each text."""
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str | bytes) -> np.ndarray:
        """Ids as a uint16 array, without building Python ints (the packing path)."""
        if self._core is not None:
            return np.frombuffer(self._core.encode_u16(self._vocab, text), dtype=np.uint16)
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.asarray(self._trie.encode(data), dtype=np.uint16)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the ids, concatenated; raises ValueError on an id not in the vocab."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if self._core is not None:
            return self._core.decode(self._vocab, ids)
        try:
            parts = [self.tokens[i] if i >= 0 else None for i in ids]
        except IndexError as exc:
            raise ValueError(f"token id out of the vocabulary: {exc}") from None
        if any(p is None for p in parts):
            bad = next(i for i, p in zip(ids, parts, strict=False) if p is None)
            raise ValueError(f"token id {bad} is not in the vocabulary")
        return b"".join(parts)  # type: ignore[arg-type]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; invalid UTF-8 becomes U+FFFD per bad sequence.

        (The reference returns a lone U+FFFD for the whole text when any byte is invalid.)
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """A decoder fed ids a few at a time (generation), see StreamDecoder."""
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text as they arrive, holding back a character split across tokens.

    A token can end in the middle of a multi-byte UTF-8 character (CJK, emoji); feeding its
    bytes to an incremental UTF-8 decoder returns only the complete characters and keeps the
    rest until the next ids complete them, so no U+FFFD appears where the full text has none.
    """

    def __init__(self, tokenizer: WorldTokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        """The text completed by these ids."""
        return self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """Whatever is held back, with an incomplete final character as U+FFFD."""
        return self._utf8.decode(b"", final=True)
