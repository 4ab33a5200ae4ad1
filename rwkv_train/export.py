"""Export trained weights as a reference-layout .pth that RWKV tools read.

    python -m rwkv_train.export RUN_DIR_OR_CKPT OUT.pth [--dtype fp32|bf16]

A run folder means its newest valid checkpoint. The .pth is the model's state_dict (its names
and shapes already follow the reference layout) with no optimizer state and no config: the
`rwkv` package, RWKV-LM and `RWKVConfig.from_state_dict` read the architecture from the
tensors. A DeepSpeed ZeRO checkpoint (a folder of per-rank partitions) is consolidated from
its fp32 master weights with DeepSpeed's zero_to_fp32 helpers, on the CPU, in one process.
Use fp32 for parity checks (the `rwkv` package applies ln0 in the file's dtype).

A source that is missing, holds no valid checkpoint or cannot be read, and an output that
cannot be written, are reported in one line naming the path, with exit status 2.
"""

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rwkv_train.checkpoint import find_latest

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREFIX = "net."  # the LightningModule holds the model as `net`


class ModelFileError(ValueError):
    """A model file or folder that cannot be read, or an output that cannot be written.

    Its message names the path and the problem, so the command-line tools print it as it is
    instead of the loader's traceback (a ValueError, as evaluate's other input errors).
    """


def _opened(path: Path, load: Callable[[], Any]) -> Any:
    """What `load` reads from `path`, its failures turned into a ModelFileError: a truncated
    or foreign file fails deep inside torch or DeepSpeed with a message that names neither
    the path nor the likely cause."""
    try:
        return load()
    except ImportError:  # a missing package (DeepSpeed for ZeRO folders), not a bad file
        raise
    except OSError as e:
        raise ModelFileError(f"{path} cannot be read: {e.strerror or e}") from e
    except Exception as e:
        raise ModelFileError(
            f"{path} cannot be opened ({type(e).__name__}): truncated, corrupted or not a model"
        ) from e


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest valid one of a run folder (or its checkpoints/)."""
    p = Path(path)
    if p.is_dir() and not (p / "latest").exists():  # a run folder, not a ZeRO checkpoint
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        found = find_latest(folder)
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint in {folder}")
        return found
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint or run folder at {p}")
    return p


def load_zero_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state_dict of a ZeRO (stage 1-3) checkpoint folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path))  # the tag named in `latest`


def load_checkpoint_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of a training checkpoint, under their reference names."""
    p = resolve_checkpoint(path)
    if p.is_dir():
        sd = _opened(p, lambda: load_zero_weights(p))
    else:
        ckpt = _opened(p, lambda: torch.load(p, map_location="cpu", weights_only=False))
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise ModelFileError(f"{p} is not a training checkpoint (it has no state_dict)")
        sd = ckpt["state_dict"]
    weights = {k.removeprefix(PREFIX): v for k, v in sd.items() if k.startswith(PREFIX)}
    if not weights:  # exporting it would write an empty .pth
        raise ModelFileError(f"{p} holds no model weights (no {PREFIX}* entries)")
    return weights


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a run folder, a training checkpoint or an exported .pth."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pth":
        sd = _opened(p, lambda: torch.load(p, map_location="cpu", weights_only=True))
        if not sd or not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise ModelFileError(f"{p} is not a state_dict of tensors")
        return sd
    return load_checkpoint_weights(p)


def export(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Write the weights of `src` to `out` in `dtype`; returns the output path.

    The output's folder is made before the (possibly long) load, so a path that cannot be
    written fails at once; the file is written under a temporary name and renamed, so a
    failed write leaves no partial .pth.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    out = Path(out)
    if out.is_dir():
        raise ModelFileError(f"{out} is a folder: name the .pth file to write")
    if out.suffix != ".pth":  # what the rwkv package, generate and evaluate take for weights
        raise ModelFileError(f"{out}: name the output NAME.pth (the rwkv package reads .pth)")
    src = Path(src)
    if not (src.is_file() and src.suffix == ".pth"):  # a missing or empty source: before writing
        src = resolve_checkpoint(src)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # "File exists" alone would not say which: name the plain file
        file = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
        why = f"{file} is a file, not a folder" if file else e.strerror or str(e)
        raise ModelFileError(f"cannot create the folder of {out}: {why}") from e
    sd = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in load_weights(src).items()}
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save(sd, tmp)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ModelFileError(f"cannot write {out}: {e.strerror or e}") from e
    n = sum(v.numel() for v in sd.values())
    log.info("wrote %s: %d tensors, %.2fM parameters, %s", out, len(sd), n / 1e6, dtype)
    return out


def main(argv: list[str] | None = None) -> None:
    """The command line: a user's mistake is a one-line usage error (exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="run folder or checkpoint file")
    parser.add_argument("out", help="output .pth")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.src, args.out, args.dtype)
    except (FileNotFoundError, ModelFileError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
