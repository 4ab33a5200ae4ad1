"""Training speed: tokens/s (and MFU on a GPU) of a full optimizer step.

    python benchmarks/bench_train.py                     # finch/eagle/rwkv4_debug, B=4, T=256
    python benchmarks/bench_train.py --models finch_debug --batch 8 --ctx-len 512 --threads 2
    python benchmarks/bench_train.py --device cuda --models finch_1.6b --layers 8 \
        --batch 2 --ctx-len 4096                         # bf16 autocast, Finch-1.6B-shaped

One step = forward, cross-entropy + L2Wrap, backward, gradient clipping and AdamW, exactly the
work of a trainer=cpu step (fp32; bf16 autocast over fp32 weights on a GPU, as trainer=gpu)
without Lightning's bookkeeping; tokens/s = B*T / median time of --steps steps after one
warm-up step (which compiles, with --compile). MFU = tokens/s x the model's FLOPs per token /
the device's peak (rwkv_train.metrics.PEAK_FLOPS); --layers trims the depth of a large model
to fit a short run. The models are read from conf/model/*.yaml (vocabulary 65536, so the
head matmul is a large share of the work at the debug widths).
Prints a Markdown table for BENCHMARKS.md with the machine's CPU and thread count.
"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from rwkv_train.config import OptimConfig
from rwkv_train.metrics import peak_flops
from rwkv_train.model import RWKV, RWKVConfig
from rwkv_train.optim import L2Wrap, build_optimizer
from rwkv_train.paths import conf_dir


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench(
    name: str,
    batch: int,
    ctx_len: int,
    steps: int,
    backend: str,
    device: torch.device,
    layers: int | None = None,
    compile: bool = False,
) -> tuple[float, RWKVConfig]:
    """(tokens/s, model config) of one model."""
    values = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / f"{name}.yaml"))
    values.update(ctx_len=ctx_len, wkv_backend=backend, compile=compile)
    if layers:
        values["n_layer"] = layers
    cfg = RWKVConfig.from_dict(values)
    torch.manual_seed(0)
    with device:
        net = RWKV(cfg)
    opt = build_optimizer(net, OptimConfig())
    x = torch.randint(0, cfg.vocab_size, (batch, ctx_len + 1), device=device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        L2Wrap.apply(loss, logits, 1e-4).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    return batch * ctx_len / statistics.median(times), cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="finch_debug,eagle_debug,rwkv4_debug")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto", help="wkv_backend: auto | torch | cpp | cuda")
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    p.add_argument("--layers", type=int, default=None, help="override n_layer")
    p.add_argument("--compile", action="store_true", help="model.compile: torch.compile blocks")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast,")
    else:
        print(f"{cpu_name()}, {a.threads} threads, torch {torch.__version__}, fp32,")
    print(f"B={a.batch}, T={a.ctx_len}, wkv_backend={a.backend}, compile={a.compile}\n")
    print("| model | layers | params | train tokens/s | MFU |")
    print("|---|---|---|---|---|")
    peak = peak_flops(device)
    for name in a.models.split(","):
        tps, cfg = bench(name, a.batch, a.ctx_len, a.steps, a.backend, device, a.layers, a.compile)
        mfu = f"{tps * cfg.flops_per_token() / peak:.1%}" if peak else "-"
        print(
            f"| {name} | {cfg.n_layer} | {cfg.num_params() / 1e6:.1f}M | {tps:,.0f} | {mfu} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
