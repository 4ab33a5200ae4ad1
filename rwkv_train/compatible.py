"""What a weights file or a checkpoint must match to start or continue a run of this config.

Checked before the Trainer exists and before the run folder is touched (config.yaml, the
metrics), memory-mapped so that a 14B file is not read: a .pth for `model.init_from` must have
the model's names and shapes; a checkpoint to resume must have been trained with the same
architecture and the same optimizer groups (its states are matched to parameters by position).
The LightningModule checks the same again at the load itself, with these functions.
"""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkv_train.checkpoint import saved_extra
from rwkv_train.config import ConfigError, OptimConfig
from rwkv_train.model import RWKV, RWKVConfig
from rwkv_train.optim import param_groups


def architecture(cfg: RWKVConfig) -> dict[str, Any]:
    """The fields that fix the weights' shapes and meaning (not how they are computed)."""
    d = cfg.to_dict()
    for k in ("ctx_len", "grad_checkpoint", "compile", "wkv_backend"):
        d.pop(k, None)
    return d


def read_pth(path: str, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """A reference-layout .pth checked against the model's parameter shapes (memory-mapped:
    a 14B file is not read into memory at once)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the pre-zip format of old torch.save cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    missing = sorted(set(shapes) - set(sd))
    extra = sorted(set(sd) - set(shapes))
    if missing or extra:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, extra {extra[:5]}")
    for k, v in sd.items():
        if v.shape != shapes[k]:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model {shapes[k]}")
    return sd


def check_init_from(path: str, model_cfg: RWKVConfig) -> None:
    """Refuse, naming the field, a .pth that cannot start this model: the load itself comes
    after the trainer and its strategy are set up, minutes into a cluster job. Memory-mapped,
    so the check reads the file's index and shapes, not its weights."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in RWKV(model_cfg).state_dict().items()}
    try:
        read_pth(path, shapes)
    except ValueError as e:  # names or shapes of another model (its message names the path)
        raise ConfigError("model.init_from", str(e)) from None
    except Exception as e:  # not a weights-only .pth at all: truncated, pickled objects...
        raise ConfigError(
            "model.init_from", f"{path} cannot be read as a .pth of weights ({type(e).__name__})"
        ) from None


def check_resume(path: Path, model_cfg: RWKVConfig, optim_cfg: OptimConfig) -> None:
    """Refuse a checkpoint that this config cannot continue (another model, other optimizer
    groups) before the run folder is touched: found at the load, the refusal came after
    config.yaml had been rewritten with the settings that cannot train it. Memory-mapped, as
    `check_init_from`."""
    extra = saved_extra(path)
    if extra is None or "model_config" not in extra:  # older checkpoints: the load checks
        return
    reason = architecture_difference(extra["model_config"], architecture(model_cfg))
    if reason:
        raise ConfigError("model", reason)
    if "param_groups" in extra:
        with torch.device("meta"):
            groups = group_layout(RWKV(model_cfg), optim_cfg)
        reason = groups_difference(extra["param_groups"], groups)
        if reason:
            raise ConfigError("optim", reason)


def architecture_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """Why a checkpoint of architecture `saved` cannot resume as `now` ("" when it can)."""
    if saved == now:
        return ""
    diff = [k for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
    return (
        "the checkpoint resumed was trained with "
        + ", ".join(f"{k}={saved.get(k)}" for k in diff)
        + " (this config: "
        + ", ".join(f"{k}={now.get(k)}" for k in diff)
        + "); set those to resume it, or train another run (another run_dir)"
    )


def group_layout(net: RWKV, optim_cfg: OptimConfig) -> list[list[Any]]:
    """The optimizer's parameter groups as (lr_mult, decayed, size): a resume needs the
    same, since optimizer states are matched to parameters by position."""
    groups = param_groups(net, optim_cfg)
    return [[g["lr_mult"], g["weight_decay"] > 0, len(g["params"])] for g in groups]


def groups_difference(saved: list[list[Any]], now: list[list[Any]]) -> str:
    """Why optimizer states saved for groups `saved` cannot resume groups `now` ("" if so)."""
    if saved == now:
        return ""
    return (
        f"the checkpoint's optimizer groups (lr_mult, decayed, size) {saved} "
        f"differ from this config's {now}: optim.lr_mult, "
        "optim.no_decay, or optim.weight_decay turned on or off since it was saved; "
        "resume with the settings it was written with"
    )
