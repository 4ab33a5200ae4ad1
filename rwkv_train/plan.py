"""Will a model fit, how fast will it go? `python -m rwkv_train.plan model=finch_14b gpus=64`.

A back-of-the-envelope planner for one data-parallel job under DeepSpeed ZeRO with bf16:
it prints the per-GPU memory for every ZeRO stage with and without gradient checkpointing,
proposes the cheapest settings that fit, and refuses given settings that cannot fit, saying
which term is too large. Memory terms, per GPU, for P parameters over n GPUs:

- weights: bf16, 2P (ZeRO-3: 2P/n);
- gradients: bf16, 2P (ZeRO-2 and 3: 2P/n);
- optimizer: fp32 master weights, Adam m and v (12 bytes) plus the fp32 gradient DeepSpeed
  hands the optimizer (4 bytes): 16P, divided by n from ZeRO-1 on;
- activations per sample of T tokens: every block keeps about `ACT_VALUES[version]` bf16 values
  per channel per token for its backward; with checkpointing a block keeps only its input (C
  values) and one block at a time is recomputed; the head keeps the bf16 logits and fp32
  softmax and its gradient, 10 bytes per token per vocabulary entry.

The activation constants are counted from the tensors each block saves for its backward;
they are estimates (within about 20 %), so the planner keeps `headroom_gb` free. Throughput is
`gpu_tflops * mfu / flops_per_token` with an assumed MFU, not a measurement.
"""

import math
import sys
from dataclasses import dataclass

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from rwkv_train.model.config import RWKVConfig
from rwkv_train.paths import conf_dir

GB = 1e9
# bf16 activation values kept per channel per token by one block (TimeMix + ChannelMix,
# ChannelMix width 3.5C for v5/v6 and 4C for v4 counted in).
ACT_VALUES = {4: 28, 5: 34, 6: 40}
HEAD_BYTES_PER_LOGIT = 10


@dataclass
class Estimate:
    """Per-GPU memory of one setting, in bytes."""

    zero_stage: int
    grad_checkpoint: bool
    micro_batch_size: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    headroom: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.headroom


def estimate(
    model: RWKVConfig,
    gpus: int,
    zero_stage: int,
    grad_checkpoint: bool,
    micro_batch_size: int,
    ctx_len: int,
    headroom_gb: float,
) -> Estimate:
    """The memory of one setting (see the module docstring for the terms)."""
    p = model.num_params()
    c, v, layers = model.n_embd, model.vocab_size, model.n_layer
    block = ACT_VALUES[model.version] * c * 2  # bytes per token per block
    per_token = (layers * c * 2 + block) if grad_checkpoint else layers * block
    per_token += HEAD_BYTES_PER_LOGIT * v
    return Estimate(
        zero_stage=zero_stage,
        grad_checkpoint=grad_checkpoint,
        micro_batch_size=micro_batch_size,
        weights=2 * p / (gpus if zero_stage >= 3 else 1),
        gradients=2 * p / (gpus if zero_stage >= 2 else 1),
        optimizer=16 * p / (gpus if zero_stage >= 1 else 1),
        activations=per_token * ctx_len * micro_batch_size,
        headroom=headroom_gb * GB,
    )


def candidates(cfg: DictConfig, model: RWKVConfig) -> list[Estimate]:
    """Every setting the config allows, cheapest first: low stage, no checkpointing, big micro."""
    stages = [cfg.zero_stage] if cfg.zero_stage is not None else [1, 2, 3]
    ckpts = [cfg.grad_checkpoint] if cfg.grad_checkpoint is not None else [False, True]
    micros = (
        [cfg.micro_batch_size]
        if cfg.micro_batch_size is not None
        else list(range(cfg.max_micro_batch, 0, -1))
    )
    return [
        estimate(model, cfg.gpus, s, g, m, cfg.ctx_len, cfg.headroom_gb)
        for s in stages
        for g in ckpts
        for m in micros
    ]


def tokens_per_second(model: RWKVConfig, cfg: DictConfig) -> float:
    """Estimated tokens/s of one GPU at the assumed MFU."""
    return cfg.gpu_tflops * 1e12 * cfg.mfu / model.flops_per_token()


