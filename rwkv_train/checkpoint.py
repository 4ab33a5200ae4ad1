"""Full-state checkpoints: written atomically every N steps, the last K kept, the newest
valid one found again on restart.

A checkpoint is Lightning's full training state (weights, optimizer, LR schedule, loop
counters) plus what the LightningModule adds (RNG states, data position, non-finite count),
saved as run_dir/checkpoints/step{S:08d}.ckpt. It is written under a temporary name and
renamed, and a small step{S:08d}.json recording its size is written after the rename, so a
job killed while saving leaves either nothing or a temporary file that is ignored. On
`resume=auto` the newest checkpoint whose record exists, whose size matches and whose
archive opens is used; any other is skipped with a warning.

Under DeepSpeed ZeRO a checkpoint is a folder of the same name: every rank writes its own
partition ([bf16_]zero_pp_rank_{R}_*_optim_states.pt, and under stage 3 its parameters) into the
temporary folder, all ranks meet at a barrier, and only then does rank 0 rename the folder
and write the record (which also holds the world size). A folder is valid when its record
exists, its size matches and one optimizer partition per rank is present. Partitions only
fit the world size and ZeRO stage they were written with: resuming with another number of
ranks, or between stage 3 and stages 1-2, goes through the universal form of the checkpoint
(rwkv_train/reshard.py); between DeepSpeed and plain DDP, through the universal form or a
single file made from it.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step(\d{8})\.ckpt$")
# bf16 training's partitions carry a prefix (DeepSpeed's bf16 optimizer names them so).
_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_.*optim_states\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step{step:08d}.ckpt"


def _size(path: Path) -> int:
    if path.is_dir():  # sharded strategies save a folder
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def shard_ranks(path: Path) -> set[int]:
    """The ranks whose ZeRO optimizer partitions a checkpoint folder holds."""
    return {int(m.group(1)) for p in path.rglob("*") if (m := _SHARD.match(p.name))}


def is_valid(path: Path) -> tuple[bool, str]:
    """Whether a checkpoint is complete: (ok, reason when not)."""
    record = path.with_suffix(".json")
    if not record.exists():
        return False, "no completion record (the save was interrupted)"
    try:
        meta = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False, "unreadable completion record"
    if not path.exists() or _size(path) != meta.get("bytes"):
        return False, "size differs from the completion record (truncated or changed)"
    if path.is_dir():
        world = meta.get("world_size", 1)
        if shard_ranks(path) != set(range(world)):
            return False, f"does not hold the ZeRO partitions of all {world} ranks"
    reason = unopenable(path)
    return not reason, reason


def unopenable(path: Path) -> str:
    """Why a single-file checkpoint cannot be opened ("" when it can, or is a ZeRO folder)."""
    if path.is_file():
        try:  # mmap reads only the archive's directory: cheap even for large files
            torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:
            return f"cannot be opened ({type(e).__name__})"
    return ""


def saved_extra(path: Path) -> dict | None:
    """What the LightningModule added to checkpoint `path` (its "rwkv_train" entry: model
    config, optimizer groups, data position), read memory-mapped, so without the weights: from
    the file, or from a ZeRO folder's rank-0 model states. None when it is not there."""
    path = Path(path)
    if path.is_dir():
        names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
        found = [p for p in path.rglob("*model_states.pt") if p.name in names]
        if not found:
            return None
        path = found[0]
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # unreadable: the load proper says why
        return None
    extra = state.get("rwkv_train") if isinstance(state, dict) else None
    return extra if isinstance(extra, dict) else None


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-named entry, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def find_latest(folder: Path) -> Path | None:
    """The newest valid checkpoint in `folder`, warning about each newer invalid one."""
    for step, path in reversed(list_checkpoints(folder)):
        ok, reason = is_valid(path)
        if ok:
            return path
        log.warning("skipping checkpoint %s of step %d: %s", path, step, reason)
    return None


def resume_form(path: Path, world_size: int, zero_stage: int) -> str | None:
    """How this run loads checkpoint `path`: None as it is; "universal" (its universal form,
    rwkv_train/reshard.py) for ZeRO when it was written by another rank count, under stage 3
    for stages 1-2 or the reverse, or without ZeRO; "single" (a single file) for a run
    without ZeRO (deepspeed=none) continuing a ZeRO checkpoint."""
    sharded = Path(path).is_dir()
    if sharded and zero_stage == 0:
        return "single"
    if not sharded:
        return "universal" if zero_stage > 0 else None
    # stage 3 partitions the weights too (a model-states file per rank); 1 and 2 share a layout
    saved_stage3 = any(p.name.startswith("zero_pp_rank_") for p in path.rglob("*model_states.pt"))
    if saved_stage3 != (zero_stage == 3) or len(shard_ranks(Path(path))) != world_size:
        return "universal"
    return None


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at (from its name)."""
    m = _NAME.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not named step<8 digits>.ckpt")
    return int(m.group(1))


def _entries(path: Path) -> list[Path]:
    """A checkpoint's entries in its folder: itself, its record and its derived copies."""
    from rwkv_train.reshard import failed_path, single_path, universal_path

    derived = [universal_path(path), single_path(path), failed_path(path)]
    return [path, path.with_suffix(".json"), *derived]


