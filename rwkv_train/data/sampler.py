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
    optimizer step `step`: step*G + micro_step*(world*micro_batch) + rank*micro_batch + b."""
    return ((step * accum + micro_step) * world + rank) * micro_batch + b


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of global indices forever, from a start step.

    Endless on purpose: training length is `trainer.max_steps`, and epochs are a property of
    each source's permutation, not of the loader.
    """

    def __init__(
        self, micro_batch: int, world: int, rank: int, accum: int, start_step: int = 0
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.micro_batch = micro_batch
        self.world = world
        self.rank = rank
        self.accum = accum
        self.start_step = start_step

    @property
    def samples_per_step(self) -> int:
        """G: samples consumed by one optimizer step across all ranks."""
        return self.accum * self.world * self.micro_batch

    def state_dict(self) -> dict[str, int]:
        """The data position: consumed samples (at an optimizer-step boundary)."""
        return {"consumed_samples": self.start_step * self.samples_per_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after `consumed_samples`, which must be a whole number of steps."""
        steps, rest = divmod(int(state["consumed_samples"]), self.samples_per_step)
        if rest:
            raise ValueError(
                f"consumed_samples={state['consumed_samples']} is not a multiple of the global "
                f"batch {self.samples_per_step}: the batch configuration changed since the save"
            )
        self.start_step = steps

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for m in range(self.accum):
                first = global_index(
                    step, m, self.rank, 0, self.micro_batch, self.world, self.accum
                )
                yield list(range(first, first + self.micro_batch))
            step += 1
