"""Will a model fit, how fast will it go? `python -m rwkv_train.plan model=finch_14b gpus=64`.

A back-of-the-envelope planner for one data-parallel job under DeepSpeed ZeRO with bf16:
it prints the per-GPU memory for every ZeRO stage with and without gradient checkpointing,
and with CPU offload, proposes the cheapest settings that fit, and refuses given settings
that cannot fit, saying which term is too large. Memory terms, per GPU, for P parameters
over n GPUs:

- weights: bf16, 2P (ZeRO-3: 2P/n, plus the largest module gathered whole and the next one
  prefetched, 2 x 2 max(block, V C));
- gradients: bf16, 2P (ZeRO-2 and 3: 2P/n);
- optimizer: fp32 master weights, Adam m and v (12 bytes) plus the fp32 gradient DeepSpeed
  hands the optimizer (4 bytes): 16P, divided by n from ZeRO-1 on;
- activations per sample of T tokens: every block keeps about `ACT_VALUES[version]` bf16 values
  per channel per token for its backward; with checkpointing a block keeps only its input (C
  values) and one block at a time is recomputed; the head keeps the bf16 logits and fp32
  softmax and its gradient, 10 bytes per token per vocabulary entry. With `segment_len`
  (exact BPTT in segments, rwkv_train/bptt.py) T is the segment's length, plus the fp32 RNN
  state kept at the start of every segment (n_layer x (2C + C N) floats; RWKV-4: 5C). Left
  unset, segments are proposed (the longest that fits) only when whole samples fit nowhere.

CPU offload (ZeRO-Offload) moves the optimizer term and the gradients to host memory (only
the reduce buckets stay on the GPU, inside the headroom), and with ZeRO-3 optionally the
weights' partitions too (the gathered modules stay). Host memory is counted per node, the
per-GPU terms times the GPUs on a node. Offload trades speed for memory (the optimizer step
runs on the CPU), so it is proposed only when nothing fits without it.

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


# What ZeRO-Offload keeps in CPU memory: nothing, the optimizer (with the gradients), or
# also the weights' partitions (ZeRO-3 only).
OFFLOADS = ("none", "optimizer", "params")


@dataclass
class Estimate:
    """Per-GPU memory of one setting, in bytes; `host` is the CPU memory per GPU."""

    zero_stage: int
    grad_checkpoint: bool
    micro_batch_size: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    headroom: float
    offload: str = "none"
    host: float = 0.0
    segment_len: int = 0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.headroom

    def overrides(self) -> str:
        """The training overrides of this setting."""
        if self.offload == "params":
            ds = "deepspeed=zero3_offload"
        elif self.offload == "optimizer":
            ds = "deepspeed=zero2_offload"
            if self.zero_stage != 2:
                ds = f"deepspeed=zero{self.zero_stage} deepspeed.offload_optimizer=true"
        else:
            ds = f"deepspeed=zero{self.zero_stage}"
        segments = f" trainer.segment_len={self.segment_len}" if self.segment_len else ""
        return (
            f"{ds} model.grad_checkpoint={str(self.grad_checkpoint).lower()} "
            f"data.micro_batch_size={self.micro_batch_size}{segments}"
        )


def settings(offload: bool | None) -> list[tuple[int, str]]:
    """(ZeRO stage, offload) pairs, fastest first: every stage without offload, then the
    optimizer offloaded (stages 2 and 3), then the weights too (stage 3)."""
    pairs = [(s, "none") for s in (1, 2, 3)] + [(2, "optimizer"), (3, "optimizer"), (3, "params")]
    if offload is None:
        return pairs
    return [(s, o) for s, o in pairs if (o != "none") == offload]


def estimate(
    model: RWKVConfig,
    gpus: int,
    zero_stage: int,
    grad_checkpoint: bool,
    micro_batch_size: int,
    ctx_len: int,
    headroom_gb: float,
    offload: str = "none",
    segment_len: int = 0,
) -> Estimate:
    """The memory of one setting (see the module docstring for the terms)."""
    if offload not in OFFLOADS or (offload == "params" and zero_stage != 3):
        raise ValueError(f"offload={offload!r} with ZeRO-{zero_stage}")
    p = model.num_params()
    c, v, layers = model.n_embd, model.vocab_size, model.n_layer
    block = ACT_VALUES[model.version] * c * 2  # bytes per token per block
    per_token = (layers * c * 2 + block) if grad_checkpoint else layers * block
    per_token += HEAD_BYTES_PER_LOGIT * v
    segment_len = segment_len if 0 < segment_len < ctx_len else 0  # else the whole sample
    tokens, states = ctx_len, 0.0
    if segment_len:
        wkv_state = model.n_embd * (3 if model.version == 4 else model.head_size)
        tokens = segment_len
        states = math.ceil(ctx_len / segment_len) * layers * (2 * c + wkv_state) * 4
    weights = 2 * p
    if zero_stage >= 3:
        gathered = 2 * 2 * max(model.layer_params(), v * c)
        weights = gathered + (0 if offload == "params" else 2 * p / gpus)
    on_gpu = offload == "none"
    return Estimate(
        zero_stage=zero_stage,
        grad_checkpoint=grad_checkpoint,
        micro_batch_size=micro_batch_size,
        weights=weights,
        gradients=2 * p / (gpus if zero_stage >= 2 else 1) if on_gpu else 0.0,
        optimizer=16 * p / gpus if on_gpu else 0.0,
        activations=(per_token * tokens + states) * micro_batch_size,
        headroom=headroom_gb * GB,
        offload=offload,
        host=0.0 if on_gpu else (16 + (2 if offload == "params" else 0)) * p / gpus,
        segment_len=segment_len,
    )


# Segment lengths tried, longest first, when whole samples fit nowhere.
SEGMENTS = (16384, 8192, 4096, 2048, 1024, 512)


def recompute_options(
    ctx_len: int, grad_checkpoint: bool | None, segment_len: int | None
) -> list[tuple[int, bool]]:
    """(segment_len, grad_checkpoint) pairs allowed by the config, by the forward passes they
    recompute: none (whole samples), one (checkpointing, or segments, the longest first),
    two (both). A value left None is searched; segment_len 0 means whole samples."""
    ckpts = [grad_checkpoint] if grad_checkpoint is not None else [False, True]
    if segment_len is not None:
        return [(segment_len, g) for g in ckpts]
    segs = [s for s in SEGMENTS if s < ctx_len]
    return [(0, g) for g in ckpts] + [(s, g) for g in ckpts for s in segs]


def candidates(cfg: DictConfig, model: RWKVConfig) -> list[Estimate]:
    """Every setting the config allows, cheapest first: ZeRO-1 or 2 with the least
    recomputation, then ZeRO-3, then offload; big micro-batches first within each.

    Recomputation costs every step a third more compute. ZeRO-2's gradient reduce-scatters
    overlap the backward, so it comes before ZeRO-1 with recomputation; ZeRO-3 gathers the
    weights again in every forward and backward, so it comes after.
    """
    pairs = settings(cfg.offload)
    if cfg.zero_stage is not None:
        pairs = [(s, o) for s, o in pairs if s == cfg.zero_stage]
    options = recompute_options(cfg.ctx_len, cfg.grad_checkpoint, cfg.segment_len)
    micros = (
        [cfg.micro_batch_size]
        if cfg.micro_batch_size is not None
        else list(range(cfg.max_micro_batch, 0, -1))
    )

    def rank(pair: tuple[int, str], option: tuple[int, bool]) -> tuple[int, int]:
        stage, offload = pair
        tier = 0 if stage < 3 and offload == "none" else 1 + settings(None).index(pair)
        return tier, options.index(option)

    ordered = sorted(((p, opt) for p in pairs for opt in options), key=lambda x: rank(*x))
    return [
        estimate(model, cfg.gpus, s, g, m, cfg.ctx_len, cfg.headroom_gb, o, seg)
        for (s, o), (seg, g) in ordered
        for m in micros
    ]


def gpus_per_node(cfg: DictConfig) -> int:
    """The GPUs whose offloaded state shares one node's host memory."""
    return min(cfg.gpus, cfg.gpus_per_node)


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