def _remove(path: Path) -> None:
    for entry in _entries(path):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def set_aside_after(run_dir: Path, step: int) -> Path:
    """Move the checkpoints of steps after `step`, and their metrics, out of the way of a run
    rolled back to `step` (a loss spike: the same run goes on from an earlier checkpoint).

    Left in place they would outrank the new branch's checkpoints: `resume=auto` would pick
    them and `keep_last` would prune the new ones as the oldest. They go, with the metrics
    rows after `step`, to run_dir/abandoned/after_step{step}, which is written under a
    temporary name and renamed last: its existence says the rollback is complete.
    """
    dest = run_dir / "abandoned" / f"after_step{step:08d}"
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    folder = run_dir / "checkpoints"
    for later_step, path in list_checkpoints(folder):
        if later_step > step:
            for entry in _entries(path):
                if entry.exists():
                    os.replace(entry, tmp / entry.name)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        later = [ln for ln in rows if json.loads(ln)["step"] > step]
        (tmp / "metrics.jsonl").write_text("".join(ln + "\n" for ln in later))
    os.replace(tmp, dest)
    return dest


class CheckpointSpaceError(RuntimeError):
    """A checkpoint that cannot fit on its disk: every rank stops with this, at once."""


# A full training state holds at least 12 bytes a parameter: fp32 weights or master weights
# (4) and Adam's two moments (8); bf16 ZeRO adds the 2-byte module weights. The first save of
# a run has only this lower bound to go by; later ones the size of the previous checkpoint.
MIN_BYTES_PER_PARAMETER = 12


def _free_bytes(folder: Path) -> int:
    """Free space for `folder`, which need not exist yet on this node."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _expected_bytes(folder: Path, module: torch.nn.Module) -> int:
    """What the next checkpoint will take: the newest complete one's size, or a lower bound."""
    for _step, path in reversed(list_checkpoints(folder)):
        try:
            return int(json.loads(path.with_suffix(".json").read_text())["bytes"])
        except (OSError, ValueError, KeyError):
            continue
    # ZeRO-3 leaves each rank a partition; `ds_numel` is the whole parameter's size
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return MIN_BYTES_PER_PARAMETER * numel


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _multiple(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class CheckpointManager(L.Callback):
    """Saves the full state every `every_n_steps` optimizer steps and at the end of training,
    keeping the newest `keep_last` and those of every `keep_every_n_steps`-th step."""

    def __init__(
        self,
        folder: str | Path,
        every_n_steps: int,
        keep_last: int = 3,
        keep_every_n_steps: int = 0,
    ) -> None:
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.keep_every_n_steps = keep_every_n_steps
        self._last_saved = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_saved = trainer.global_step  # the state we started from is already on disk
        if trainer.is_global_zero and self.folder.is_dir():
            # A save killed half-way (a SIGKILL after the grace period) leaves its temporary
            # name behind; under ZeRO that can be most of a model's size in optimizer state.
            for stale in sorted(self.folder.glob(".step*.ckpt.tmp")):
                log.warning("removing %s: a save that did not finish", stale)
                _remove(stale)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        step = trainer.global_step
        due = _multiple(step, self.every_n_steps) or _multiple(step, self.keep_every_n_steps)
        if due and step != self._last_saved:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_saved:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        """Write the checkpoint of the current step atomically, then prune old ones."""
        step = trainer.global_step
        final = checkpoint_path(self.folder, step)
        tmp = final.with_name(f".{final.name}.tmp")
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier()  # the temporary name is free before anyone writes
        self._check_space(trainer, step)
        trainer.save_checkpoint(tmp, weights_only=False)
        for f in [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]:
            with open(f, "rb") as fh:  # each rank syncs what it wrote (a folder: all it sees)
                os.fsync(fh.fileno())
        trainer.strategy.barrier()  # every rank's partition is on disk before the rename
        if trainer.is_global_zero:
            _remove(final)
            os.replace(tmp, final)
            size = _size(final)
            record = final.with_suffix(".json")
            meta = {"step": step, "bytes": size}
            if final.is_dir():
                meta["world_size"] = trainer.world_size
            record.with_suffix(".json.tmp").write_text(json.dumps(meta))
            os.replace(record.with_suffix(".json.tmp"), record)
            log.info("saved checkpoint %s (step %d, %.1f MiB)", final, step, size / 2**20)
            for old_step, old in list_checkpoints(self.folder)[: -self.keep_last]:
                if not _multiple(old_step, self.keep_every_n_steps):
                    _remove(old)
        self._last_saved = step
        return final

    def _check_space(self, trainer: L.Trainer, step: int) -> None:
        """Stop every rank together when a rank's disk cannot hold the checkpoint.

        A rank whose write fails in the middle of a ZeRO save leaves the others waiting in
        DeepSpeed's collectives until the NCCL timeout. A full disk, the usual cause, is
        found here first, and every rank raises at the same point instead."""
        need = _expected_bytes(self.folder, trainer.lightning_module)
        free = _free_bytes(self.folder)
        if not trainer.strategy.reduce_boolean_decision(free < need, all=False):
            return
        where = f"checkpoint of step {step} in {self.folder}"
        if free < need:
            raise CheckpointSpaceError(
                f"no room for the {where}: it needs about {_gib(need)}, {_gib(free)} free on "
                f"rank {trainer.global_rank}. Free space (older runs' checkpoints, "
                "checkpoint.keep_last) and rerun the same command to resume."
            )
        raise CheckpointSpaceError(
            f"no room for the {where} on another rank's disk (its log says how much); "
            f"{_gib(free)} free here"
        )
