"""The data order: coverage per epoch, purity in (index, seed), resume and rank disjointness."""

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from train_utils import write_data_folder

from rwkv_train.data import (
    ChunkDataset,
    FeistelPermutation,
    MixtureSchedule,
    StepBatchSampler,
    TokenStream,
    global_index,
    load_manifest,
)
from rwkv_train.data.manifest import split_by_source

CTX = 4


def stream_with_chunks(tmp_path: Path, n_chunks: int, n_shards: int = 3) -> TokenStream:
    """A stream of exactly n_chunks * CTX + 1 tokens (value = position mod 60000), split over
    shards, so a window's first token tells which chunk it is."""
    total = n_chunks * CTX + 1
    tokens = (np.arange(total) % 60000).astype(np.uint16)
    cuts = np.linspace(0, total, n_shards + 1).astype(int)
    docs = [[tokens[a:b]] for a, b in itertools.pairwise(cuts)]
    folder = write_data_folder(tmp_path / f"d{n_chunks}", docs, vocab_size=65536)
    return TokenStream(load_manifest(folder).train)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 223, 1000, 4097])
def test_permutation_is_a_bijection(n: int) -> None:
    for key in [(0, 0, 0), (7, 1, 3)]:
        perm = FeistelPermutation(n, key)
        assert sorted(perm(i) for i in range(n)) == list(range(n))


@pytest.mark.parametrize("n_chunks", [10, 100, 223])
def test_every_chunk_once_per_epoch(tmp_path: Path, n_chunks: int) -> None:
    stream = stream_with_chunks(tmp_path, n_chunks)
    assert stream.num_chunks(CTX) == n_chunks
    ds = ChunkDataset([stream], [1.0], CTX, seed=3)
    for epoch in range(3):
        firsts = [int(ds[epoch * n_chunks + i][0][0]) for i in range(n_chunks)]
        assert sorted(firsts) == [(c * CTX) % 60000 for c in range(n_chunks)]
    orders = [[ds.chunk_of(e * n_chunks + i)[1] for i in range(n_chunks)] for e in range(2)]
    assert orders[0] != orders[1], "each epoch should have its own order"


def test_windows_are_contiguous_across_shards(tmp_path: Path) -> None:
    stream = stream_with_chunks(tmp_path, 10, n_shards=4)
    ds = ChunkDataset([stream], [1.0], CTX, seed=0)
    for g in range(10):
        x, y = ds[g]
        start = int(x[0])
        assert x.tolist() == list(range(start, start + CTX))
        assert y.tolist() == list(range(start + 1, start + CTX + 1))


def test_position_is_a_pure_function_of_index_and_seed(tmp_path: Path) -> None:
    stream = stream_with_chunks(tmp_path, 100)
    a = ChunkDataset([stream], [1.0], CTX, seed=1)
    b = ChunkDataset([TokenStream([r.prefix for r in stream.readers])], [1.0], CTX, seed=1)
    c = ChunkDataset([stream], [1.0], CTX, seed=2)
    idx = [5, 0, 999, 17, 250]
    assert [a.chunk_of(g) for g in idx] == [b.chunk_of(g) for g in idx]
    assert [a.chunk_of(g) for g in range(100)] != [c.chunk_of(g) for g in range(100)]


def test_index_mapping_formula() -> None:
    """g = step*G + micro_step*(W*M) + rank*M + b, and the sampler follows it."""
    M, W, A = 3, 2, 2
    G = M * W * A
    seen = []
    for rank in range(W):
        it = iter(StepBatchSampler(M, W, rank, A, first_sample=5 * G))
        for step in range(5, 7):
            for m in range(A):
                batch = next(it)
                assert batch == [global_index(step, m, rank, b, M, W, A) for b in range(M)]
                seen += batch
    assert sorted(seen) == list(range(5 * G, 7 * G))


def test_a_changed_global_batch_continues_without_gap_or_repeat() -> None:
    """After 7 steps of G=5 (35 samples), steps of G' = 2 ranks x 3 x 2 = 12 read 35, 36, ...
    each rank a disjoint slice of every step."""
    M, W, A = 3, 2, 2
    steps = [[] for _ in range(3)]
    for rank in range(W):
        it = iter(StepBatchSampler(M, W, rank, A, first_sample=35))
        for s in range(3):
            for _ in range(A):
                steps[s] += next(it)
    for s, ids in enumerate(steps):
        assert sorted(ids) == list(range(35 + 12 * s, 35 + 12 * (s + 1)))


