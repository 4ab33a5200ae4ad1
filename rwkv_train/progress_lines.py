"""Training progress as plain log lines, for runs whose output is a file (a Slurm job's log).

Lightning's progress bar redraws one line with carriage returns at every step: right on a
terminal, but in a batch job's log it is a single line that grows by a redraw a step, which
`tail`, `less` and `grep` cannot read, and the log holds no loss at all otherwise. Off a
terminal `trainer.progress_bar` therefore means this instead: a line at the first step, then
one every `interval` seconds and at the last step (step, loss, tokens/s, the time left at the
rate of this start), and a line around each validation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from data_prep.progress import LOG_INTERVAL, duration

log = logging.getLogger(__name__)


class ProgressLines(ProgressBar):
    """Lightning's progress bar as periodic log lines (rank 0 only, as the bar is)."""

    def __init__(
        self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval, self.clock = interval, clock
        self._enabled = True
        self._shown = -1  # the step of the last line
        self._last = -math.inf
        self._start, self._first_step = 0.0, 0
        self._val_start = 0.0
        self._due: float | None = None  # the time of a step whose line is to be written

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._first_step = self.clock(), trainer.global_step
        self._shown = trainer.global_step  # a line once a step is done

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._shown:  # accumulating: the step has not moved
            return
        now = self.clock()
        first, last = self._last == -math.inf, step >= trainer.max_steps
        if first or last or now - self._last >= self.interval:
            self._last, self._shown = now, step
            self._due = now

    # Lightning takes in the step's logged metrics after the batch-end hooks, so the line is
    # written at the next hook: the next batch, a validation, or the end.
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._write_due(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_due(trainer)

    def _write_due(self, trainer: L.Trainer) -> None:
        if self._due is not None:
            log.info("%s", self.line(trainer, self._due))
            self._due = None

    def line(self, trainer: L.Trainer, now: float) -> str:
        """`step 1200/100000 (1.2 %), loss 3.4121, 812,345 tok/s, 1h02m elapsed, ...`."""
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total} ({100 * step / total:.1f} %)"]
        metrics = trainer.progress_bar_metrics
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "tok/s" in metrics:
            parts.append(f"{metrics['tok/s']:,.0f} tok/s")
        elapsed = now - self._start
        parts.append(f"{duration(elapsed)} elapsed")
        done = step - self._first_step
        if done > 0 and step < total:
            parts.append(f"about {duration(elapsed / done * (total - step))} left")
        return ", ".join(parts)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_due(trainer)
        if self._enabled and not trainer.sanity_checking:
            self._val_start = self.clock()
            log.info("validating at step %d", trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking:
            took = duration(self.clock() - self._val_start)
            val = trainer.progress_bar_metrics.get("val_loss")
            result = "" if val is None else f": val_loss {val:.4f}"
            log.info("validation at step %d took %s%s", trainer.global_step, took, result)
