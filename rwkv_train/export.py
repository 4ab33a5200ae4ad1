"""Export trained weights as a reference-layout .pth that RWKV tools read.

    python -m rwkv_train.export RUN_DIR_OR_CKPT OUT.pth [--dtype fp32|bf16]

A run folder means its newest valid checkpoint. The .pth is the model's state_dict (its names
and shapes already follow the reference layout) with no optimizer state and no config: the
`rwkv` package, RWKV-LM and `RWKVConfig.from_state_dict` read the architecture from the
tensors. A DeepSpeed ZeRO checkpoint (a folder of per-rank partitions) is consolidated from
its fp32 master weights with DeepSpeed's zero_to_fp32 helpers, on the CPU, in one process.
Use fp32 for parity checks (the `rwkv` package applies ln0 in the file's dtype).
"""

import argparse
import logging
import os
from pathlib import Path

import torch

from rwkv_train.checkpoint import find_latest

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREFIX = "net."  # the LightningModule holds the model as `net`


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
        raise FileNotFoundError(p)
    return p


def load_zero_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state_dict of a ZeRO (stage 1-3) checkpoint folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path))  # the tag named in `latest`


def load_checkpoint_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of a training checkpoint, under their reference names."""
    p = resolve_checkpoint(path)
    if p.is_dir():
        sd = load_zero_weights(p)
    else:
        sd = torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix(PREFIX): v for k, v in sd.items() if k.startswith(PREFIX)}


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a run folder, a training checkpoint or an exported .pth."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pth":
        return torch.load(p, map_location="cpu", weights_only=True)
    return load_checkpoint_weights(p)


def export(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Write the weights of `src` to `out` in `dtype`; returns the output path."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    sd = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in load_weights(src).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, out)
    n = sum(v.numel() for v in sd.values())
    log.info("wrote %s: %d tensors, %.2fM parameters, %s", out, len(sd), n / 1e6, dtype)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="run folder or checkpoint file")
    parser.add_argument("out", help="output .pth")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export(args.src, args.out, args.dtype)


if __name__ == "__main__":
    main()
