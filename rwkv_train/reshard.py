"""Resuming a ZeRO checkpoint on a different number of ranks, or under another ZeRO stage.

ZeRO partitions the optimizer state (and under stage 3 the weights) by rank, so a checkpoint
written by 16 ranks does not load on 8: a job requeued onto fewer nodes, or moved to a
different allocation, would otherwise have to restart from exported weights and lose its
optimizer state; the same holds between stage 3 and stages 1-2, whose files differ.
DeepSpeed's universal checkpoint format stores every parameter's fp32 weights and Adam
moments whole, from which any rank count and stage can take its partitions. This module
builds that form beside a checkpoint, once:

    run_dir/checkpoints/step00001000.ckpt             the ZeRO checkpoint (untouched)
    run_dir/checkpoints/step00001000.ckpt.universal/  latest_universal, <tag>/zero/<param>/...

`python -m rwkv_train.train` does this by itself when it resumes with another rank count
or stage (rank 0 converts, the other ranks wait for it); `python -m rwkv_train.reshard RUN_DIR` does
it ahead of time, e.g. on a login node before resubmitting on another allocation. The
conversion is `deepspeed.checkpoint.ds_to_universal`, run on hard links of the checkpoint's
files, written under a temporary name and renamed when complete. The data position, RNG and
loop counters travel in the model-states file and do not depend on the rank count.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SUFFIX = ".universal"
# The key ds_to_universal requires in a checkpoint's client state (model parallel layouts:
# none here). Checkpoints saved since this module exists carry it; older ones get it added
# to the converted copy.
INFO_KEY = "universal_checkpoint_info"
# Written last into a universal form that loads under every ZeRO stage (`_stage_neutral`).
NEUTRAL = "stage_neutral"


def universal_path(ckpt: Path) -> Path:
    """Where the universal form of checkpoint `ckpt` lives."""
    return ckpt.with_name(ckpt.name + SUFFIX)


def failed_path(ckpt: Path) -> Path:
    """Where rank 0 leaves the error of a failed conversion for the ranks waiting on it."""
    return ckpt.with_name(ckpt.name + SUFFIX + ".failed")


def _tag(ckpt: Path) -> str:
    latest = ckpt / "latest"
    if not latest.is_file():
        raise ValueError(f"{ckpt} is not a DeepSpeed checkpoint folder (no 'latest' file)")
    return latest.read_text().strip()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links
        shutil.copy2(src, dst)


def is_complete(out: Path) -> bool:
    """Whether `out` is a finished universal form, loadable under every ZeRO stage (one
    built before the stage-neutral step existed is not: it is rebuilt)."""
    return (out / "latest_universal").is_file() and (out / NEUTRAL).is_file()


def _stage_neutral(tag_dir: Path) -> None:
    """Make a universal checkpoint loadable under ZeRO-3 and under ZeRO-1/2, whichever wrote it.

    DeepSpeed's two loaders read different files. Stages 1-2 read mp_rank_00_model_states.pt,
    every parameter's state as {"param": full-shaped tensor} with its step in step.pt, and
    the groups from zero/optimizer_state.pt's "param_groups". ZeRO-3 reads
    zero_pp_rank_0_mp_rank_00_model_states.pt, flat or full-shaped tensors, and the step from
    optimizer_state.pt's "optimizer_state_dict". ds_to_universal writes only the form of the
    stage it converts from; this adds the other (the weights themselves never come from the
    model-states file in a universal load, only the client state does).
    """
    plain = tag_dir / "mp_rank_00_model_states.pt"
    stage3 = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if not plain.exists():
        _link_or_copy(stage3, plain)
    if not stage3.exists():
        _link_or_copy(plain, stage3)
    zero = tag_dir / "zero"
    optim = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    if "ds_version" not in optim:  # the ZeRO-1/2 loader requires it
        client = torch.load(plain, map_location="cpu", weights_only=False)
        optim["ds_version"] = client["ds_version"]
        torch.save(optim, zero / "optimizer_state.pt")
    folders = [d for d in sorted(zero.iterdir()) if d.is_dir()]
    if "optimizer_state_dict" in optim:  # written from ZeRO-3
        step = optim["optimizer_state_dict"]["state"][0]["step"]
        shapes = {}
        for group in torch.load(stage3, map_location="cpu", weights_only=False)["param_shapes"]:
            shapes.update(group)
        for folder in folders:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                f = folder / f"{key}.pt"
                value = torch.load(f, map_location="cpu", weights_only=False)
                if torch.is_tensor(value):
                    torch.save({"param": value.view(shapes[folder.name]), "cat_dim": 0}, f)
            torch.save(step, folder / "step.pt")
    else:  # written from ZeRO-1/2
        step = torch.load(folders[0] / "step.pt", map_location="cpu", weights_only=False)
        optim["optimizer_state_dict"] = {
            "state": {0: {"step": step}},
            "param_groups": optim["param_groups"],
        }
        torch.save(optim, zero / "optimizer_state.pt")


def make_universal(ckpt: Path, workers: int = 4) -> Path:
    """Build the universal form of ZeRO checkpoint folder `ckpt` (if missing); its path."""
    ckpt = Path(ckpt)
    out = universal_path(ckpt)
    if is_complete(out):
        return out
    tag = _tag(ckpt)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    source = tmp / "input" / tag
    source.mkdir(parents=True)
    (tmp / "input" / "latest").write_text(tag)
    for f in (ckpt / tag).iterdir():
        if f.name.endswith("model_states.pt"):  # small: the client state, patched if needed
            sd = torch.load(f, map_location="cpu", weights_only=False)
            sd.setdefault(INFO_KEY, {})
            torch.save(sd, source / f.name)
        elif f.is_file():
            _link_or_copy(f, source / f.name)
    target = tmp / "output" / tag
    t0 = time.perf_counter()
    log.info("converting %s to the universal form for another rank count or stage", ckpt)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    cmd += ["--input_folder", str(source), "--output_folder", str(target)]
    cmd += ["--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"converting {ckpt} to a universal checkpoint failed:\n{done.stderr[-3000:]}"
        )
    for f in source.iterdir():
        if f.name.endswith("model_states.pt"):
            shutil.move(str(f), target / f.name)
    _stage_neutral(target)
    (tmp / "output" / "latest_universal").write_text(tag)
    (tmp / "output" / NEUTRAL).write_text("")
    shutil.rmtree(tmp / "input")
    shutil.rmtree(out, ignore_errors=True)  # an incomplete or pre-stage-neutral form
    os.replace(tmp / "output", out)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("universal checkpoint %s ready in %.1f s", out, time.perf_counter() - t0)
    return out


def is_rank_zero() -> bool:
    """Whether this process will be global rank 0, before torch.distributed starts: from
    RANK (torchrun, Lightning's child processes), SLURM_PROCID under a multi-task srun, else
    NODE_RANK and LOCAL_RANK (unset in the process that launches the others)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]) == 0
    return (
        int(os.environ.get("NODE_RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0
    )


def ensure_universal(ckpt: Path, timeout_s: float = 3600.0) -> Path:
    """The universal form of `ckpt`: rank 0 builds it, every other rank waits for it (and
    stops too if rank 0's conversion fails: rank 0 leaves the error in <out>.failed)."""
    out = universal_path(ckpt)
    failed = failed_path(ckpt)
    if is_rank_zero():
        failed.unlink(missing_ok=True)
        try:
            return make_universal(ckpt)
        except Exception as exc:
            failed.write_text(str(exc))
            raise
    deadline = time.monotonic() + timeout_s
    while not is_complete(out):
        if failed.is_file():
            raise RuntimeError(f"rank 0 could not convert {ckpt}: {failed.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank 0 did not finish converting {ckpt} in {timeout_s:.0f} s; run "
                f"`python -m rwkv_train.reshard {ckpt}` once and resubmit"
            )
        time.sleep(2.0)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: convert a run's newest valid ZeRO checkpoint (or the given one)."""
    from rwkv_train.checkpoint import find_latest

    p = argparse.ArgumentParser(prog="python -m rwkv_train.reshard", description=__doc__)
    p.add_argument("path", type=Path, help="a run folder or a ZeRO checkpoint folder")
    p.add_argument("--workers", type=int, default=4, help="conversion processes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ckpt = args.path
    if not ckpt.name.endswith(".ckpt"):
        ckpt = find_latest(ckpt / "checkpoints")
        if ckpt is None:
            print(f"reshard: no valid checkpoint under {args.path}/checkpoints", file=sys.stderr)
            return 1
    if not ckpt.is_dir():
        print(f"reshard: {ckpt} is a single-file checkpoint: nothing to convert", file=sys.stderr)
        return 1
    print(f"reshard: {make_universal(ckpt, args.workers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
