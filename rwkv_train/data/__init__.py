"""From data-prep shards to training batches: the whole input pipeline of the trainer.

1. Sources. `data.path` names one data-prep output (its folder or its manifest.json) or a
   list of `{path, weight}` entries. Each manifest lists binidx shards with a split; the
   `train` shards of one manifest are read as one flat token stream (shard after shard,
   documents back to back, each ending in token 0), the `val` shards as another
   (`manifest.py`).
2. Chunks. A stream of N tokens holds n = floor((N - 1) / ctx_len) chunks; chunk c is the
   window tokens[c*ctx_len : c*ctx_len + ctx_len + 1], so inputs are its first ctx_len tokens
   and targets its last ctx_len. Windows cross document boundaries, as in the reference.
   Tokens are read from memory maps opened lazily in whichever process reads them, so
   DataLoader workers (fork or spawn) share the page cache instead of copying (`dataset.py`).
3. Order. Every sample has a global index g = 0, 1, 2, ... A mixture schedule, a fixed
   repeating pattern built from the weights, sends g to one source j and to that source's
   own running index k (so each source is read in its own order, k = 0, 1, 2, ...). Epoch
   e = k // n_j of that source reads its chunks in the order of a seeded bijection of
   {0..n_j-1} (a Feistel network with cycle walking, keyed by (seed, source, epoch)): every
   chunk exactly once per epoch, at any n, and a different order each epoch (`order.py`).
   The chunk of a sample is therefore a pure function of (g, seed): nothing to save but g.
4. Distribution. With micro-batch size M, W ranks and A accumulation steps, one optimizer
   step consumes G = A*W*M samples. Sample b of the micro-batch of rank r at micro-step m of
   step s has the global index
        g = s*G + m*(W*M) + r*M + b,
   so ranks read disjoint slices of every micro-step and the data position after step s is
   just (s + 1)*G (`sampler.py`). Resuming from a checkpoint at step S restarts the sampler
   at S*G: the batches are bitwise those an uninterrupted run would have read. A resume that
   changes G goes on from the samples consumed so far instead (`rwkv_train/progress.py`):
   g = g0 + (s - S)*G' + ..., no sample skipped or read twice.
5. Validation reads the `val` shards' chunks in order, the same ones at every evaluation.
"""

from rwkv_train.data.dataset import ChunkDataset, TokenStream
from rwkv_train.data.manifest import Manifest, load_manifest
from rwkv_train.data.order import FeistelPermutation, MixtureSchedule
from rwkv_train.data.sampler import StepBatchSampler, global_index

__all__ = [
    "ChunkDataset",
    "FeistelPermutation",
    "Manifest",
    "MixtureSchedule",
    "StepBatchSampler",
    "TokenStream",
    "global_index",
    "load_manifest",
]