class PlanError(ValueError):
    """A planner setting that cannot describe a job; the message names it."""


def check(cfg: DictConfig) -> None:
    """Refuse settings no job has, naming them, before any arithmetic divides by them."""

    def number(key: str, whole: bool, low: float, high: float = math.inf) -> None:
        """A whole number >= low, or any number > low (and <= high)."""
        value = cfg[key]
        kinds = (int,) if whole else (int, float)
        fits = isinstance(value, kinds) and not isinstance(value, bool)
        if fits:
            fits = (value >= low if whole else value > low) and value <= high
        if not fits:
            want = f"a whole number >= {low}" if whole else f"a number > {low}"
            limit = f" and <= {high}" if high < math.inf else ""
            raise PlanError(f"{key}: must be {want}{limit}, not {value!r}")

    for key in ("gpus", "ctx_len", "max_micro_batch", "gpus_per_node"):
        number(key, True, 1)
    for key in ("gpu_mem_gb", "gpu_tflops", "host_mem_gb", "ckpt_write_gbps"):
        number(key, False, 0)
    number("mfu", False, 0, 1)
    headroom = cfg.headroom_gb
    if isinstance(headroom, bool) or not isinstance(headroom, int | float) or headroom < 0:
        raise PlanError(f"headroom_gb: must be a number >= 0, not {headroom!r}")
    if cfg.micro_batch_size is not None:
        number("micro_batch_size", True, 1)
    if cfg.segment_len is not None:
        number("segment_len", True, 0, cfg.ctx_len)
    if cfg.zero_stage is not None and cfg.zero_stage not in (1, 2, 3):
        raise PlanError(f"zero_stage: must be 1, 2, 3 or null, not {cfg.zero_stage!r}")
    if cfg.zero_stage is not None and cfg.offload and cfg.zero_stage == 1:
        raise PlanError("offload=true needs zero_stage 2 or 3 (or null)")
    if cfg.global_batch_tokens is not None:
        number("global_batch_tokens", True, cfg.gpus * cfg.ctx_len)


