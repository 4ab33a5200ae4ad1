"""Token streams over binidx shards and the dataset of ctx_len+1 token windows."""

import os
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from data_prep.binidx import BinIdxReader
from rwkv_train.data.order import FeistelPermutation, MixtureSchedule

T = TypeVar("T")


class TokenStream:
    """Several shards read as one flat array of tokens.

    Only the small .idx files are read on construction; the .bin memory maps open on first
    use in the process that reads them (BinIdxReader drops its map when pickled).
    """

    def __init__(self, prefixes: Sequence[str | os.PathLike]) -> None:
        self.readers = [BinIdxReader(p) for p in prefixes]
        lengths = [int(r.sizes.sum(dtype=np.int64)) for r in self.readers]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, crossing shard boundaries if needed."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {len(self)}")
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while length > 0:
            local = start - int(self.offsets[i])
            take = min(length, int(self.offsets[i + 1]) - start)
            parts.append(self.readers[i].tokens[local : local + take])
            start, length, i = start + take, length - take, i + 1
        return np.concatenate(parts).astype(np.int64)

    def num_chunks(self, ctx_len: int) -> int:
        """How many windows of ctx_len+1 tokens start at multiples of ctx_len."""
        return max(0, (len(self) - 1) // ctx_len)


class ChunkDataset(Dataset):
    """Sample g of the run: the window chosen for global sample index g.

    Indexing by the global index (not by chunk) is what makes the data order a pure function
    of (g, seed): the DataLoader's sampler only has to produce the right g's.
    """

    def __init__(
        self,
        streams: Sequence[TokenStream],
        weights: Sequence[float],
        ctx_len: int,
        seed: int,
    ) -> None:
        self.streams = list(streams)
        self.ctx_len = ctx_len
        self.seed = seed
        self.n_chunks = [s.num_chunks(ctx_len) for s in self.streams]
        if min(self.n_chunks) < 1:
            raise ValueError(f"a source has fewer than ctx_len+1 = {ctx_len + 1} tokens")
        self.schedule = MixtureSchedule(weights)

    def chunk_of(self, g: int) -> tuple[int, int]:
        """(source, chunk) read by global sample index g."""
        source, k = self.schedule.locate(g)
        n = self.n_chunks[source]
        epoch, i = divmod(k, n)
        perm = FeistelPermutation(n, key=(self.seed, source, epoch))
        return source, perm(i)

    def __getitem__(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, chunk = self.chunk_of(int(g))
        window = torch.from_numpy(self.streams[source].read(chunk * self.ctx_len, self.ctx_len + 1))
        return window[:-1], window[1:]


def rank_slice(items: Sequence[T], rank: int, world: int, filler: T) -> list[T]:
    """Rank `rank`'s share of `items` (every world-th), padded with `filler` to the count of
    the rank with most: under ZeRO-3 every rank must run the same number of forward passes,
    so a rank with fewer repeats a marked item that counts nowhere."""
    mine = list(items[rank::world])
    return mine + [filler] * (-(-len(items) // world) - len(mine))


class ValidationChunks(Dataset):
    """The validation samples of one rank: (x, y, source) windows.

    The first chunks of every source's val shards are taken in turn (chunk 0 of each source,
    then chunk 1, ...), `total` in all, so each source is measured whatever order its shards
    have in the manifest, and every evaluation sees the same samples. Rank r of `world` takes
    every world-th of them. A rank with fewer than the others repeats one marked source -1
    (counted nowhere): under ZeRO-3 every rank must run the same number of forward passes.
    """

    def __init__(
        self,
        streams: Sequence[TokenStream],
        ctx_len: int,
        total: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.streams = list(streams)
        self.ctx_len = ctx_len
        counts = [s.num_chunks(ctx_len) for s in self.streams]
        order: list[tuple[int, int]] = []
        for k in range(max(counts, default=0)):
            order += [(s, k) for s, n in enumerate(counts) if k < n]
            if len(order) >= total:
                break
        self.items = rank_slice(order[:total], rank, world, (-1, 0))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        source, chunk = self.items[i]
        stream = self.streams[max(source, 0)]
        window = torch.from_numpy(stream.read(chunk * self.ctx_len, self.ctx_len + 1))
        return window[:-1], window[1:], source
