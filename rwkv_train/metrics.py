"""Performance metrics (tokens/s, MFU, data wait, memory) and the run's own metrics file.

MFU = achieved model FLOP/s / peak FLOP/s of the device, where achieved = tokens/s x
`RWKVConfig.flops_per_token()` (forward + backward). Peak figures are dense bf16 tensor-core
numbers from the vendors' data sheets; `trainer.peak_flops` overrides the table (needed on
CPUs, which have no entry, so perf/mfu is not logged there by default).
"""

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device, from `override` or the table; None when unknown."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def max_memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA's max reserved on a GPU, the process's max RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class Throughput:
    """Times optimizer steps and the part of them spent waiting for data.

    `batch_start()` / `batch_end()` bracket the compute of each micro-batch; the gap from one
    micro-batch's end to the next one's start is data loading (plus loop overhead). The first
    step after a (re)start only sets the clock, so compile and warm-up costs do not count.
    """

    def __init__(self) -> None:
        self._last_end: float | None = None
        self._step_start: float | None = None
        self._wait = 0.0

    def batch_start(self) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait += now - self._last_end

    def batch_end(self) -> None:
        self._last_end = time.perf_counter()

    def step_end(self, tokens: int) -> dict[str, float]:
        """Per-device rates of the step that just ended (empty for the first)."""
        now = time.perf_counter()
        out: dict[str, float] = {}
        if self._step_start is not None:
            dt = max(now - self._step_start, 1e-9)
            out = {"tokens_per_sec": tokens / dt, "data_wait_pct": 100.0 * self._wait / dt}
        self._step_start, self._wait = now, 0.0
        return out


class JsonlLogger(Logger):
    """Every logged metric as one JSON line in run_dir/metrics.jsonl: the loss history that
    tests compare and that survives without W&B. On resume, lines after the resumed step
    (written by the killed run after its last checkpoint) are dropped first."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @property
    @rank_zero_experiment
    def experiment(self) -> None:
        return None

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    @rank_zero_only
    def truncate_after(self, step: int) -> None:
        """Drop records of steps > step."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(self.path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
