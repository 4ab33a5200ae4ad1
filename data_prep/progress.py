"""Progress of long data work, readable on a terminal and in a batch job's log alike.

A build or a verify of a World-scale corpus runs for tens of minutes, mostly as a Slurm job
whose stderr is a file. A tqdm bar redraws one line with carriage returns: right on a
terminal, but in a log file it is either nothing at all (tqdm off a terminal) or one line
that grows by a redraw every tenth of a second. Off a terminal this prints a plain line
every `interval` seconds instead, and one at the end: the amount done, its share of the
total where the total is known, the rate and the time left.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

LOG_INTERVAL = 60.0  # seconds between two lines in a log file


def _size(n: float, unit: str) -> str:
    """`n` with an SI prefix, as tqdm's unit_scale writes it, so both modes read alike."""
    for prefix in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.2f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.2f} T{unit}"


def duration(seconds: float) -> str:
    """`1h02m` or `3m05s`: the precision a person watching a long job wants."""
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


class Progress:
    """A counter of done work that shows itself as a bar on a terminal, as log lines elsewhere.

    `update` may be called from several threads (verify's workers call it for every block).
    """

    def __init__(
        self,
        desc: str,
        total: float | None = None,
        unit: str = "B",
        enabled: bool = True,
        stream: IO[str] | None = None,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = sys.stderr if stream is None else stream
        self.interval, self.clock = interval, clock
        self.done = 0.0
        self._shown = -1.0  # `done` at the last line written
        self.postfix: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._start = self._last = clock()
        self._closed = not enabled
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                desc=desc,
                total=total,
                unit=unit,
                unit_scale=True,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, n: float, **postfix: Any) -> None:
        """Add `n` to the work done; `postfix` are counters shown beside it (docs, tokens)."""
        with self._lock:
            self.done += n
            self.postfix.update(postfix)
            if self._closed:
                return
            if self._bar is not None:
                self._bar.update(n)
                if postfix:
                    self._bar.set_postfix(self.postfix, refresh=False)
                return
            now = self.clock()
            if now - self._last >= self.interval:
                self._last = now
                self._write(now)

    def line(self, now: float | None = None) -> str:
        """The log line for the work done so far."""
        elapsed = max((self.clock() if now is None else now) - self._start, 1e-9)
        rate = self.done / elapsed
        parts = [_size(self.done, self.unit)]
        if self.total:
            parts[0] += f" of {_size(self.total, self.unit)} ({100 * self.done / self.total:.1f} %)"
        parts.append(f"{_size(rate, self.unit)}/s")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        parts.append(f"{duration(elapsed)} elapsed")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"about {duration((self.total - self.done) / rate)} left")
        return f"{self.desc}: " + ", ".join(parts)

    def _write(self, now: float) -> None:
        self._shown = self.done
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar, or write the last line unless it would repeat the one before: a log
        always says how far the work got."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            elif self.done != self._shown:
                self._write(self.clock())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