def test_ranks_are_disjoint_and_cover_each_step() -> None:
    M, W, A = 2, 4, 3
    per_rank = []
    for rank in range(W):
        it = iter(StepBatchSampler(M, W, rank, A))
        per_rank.append({g for _ in range(10 * A) for g in next(it)})
    for i in range(W):
        for j in range(i + 1, W):
            assert not per_rank[i] & per_rank[j]
    assert set().union(*per_rank) == set(range(10 * M * W * A))


def _loader(ds: ChunkDataset, sampler: StepBatchSampler, workers: int) -> DataLoader:
    return DataLoader(ds, batch_sampler=sampler, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_bit_identical_after_restart(tmp_path: Path, workers: int) -> None:
    """Read 40 batches; everything rebuilt from the 120 samples consumed reads the same next 8."""
    stream = stream_with_chunks(tmp_path, 223)
    make = lambda: ChunkDataset([stream], [1.0], CTX, seed=11)  # noqa: E731
    A = 2
    sampler = StepBatchSampler(micro_batch=3, world=1, rank=0, accum=A)
    it = iter(_loader(make(), sampler, workers))
    for _ in range(40):
        next(it)
    expected = [next(it) for _ in range(8)]

    fresh = StepBatchSampler(micro_batch=3, world=1, rank=0, accum=A, first_sample=40 * 3)
    it2 = iter(_loader(make(), fresh, workers))
    got = [next(it2) for _ in range(8)]
    for (x1, y1), (x2, y2) in zip(expected, got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_split_by_source_weights_chunks_times_multipliers(tmp_path: Path) -> None:
    doc = lambda n: np.array([*range(1, n), 0], dtype=np.uint16)  # noqa: E731
    folder = write_data_folder(
        tmp_path,
        [[doc(161)], [doc(161)], [doc(81)], [doc(10)]],  # a: 20 chunks of 16, b: 5, c: none
        {"a": [doc(40)], "c": [doc(40)], "v": [doc(40)]},  # v: val shards only
        train_sources=["a", "a", "b", "c"],
    )
    m = load_manifest(folder)
    parts, short = split_by_source(m, {"b": 2}, 16)
    assert [(p.train_tokens, p.val.keys(), share) for p, share in parts] == [
        (322, {"a"}, pytest.approx(2 / 3)),
        (81, set(), pytest.approx(1 / 3)),
    ]
    assert short == ["c"] and len(parts[0][0].train) == 2
    parts, _ = split_by_source(m, {"a": 0}, 16)  # left out
    assert [p.train_tokens for p, _ in parts] == [81]
    for name in ("zzz", "v"):
        with pytest.raises(ValueError, match=rf"no source \['{name}'\] with train shards"):
            split_by_source(m, {name: 1}, 16)
    with pytest.raises(ValueError, match=">= 0"):
        split_by_source(m, {"a": -1}, 16)


def test_mixture_weights_and_dense_source_indices() -> None:
    sched = MixtureSchedule([0.7, 0.2, 0.1])
    n = 10 * sched.period
    located = [sched.locate(g) for g in range(n)]
    counts = Counter(j for j, _ in located)
    assert [counts[j] / n for j in range(3)] == pytest.approx([0.7, 0.2, 0.1])
    for j in range(3):  # each source is read as 0, 1, 2, ... in global order
        assert [k for jj, k in located if jj == j] == list(range(counts[j]))
    # smooth interleaving: the rare source never waits much longer than its share implies
    gaps = np.diff([g for g, (j, _) in enumerate(located) if j == 2])
    assert gaps.max() <= 10


def test_mixture_dataset_draws_from_both_sources(tmp_path: Path) -> None:
    a = stream_with_chunks(tmp_path / "a", 10)
    b_docs = [[np.full(41, 60001, dtype=np.uint16)]]
    b = TokenStream(
        load_manifest(write_data_folder(tmp_path / "b", b_docs, vocab_size=65536)).train
    )
    ds = ChunkDataset([a, b], [3.0, 1.0], CTX, seed=0)
    from_b = sum(int(ds[g][0][0]) == 60001 for g in range(400))
    assert from_b == 100
