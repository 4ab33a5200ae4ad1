"""Which global sample indices each rank reads at each micro-step.

The state of the data pipeline is one number, the count of samples consumed; everything
else is recomputed. See the package docstring for the index formula.
"""

from collections.abc import Iterator

from torch.utils.data import Sampler


def global_index(
    step: int, micro_step: int, rank: int, b: int, micro_batch: int, world: int, accum: int
) -> int:
    """The global sample index of position b of rank `rank`'s micro-batch `micro_step` of
    optimizer step `step`, counted from the sampler's first sample:
    step*G + micro_step*(world*micro_batch) + rank*micro_batch + b."""
    return ((step * accum + micro_step) * world + rank) * micro_batch + b


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of global indices forever, from `first_sample`, the
    samples consumed before (not always a multiple of G: a resume may have changed the
    global batch, see rwkv_train/progress.py).

    Endless on purpose: training length is `trainer.max_steps`, and epochs are a property of
    each source's permutation, not of the loader.
    """

    def __init__(
        self, micro_batch: int, world: int, rank: int, accum: int, first_sample: int = 0
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.micro_batch = micro_batch
        self.world = world
        self.rank = rank
        self.accum = accum
        self.first_sample = first_sample

    @property
    def samples_per_step(self) -> int:
        """G: samples consumed by one optimizer step across all ranks."""
        return self.accum * self.world * self.micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        step = 0
        while True:
            for m in range(self.accum):
                first = self.first_sample + global_index(
                    step, m, self.rank, 0, self.micro_batch, self.world, self.accum
                )
                yield list(range(first, first + self.micro_batch))
            step += 1
