"""The LightningDataModule: DataLoaders over the train mixture and the val shards."""

import signal
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from rwkv_train.data.dataset import ChunkDataset, TokenStream, ValidationChunks
from rwkv_train.data.manifest import Manifest
from rwkv_train.data.sampler import StepBatchSampler
from rwkv_train.lambada import Item, RankPassages, collate_rows


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker start: a scheduler's SIGTERM goes to every process of a job, as
    Ctrl-C's SIGINT goes to every process in the terminal, and a worker it stopped would end
    training with an error before the trainer could save its checkpoint
    (rwkv_train/preempt.py). Workers leave with their parent instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class RecordingSampler(Sampler[list[int]]):
    """Passes a batch sampler's micro-batches through and, as training takes each one,
    appends it to a text file (one line of global indices per micro-batch):
    `data.record_sample_ids`, a debugging aid that shows which samples every rank trained on.

    DataLoader workers (and Lightning's fetcher) draw micro-batches ahead of training, so
    the drawn batches wait in a queue until `record_next()`, which the DataModule calls as
    the training loop takes a batch; a run that stops leaves the prefetched ones out.
    """

    def __init__(self, inner: Sampler[list[int]], path: Path) -> None:
        self.inner = inner
        self.path = path
        self.pending: deque[list[int]] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        self.pending.clear()  # a new pass (an epoch, a restart) draws from scratch
        for batch in self.inner:
            self.pending.append(batch)
            yield batch

    def record_next(self) -> None:
        """Write the oldest drawn micro-batch: the one training takes now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(" ".join(map(str, self.pending.popleft())) + "\n")


class TokenDataModule(L.LightningDataModule):
    """Builds the loaders from manifests; the train loader starts at the trainer's step.

    The data position is not saved separately: `train_dataloader()` runs after Lightning has
    restored a checkpoint, so it reads the restored `trainer.global_step` and the sampler
    continues at global sample `first_sample(global_step)` (global_step * G while the
    global batch has not changed, see rwkv_train/progress.py).
    """

    def __init__(
        self,
        manifests: list[Manifest],
        weights: list[float],
        ctx_len: int,
        micro_batch_size: int,
        accumulate: int,
        seed: int,
        first_sample: Callable[[int], int],
        num_workers: int = 0,
        val_samples: int = 0,
        sample_ids_dir: Path | None = None,
        val_manifests: list[Manifest] | None = None,
        lambada: list[Item] | None = None,
    ) -> None:
        super().__init__()
        self.manifests = manifests
        self.weights = weights
        self.ctx_len = ctx_len
        self.micro_batch_size = micro_batch_size
        self.accumulate = accumulate
        self.seed = seed
        self.first_sample = first_sample
        self.num_workers = num_workers
        self.val_samples = val_samples
        self.sample_ids_dir = sample_ids_dir
        self.lambada = lambada
        self.recorder: RecordingSampler | None = None
        self.train_set = ChunkDataset(
            [TokenStream(m.train) for m in manifests], weights, ctx_len, seed
        )
        self.val_names, self.val_streams = (
            val_sources(val_manifests or manifests, ctx_len) if val_samples else ([], [])
        )

    def mixture(self, samples: int) -> list[str]:
        """One line per train stream: its realised share of the samples, its tokens and how
        many epochs of it `samples` samples read, to check a mix before a long run."""
        paths = [m.path for m in self.manifests]
        lines = []
        for j, m in enumerate(self.manifests):
            name = m.path.parent.name
            if paths.count(m.path) > 1:  # one source of a build split by source
                name += "/" + ",".join(m.train_tokens_by_source())
            share = self.train_set.schedule.fractions[j]
            epochs = samples * share / self.train_set.n_chunks[j]
            lines.append(
                f"{name}: {share:.2%} of samples, {m.train_tokens:,} tokens, "
                f"{epochs:.3g} epochs in {samples:,} samples"
            )
        return lines

    def _loader_kwargs(self) -> dict:
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return {
            "num_workers": self.num_workers,
            "pin_memory": pin,
            "persistent_workers": self.num_workers > 0,
            "worker_init_fn": _ignore_stop_signals,
            # a private generator: creating worker seeds must not draw from the global RNG
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def train_sampler(self) -> StepBatchSampler:
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        start = self.first_sample(trainer.global_step if trainer is not None else 0)
        return StepBatchSampler(self.micro_batch_size, world, rank, self.accumulate, start)

    def train_dataloader(self) -> DataLoader:
        sampler: Sampler[list[int]] = self.train_sampler()
        if self.sample_ids_dir is not None:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            sampler = self.recorder = RecordingSampler(
                sampler, self.sample_ids_dir / f"rank{rank}.txt"
            )
        return DataLoader(self.train_set, batch_sampler=sampler, **self._loader_kwargs())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this as its loop takes a batch, after any prefetching."""
        if self.recorder is not None and self.trainer is not None and self.trainer.training:
            self.recorder.record_next()
        return batch

    def val_dataloader(self) -> list[DataLoader]:
        """The val shards' chunks and, with `lambada`, the LAMBADA passages (dict batches)."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        loaders = []
        if self.val_streams:
            chunks = ValidationChunks(self.val_streams, self.ctx_len, self.val_samples, rank, world)
            loaders.append(
                DataLoader(
                    chunks, batch_size=self.micro_batch_size, shuffle=False, **self._loader_kwargs()
                )
            )
        if self.lambada:
            loaders.append(
                DataLoader(
                    RankPassages(self.lambada, rank, world),
                    batch_size=self.micro_batch_size,
                    collate_fn=collate_rows,
                    **self._loader_kwargs(),
                )
            )
        return loaders


def val_sources(manifests: list[Manifest], ctx_len: int) -> tuple[list[str], list[TokenStream]]:
    """(names, streams) of the sources with at least one validation sample: the source
    names of one data folder (whole or split by source), or "<folder>.<source>" when several
    are mixed."""
    names: list[str] = []
    streams: list[TokenStream] = []
    short: list[str] = []
    one_folder = len({m.path for m in manifests}) == 1
    for i, m in enumerate(manifests):
        for source, prefixes in m.val.items():
            name = source if one_folder else f"{m.path.parent.name}.{source}"
            if name in names:  # two folders of the same name
                name = f"{name}.{i}"
            stream = TokenStream(prefixes)
            if stream.num_chunks(ctx_len) > 0:
                names.append(name)
                streams.append(stream)
            else:
                short.append(name)
    if short:
        rank_zero_info(
            "no validation for %d source(s) with fewer than ctx_len+1 = %d val tokens: %s",
            len(short),
            ctx_len + 1,
            ", ".join(short),
        )
    return names, streams
