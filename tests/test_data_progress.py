"""data_prep.progress: a bar on a terminal, a plain line per interval in a log file."""

import io
import threading

from data_prep.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_interval_and_one_at_the_end():
    clock, log = Clock(), io.StringIO()
    bar = Progress("verify", total=4e9, stream=log, interval=60, clock=clock)
    for _ in range(10):  # 10 s of 100 MB/s: under the interval, nothing yet
        clock.now += 1
        bar.update(1e8)
    assert log.getvalue() == ""
    clock.now += 50
    bar.update(5e8, docs=12)
    assert log.getvalue() == (
        "verify: 1.50 GB of 4.00 GB (37.5 %), 25.00 MB/s, docs 12, 1m00s elapsed, "
        "about 1m40s left\n"
    )
    clock.now += 30
    bar.update(1e8, docs=20)
    assert log.getvalue().count("\n") == 1
    bar.close()
    last = log.getvalue().splitlines()[-1]
    assert last == "verify: 1.60 GB of 4.00 GB (40.0 %), 17.78 MB/s, docs 20, 1m30s elapsed, " + (
        "about 2m15s left"
    )
    bar.close()
    bar.update(1)
    assert log.getvalue().count("\n") == 2 and "\r" not in log.getvalue()


def test_without_a_total_the_line_says_what_was_done():
    clock, log = Clock(), io.StringIO()
    with Progress("wiki", stream=log, clock=clock) as bar:
        clock.now += 3725
        bar.update(512, tokens=7)
    assert log.getvalue() == "wiki: 512 B, 0 B/s, tokens 7, 1h02m elapsed\n"


def test_a_terminal_gets_a_bar_and_disabled_means_silent():
    term = Terminal()
    with Progress("verify", total=100, stream=term) as bar:
        bar.update(40, docs=3)
    assert "\r" in term.getvalue() and " 40%" in term.getvalue()
    for stream in (io.StringIO(), Terminal()):
        with Progress("x", total=10, stream=stream, enabled=False) as bar:
            bar.update(10)
        assert stream.getvalue() == "" and bar.done == 10


def test_updates_from_threads_are_all_counted():
    bar = Progress("verify", total=8000, stream=io.StringIO(), interval=0)
    threads = [
        threading.Thread(target=lambda: [bar.update(1) for _ in range(2000)]) for _ in "abcd"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    assert bar.done == 8000
    assert bar.stream.getvalue().splitlines()[-1].startswith("verify: 8.00 kB of 8.00 kB (100.0 %)")