def report(cfg: DictConfig) -> int:
    """Print the plan; 0 when a setting fits, 1 when none does."""
    check(cfg)
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
    table_seg = cfg.segment_len or 0
    segments = f" in segments of {table_seg}" if 0 < table_seg < cfg.ctx_len else ""
    print(f"{cfg.gpus} GPUs x {cfg.gpu_mem_gb} GB, ctx_len {cfg.ctx_len}{segments}\n")
    node = gpus_per_node(cfg)
    print("micro-batch 1, GB              weights  grads  optim  activ  headroom  total  host/node")
    for stage, offload in settings(None):
        for ckpt in (False, True):
            e = estimate(
                model, cfg.gpus, stage, ckpt, 1, cfg.ctx_len, cfg.headroom_gb, offload, table_seg,
            )  # fmt: skip
            where = {"none": "", "optimizer": " cpu:optim", "params": " cpu:optim+wts"}[offload]
            label = f"ZeRO-{stage}{where} ckpt={'on' if ckpt else 'off'}"
            print(
                f"{label:30s} {e.weights / GB:7.1f} {e.gradients / GB:6.1f} "
                f"{e.optimizer / GB:6.1f} {e.activations / GB:6.1f} {e.headroom / GB:9.1f} "
                f"{e.total / GB:6.1f} {e.host * node / GB:10.1f}"
            )
    allowed = candidates(cfg, model)
    fits = [e for e in allowed if e.total <= limit and e.host * node <= cfg.host_mem_gb * GB]
    if not fits:
        e = min(allowed, key=lambda x: x.total)
        setting = (
            f"ZeRO-{e.zero_stage}, offload={e.offload}, grad_checkpoint={e.grad_checkpoint}, "
            f"micro_batch_size={e.micro_batch_size}, segment_len={e.segment_len}"
        )
        if e.total <= limit:  # the GPUs would do; the host cannot hold what is offloaded
            print(
                f"\nREFUSED: the smallest allowed setting ({setting}) fits the GPUs but needs "
                f"{e.host * node / GB:.1f} GB of host memory per node ({node} GPUs) > "
                f"host_mem_gb={cfg.host_mem_gb}. Use more nodes, or nodes with more memory."
            )
            return 1
        terms = {
            "weights": e.weights,
            "gradients": e.gradients,
            "optimizer states": e.optimizer,
            "activations": e.activations,
        }
        worst = max(terms, key=terms.get)
        print(
            f"\nREFUSED: the smallest allowed setting ({setting}) needs {e.total / GB:.1f} GB "
            f"per GPU > {cfg.gpu_mem_gb} GB; the largest term is {worst} "
            f"({terms[worst] / GB:.1f} GB). Use more GPUs, a higher ZeRO stage, CPU offload, "
            "gradient checkpointing, a smaller micro-batch, a shorter ctx_len or segment_len."
        )
        return 1
    best = fits[0]
    # Forward and backward are three forwards' work; segments and gradient checkpointing each
    # run the forward once more, work that model FLOPs (and so MFU) do not count.
    recomputes = bool(best.segment_len) + bool(best.grad_checkpoint)
    tps = tokens_per_second(model, cfg) * 3 / (3 + recomputes)
    global_tokens = cfg.global_batch_tokens or best.micro_batch_size * cfg.gpus * cfg.ctx_len
    host = f", {best.host * node / GB:.1f} GB of host memory per node" if best.host else ""
    print(
        f"\nproposed: {best.overrides()} ({best.total / GB:.1f} of {cfg.gpu_mem_gb} GB per GPU"
        f"{host})"
    )
    slower = " (less with offload: the optimizer steps on the CPU)" if best.host else ""
    if recomputes:
        what = " and ".join(
            w for w, on in (("segments", best.segment_len), ("checkpointing", best.grad_checkpoint))
            if on
        )  # fmt: skip
        slower += f" with {what} (each recomputes the forward: x{3 / (3 + recomputes):.2f})"
    print(
        f"throughput at MFU {cfg.mfu:.0%}{slower}: {tps / 1e3:.1f}K tokens/s per GPU, "
        f"{tps * cfg.gpus / 1e3:.1f}K tokens/s in all, "
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
    try:
        return report(cfg)
    except PlanError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