def checkpoint_lead_seconds(model: RWKVConfig, cfg: DictConfig) -> int:
    """Seconds a pre-emption signal must come before the time limit to save a checkpoint.

    A full checkpoint holds bf16 weights and the fp32 optimizer state (14 bytes per parameter);
    twice its write time at `ckpt_write_gbps`, plus a minute for the step in flight and start-up.
    """
    size = 14 * model.num_params()
    return math.ceil(2 * size / (cfg.ckpt_write_gbps * GB)) + 60


def report(cfg: DictConfig) -> int:
    """Print the plan; 0 when a setting fits, 1 when none does."""
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    mcfg.pop("init_from", None)
    model = RWKVConfig.from_dict(mcfg)
    limit = cfg.gpu_mem_gb * GB
    name = OmegaConf.select(cfg, "hydra:runtime.choices.model", default=None) or "model"
    print(
        f"{name}: RWKV-{model.version}, L{model.n_layer} C{model.n_embd} V{model.vocab_size}, "
        f"{model.num_params() / 1e9:.2f}B parameters, "
        f"{model.flops_per_token() / 1e9:.1f} GFLOP/token (fwd+bwd)"
    )
    print(f"{cfg.gpus} GPUs x {cfg.gpu_mem_gb} GB, ctx_len {cfg.ctx_len}\n")
    print("per GPU, GB          weights  grads  optim  activ  headroom  total")
    for stage in (1, 2, 3):
        for ckpt in (False, True):
            e = estimate(model, cfg.gpus, stage, ckpt, 1, cfg.ctx_len, cfg.headroom_gb)
            label = f"ZeRO-{stage} ckpt={'on ' if ckpt else 'off'} mb=1"
            print(
                f"{label:20s} {e.weights / GB:7.1f} {e.gradients / GB:6.1f} "
                f"{e.optimizer / GB:6.1f} {e.activations / GB:6.1f} {e.headroom / GB:9.1f} "
                f"{e.total / GB:6.1f}"
            )
    fits = [e for e in candidates(cfg, model) if e.total <= limit]
    if not fits:
        e = min(candidates(cfg, model), key=lambda x: x.total)
        terms = {
            "weights": e.weights,
            "gradients": e.gradients,
            "optimizer states": e.optimizer,
            "activations": e.activations,
        }
        worst = max(terms, key=terms.get)
        print(
            f"\nREFUSED: the smallest allowed setting (ZeRO-{e.zero_stage}, grad_checkpoint="
            f"{e.grad_checkpoint}, micro_batch_size={e.micro_batch_size}) needs "
            f"{e.total / GB:.1f} GB per GPU > {cfg.gpu_mem_gb} GB; the largest term is {worst} "
            f"({terms[worst] / GB:.1f} GB). Use more GPUs, a higher ZeRO stage, gradient "
            "checkpointing, a smaller micro-batch or a shorter ctx_len."
        )
        return 1
    best = fits[0]
    tps = tokens_per_second(model, cfg)
    global_tokens = cfg.global_batch_tokens or best.micro_batch_size * cfg.gpus * cfg.ctx_len
    print(
        f"\nproposed: deepspeed=zero{best.zero_stage} model.grad_checkpoint="
        f"{str(best.grad_checkpoint).lower()} data.micro_batch_size={best.micro_batch_size} "
        f"({best.total / GB:.1f} of {cfg.gpu_mem_gb} GB per GPU)"
    )
    print(
        f"throughput at MFU {cfg.mfu:.0%}: {tps / 1e3:.1f}K tokens/s per GPU, "
        f"{tps * cfg.gpus / 1e6:.2f}M tokens/s in all, "
        f"{global_tokens / (tps * cfg.gpus):.2f} s per step of {global_tokens} tokens"
    )
    print(
        f"pre-emption signal lead: {checkpoint_lead_seconds(model, cfg)} s "
        f"(checkpoint {14 * model.num_params() / GB:.0f} GB at {cfg.ckpt_write_gbps} GB/s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("plan", overrides=args, return_hydra_config=True)
    return report(cfg)


if __name__ == "__main__":
    sys.exit(main())
