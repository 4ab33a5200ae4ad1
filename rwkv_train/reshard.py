"""Resuming a checkpoint on a different number of ranks, or under another `deepspeed=` setting.

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

Plain DDP (deepspeed=none) saves one file with AdamW's states numbered by position. Continued
under ZeRO it gets a universal form written here (`universal_from_single`); a ZeRO checkpoint
continued under DDP gets a single file made from its universal form (`single_from_zero`,
run_dir/checkpoints/step00001000.ckpt.single).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

SUFFIX = ".universal"
# The key ds_to_universal requires in a checkpoint's client state (model parallel layouts:
# none here). Checkpoints saved since this module exists carry it; older ones get it added
# to the converted copy.
INFO_KEY = "universal_checkpoint_info"
# Written last into a universal form that ZeRO-3 loads whatever wrote it (`_stage_neutral`),
# and once its per-parameter files are in the form ZeRO-1/2 read too (`_for_stages_1_2`).
NEUTRAL = "stage_neutral"
STAGE12 = "stage12_ready"
# The model-states file ZeRO-3 reads from a universal form (stages 1-2: mp_rank_00_...).
STAGE3_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


# DeepSpeed's own entries of a model-states file; the rest is Lightning's checkpoint dict.
_DS_KEYS = (
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
    "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
    "sparse_tensor_module_names", "skipped_steps", "global_steps", "global_samples",
    "dp_world_size", "mp_world_size", "ds_config", "ds_version",
    "checkpoint_parallel_dimensions", INFO_KEY,
)  # fmt: skip


def universal_path(ckpt: Path) -> Path:
    """Where the universal form of checkpoint `ckpt` lives."""
    return ckpt.with_name(ckpt.name + SUFFIX)


def single_path(ckpt: Path) -> Path:
    """Where the single-file (deepspeed=none) form of ZeRO checkpoint `ckpt` lives."""
    return ckpt.with_name(ckpt.name + ".single")


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


def is_complete(out: Path, stage: int = 3) -> bool:
    """Whether `out` is a finished universal form that ZeRO stage `stage` loads (one built
    before the stage-neutral step existed is not: it is rebuilt)."""
    done = (out / "latest_universal").is_file() and (out / NEUTRAL).is_file()
    return done and (stage == 3 or (out / STAGE12).is_file())


def _stage_neutral(tag_dir: Path) -> bool:
    """Make a universal checkpoint loadable under ZeRO-3 and, unless ZeRO-3 wrote it, under
    ZeRO-1/2; whether it now is under ZeRO-1/2.

    DeepSpeed's two loaders read different files. Stages 1-2 read mp_rank_00_model_states.pt,
    every parameter's state as {"param": full-shaped tensor} with its step in step.pt, and
    the groups from zero/optimizer_state.pt's "param_groups". ZeRO-3 reads
    zero_pp_rank_0_mp_rank_00_model_states.pt, flat or full-shaped tensors, and the step from
    optimizer_state.pt's "optimizer_state_dict". ds_to_universal writes only the form of the
    stage it converts from; this adds the other's small files (the weights never come from
    the model-states file in a universal load, only the client state does). The per-parameter
    files of a ZeRO-3 source are rewritten only for a run that needs them
    (`_for_stages_1_2`): that copies the whole optimizer state once more.
    """
    plain = tag_dir / "mp_rank_00_model_states.pt"
    stage3 = tag_dir / STAGE3_STATES
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
    if "optimizer_state_dict" in optim:  # written from ZeRO-3
        return False
    folder = next(d for d in sorted(zero.iterdir()) if d.is_dir())
    step = torch.load(folder / "step.pt", map_location="cpu", weights_only=False)
    optim["optimizer_state_dict"] = {
        "state": {0: {"step": step}},
        "param_groups": optim["param_groups"],
    }
    torch.save(optim, zero / "optimizer_state.pt")
    return True


def _for_stages_1_2(out: Path) -> None:
    """Rewrite the per-parameter files of a universal form written from ZeRO-3 (flat
    tensors, no step) into the form ZeRO-1/2 load; a rerun after an interruption goes on."""
    tag_dir = out / (out / "latest_universal").read_text().strip()
    zero = tag_dir / "zero"
    optim = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    step = optim["optimizer_state_dict"]["state"][0]["step"]
    shapes = {}
    for group in torch.load(tag_dir / STAGE3_STATES, map_location="cpu", weights_only=False)[
        "param_shapes"
    ]:
        shapes.update(group)
    for folder in (d for d in sorted(zero.iterdir()) if d.is_dir()):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = folder / f"{key}.pt"
            value = torch.load(f, map_location="cpu", weights_only=False)
            if torch.is_tensor(value):
                tmp = f.with_name(f.name + ".tmp")
                torch.save({"param": value.view(shapes[folder.name]), "cat_dim": 0}, tmp)
                os.replace(tmp, f)
        torch.save(step, folder / "step.pt")
    (out / STAGE12).write_text("")


def _finish(tmp: Path, out: Path) -> Path:
    """Put a finished conversion folder in place, replacing whatever was there."""
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def make_universal(ckpt: Path, workers: int = 4, stage: int = 3) -> Path:
    """Build the universal form of ZeRO checkpoint folder `ckpt` for a run under ZeRO stage
    `stage` (if missing); its path."""
    ckpt = Path(ckpt)
    out = universal_path(ckpt)
    if is_complete(out):
        if not is_complete(out, stage):
            _for_stages_1_2(out)
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
    if _stage_neutral(target):
        (tmp / "output" / STAGE12).write_text("")
    (tmp / "output" / "latest_universal").write_text(tag)
    (tmp / "output" / NEUTRAL).write_text("")
    shutil.rmtree(tmp / "input")
    _finish(tmp / "output", out)  # replaces an incomplete or pre-stage-neutral form
    shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(out, stage):
        _for_stages_1_2(out)
    log.info("universal checkpoint %s ready in %.1f s", out, time.perf_counter() - t0)
    return out


def _meta_net(model_config: dict[str, Any]) -> nn.Module:
    """The model a checkpoint was written for, on the meta device (names and shapes only)."""
    from rwkv_train.model import RWKV, RWKVConfig

    with torch.device("meta"):
        return RWKV(RWKVConfig.from_dict(model_config))


def universal_from_single(ckpt: Path, optim_cfg: Any) -> Path:
    """The universal form of single-file checkpoint `ckpt` (deepspeed=none), for a run that
    continues it under ZeRO.

    torch's AdamW numbers its states by position across the parameter groups; the names
    come from rebuilding the groups with optim.lr_mult and optim.no_decay (and the saved
    weight decay), checked against the saved groups' sizes and every state's shape.
    """
    import deepspeed

    from rwkv_train.optim import param_groups

    out = universal_path(ckpt)
    if is_complete(out):
        return out
    sd = torch.load(ckpt, map_location="cpu", weights_only=False)
    weights, saved = sd.pop("state_dict"), sd.pop("optimizer_states")[0]
    net = _meta_net(sd["rwkv_train"]["model_config"])
    saved_groups = saved["param_groups"]
    decay = max(g["weight_decay"] for g in saved_groups)
    groups = param_groups(net, dataclasses.replace(optim_cfg, weight_decay=decay))
    ours = [(g["lr_mult"], g["weight_decay"], len(g["params"])) for g in groups]
    theirs = [(g.get("lr_mult"), g["weight_decay"], len(g["params"])) for g in saved_groups]
    if ours != theirs:
        raise ValueError(
            f"{ckpt}: its optimizer groups (lr_mult, weight_decay, size) {theirs} are not the "
            f"ones optim.lr_mult and optim.no_decay give, {ours}: resume with the settings it "
            "was written with"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tag_dir = tmp / "checkpoint"
    (tag_dir / "zero").mkdir(parents=True)
    step = None
    for group, saved_group in zip(groups, saved_groups, strict=True):
        for name, index in zip(group["names"], saved_group["params"], strict=True):
            state, value = saved["state"][index], weights[f"net.{name}"]
            if state["exp_avg"].shape != value.shape:
                raise ValueError(f"{ckpt}: the optimizer state of {name} does not fit it")
            folder = tag_dir / "zero" / f"net.{name}"
            folder.mkdir()
            for key, t in (("fp32", value), *((k, state[k]) for k in ("exp_avg", "exp_avg_sq"))):
                torch.save({"param": t.float(), "cat_dim": 0}, folder / f"{key}.pt")
            step = torch.as_tensor(state["step"], dtype=torch.float32)
            torch.save(step, folder / "step.pt")
    # what ds_to_universal writes from ZeRO-1/2; _stage_neutral adds what ZeRO-3 reads
    optim = {"ds_version": deepspeed.__version__, "param_groups": saved_groups}
    torch.save(optim, tag_dir / "zero" / "optimizer_state.pt")
    client = {**sd, "module": {}, "dp_world_size": 1, "mp_world_size": 1, "skipped_steps": 0}
    client.update(global_steps=sd["global_step"], ds_version=deepspeed.__version__)
    client[INFO_KEY] = {}
    torch.save(client, tag_dir / "mp_rank_00_model_states.pt")
    _stage_neutral(tag_dir)  # as from ZeRO-1/2: every stage reads it
    (tmp / "latest_universal").write_text("checkpoint")
    (tmp / NEUTRAL).write_text("")
    (tmp / STAGE12).write_text("")
    log.info("built the universal form of %s for ZeRO", ckpt)
    return _finish(tmp, out)


def single_from_zero(ckpt: Path, optim_cfg: Any) -> Path:
    """A single-file checkpoint (deepspeed=none) of ZeRO checkpoint folder `ckpt`, made from
    its universal form: the weights in fp32, AdamW's states numbered in the order of this
    run's parameter groups, and Lightning's state as it was saved."""
    from rwkv_train.optim import param_groups

    out = single_path(ckpt)
    if out.is_file():
        return out
    universal = make_universal(ckpt, stage=1)  # per-parameter files with shapes and steps
    tag_dir = universal / (universal / "latest_universal").read_text().strip()
    client = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    net = _meta_net(client["rwkv_train"]["model_config"])
    groups = param_groups(net, optim_cfg)
    names = [name for g in groups for name in g.pop("names")]
    optimizer = torch.optim.AdamW(groups, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    weights, state = {}, {}
    for index, name in enumerate(names):
        folder = tag_dir / "zero" / f"net.{name}"

        def load(key: str, folder: Path = folder) -> torch.Tensor:
            return torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=False)

        weights[f"net.{name}"] = load("fp32")["param"]
        state[index] = {
            "step": torch.as_tensor(load("step"), dtype=torch.float32),
            "exp_avg": load("exp_avg")["param"],
            "exp_avg_sq": load("exp_avg_sq")["param"],
        }
    single = {k: v for k, v in client.items() if k not in _DS_KEYS}
    single["state_dict"] = weights
    single["optimizer_states"] = [
        {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
    ]
    tmp = out.with_name(out.name + ".tmp")
    torch.save(single, tmp)
    os.replace(tmp, out)
    log.info("built the single-file form of %s for deepspeed=none", ckpt)
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


def ensure_loadable(
    ckpt: Path, form: str, optim_cfg: Any = None, stage: int = 3, timeout_s: float = 3600.0
) -> Path:
    """The `form` ("universal" or "single") of `ckpt` for this run (ZeRO stage `stage`) to
    load: rank 0 builds it, every other rank waits for it (and stops too if rank 0's
    conversion fails: rank 0 leaves the error in <ckpt>.universal.failed)."""
    build: Callable[[], Path]
    if form == "single":
        out = single_path(ckpt)
        build = lambda: single_from_zero(ckpt, optim_cfg)  # noqa: E731
        done = out.is_file
    else:
        out = universal_path(ckpt)
        if ckpt.is_dir():
            build = lambda: make_universal(ckpt, stage=stage)  # noqa: E731
        else:
            build = lambda: universal_from_single(ckpt, optim_cfg)  # noqa: E731
        done = lambda: is_complete(out, stage)  # noqa: E731
    failed = failed_path(ckpt)
    if is_rank_zero():
        failed.unlink(missing_ok=True)
        try:
            return build()
        except Exception as exc:
            failed.write_text(str(exc))
            raise
    deadline = time.monotonic() + timeout_s
    while not done():
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
    from rwkv_train.checkpoint import find_latest, is_valid

    p = argparse.ArgumentParser(prog="python -m rwkv_train.reshard", description=__doc__)
    p.add_argument("path", type=Path, help="a run folder or a ZeRO checkpoint folder")
    p.add_argument("--workers", type=int, default=4, help="conversion processes")
    p.add_argument(
        "--stage", type=int, default=3, choices=(1, 2, 3), help="the ZeRO stage it resumes under"
    )
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
    ok, reason = is_valid(ckpt)  # a partition missing would make an incomplete universal form
    if not ok:
        print(f"reshard: {ckpt}: {reason}", file=sys.stderr)
        return 1
    print(f"reshard: {make_universal(ckpt, args.workers, args.stage)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
