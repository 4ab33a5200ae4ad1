"""The typed schema of the training config, and the checks that run before any work.

Hydra composes conf/train.yaml and its groups into a DictConfig; `validate()` merges it into
the dataclasses below (so an unknown or mistyped key fails with its dotted name), then checks
what only the data can tell: the data folder exists, ctx_len fits the data, the batch sizes
divide, the model vocabulary covers the tokenizer. Every error names the field to change.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from rwkv_train.data.manifest import Manifest, ManifestError, load_manifest, split_by_source
from rwkv_train.lambada import Item, encode, largest_id, read_passages
from rwkv_train.model import RWKVConfig

log = logging.getLogger(__name__)

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16")  # what the trainer is tested with


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the field's dotted name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class DataConfig:
    path: Any = None
    """A data-prep folder, its manifest.json, or a list of {path, weight} to mix several;
    an entry's `sources: {name: multiplier}` reweights the sources of its build (DataEntry)."""
    ctx_len: int = 512
    """Tokens per sample (each sample reads ctx_len + 1)."""
    micro_batch_size: int = 1
    """Samples per device per forward/backward."""
    global_batch_size: int = 1
    """Samples per optimizer step over all devices; accumulation = global / (micro * ranks).
    May change at a resume: the data and the LR decay go on from the samples and tokens
    consumed so far (rwkv_train/progress.py)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 reads in the training process)."""
    val_samples: int = 64
    """ctx_len chunks evaluated at each validation, in all (0 disables validation): the first
    chunks of every source's val shards, taken from each source in turn and split over the
    ranks. Logged as val/loss (all of them), val/loss/<source> (with several sources) and
    val/loss_by_pos/<first>-<last> (rwkv_train/validation.py)."""
    val_path: Any = None
    """Data-prep folders whose val shards validation measures instead of those of `path`
    (a folder or a list): a fixed yardstick while the training mix changes (an anneal, a
    reweighting), so the val curves of all phases compare."""
    lambada_path: str | None = None
    """LAMBADA passages (OpenAI's lambada_test.jsonl) scored at every validation, split over
    the ranks: logged as lambada/ppl and lambada/acc (rwkv_train/lambada.py), the figures
    `python -m rwkv_train.evaluate --lambada` gives for the same checkpoint."""
    record_sample_ids: bool = False
    """Debugging: append the global sample indices each rank trains on to
    run_dir/sample_ids/rank{R}.txt (one micro-batch a line, as training takes it), to check
    rank disjointness."""


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    """"cpu", "gpu" or "auto" (Lightning's names)."""
    devices: int = 1
    """Devices (one process each) per node."""
    num_nodes: int = 1
    """Nodes; world size = devices x num_nodes."""
    strategy: str = "auto"
    """Lightning strategy name when `deepspeed.stage` is 0: "auto" is one process for one
    device and plain DDP for more. With a ZeRO stage the DeepSpeed strategy is used."""
    precision: str = "32-true"
    """Lightning precision: "32-true" on CPU, "bf16-mixed" on GPU."""
    max_steps: int = 100
    """Optimizer steps to train (the run ends there)."""
    segment_len: int = 0
    """Run each sample as consecutive segments of this many tokens, the RNN state carried
    from one to the next and each recomputed in the backward pass (rwkv_train/bptt.py): the
    gradient of the whole sample (exact BPTT, not truncated) with the activation memory of
    one segment. For data.ctx_len beyond what fits whole, e.g. 65536 with 4096. 0: whole."""
    log_every_n_steps: int = 1
    """How often metrics go to the loggers (metrics.jsonl gets every step)."""
    val_every_n_steps: int = 0
    """Validate every N optimizer steps (0: only at the end)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bitwise-reproducible runs (CPU)."""
    num_threads: int = 0
    """torch intra-op threads (0 leaves torch's default)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; null looks the device up in metrics.PEAK_FLOPS."""
    progress_bar: bool = True
    """Lightning's bar on a terminal; when stdout is a file, a log line a minute instead
    (rwkv_train/progress_lines.py)."""


@dataclass
class OptimConfig:
    lr_init: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 0
    warmup_start: float = 0.2
    """LR factor at step 0, rising linearly to 1 at warmup_steps (the Finch-era 0.2)."""
    decay: str = "cosine"
    """"cosine", "exponential" or "linear" over tokens from the end of warmup (or from
    decay_start_tokens), or "constant"."""
    decay_tokens: int | None = None
    """Tokens over which lr decays to lr_final; null = until trainer.max_steps."""
    decay_start_tokens: int = 0
    """Hold lr_init until the run has trained this many tokens (as train/tokens_seen counts
    them), then decay: warmup-stable-decay. A run held at a constant rate (decay=constant)
    can be annealed from any of its checkpoints by resuming it with decay=linear,
    decay_start_tokens = its train/tokens_seen there, and the trainer.max_steps to end at."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay, applied only to matrices (2-D+) not matched by no_decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping; the norm is logged either way)."""
    l2wrap: float = 1e-4
    """L2Wrap coefficient on the largest logit of each token (0 disables)."""
    lr_mult: dict[str, float] = field(
        default_factory=lambda: {"time_decay": 2.0, "time_first": 3.0}
    )
    """Learning-rate multipliers keyed by a parameter's own name (the last dotted part)."""
    no_decay: list[str] = field(default_factory=lambda: ["time_", "_w1", "_w2"])
    """Parameter-name substrings never weight-decayed, whatever their shape."""


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000
    """Save the full training state every N optimizer steps (and at the end); 0: only the end."""
    keep_last: int = 3
    """Checkpoints kept in run_dir/checkpoints (older ones are deleted)."""
    keep_every_n_steps: int = 0
    """Milestones: the checkpoints of steps that are multiples of N are written (whatever
    every_n_steps) and never deleted, for evaluating or exporting the model along the run
    later; 0: none."""


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO (conf/deepspeed/*.yaml); stage 0 means no DeepSpeed."""

    stage: int = 0
    """ZeRO stage: 0 off (trainer.strategy decides), 1 optimizer state, 2 + gradients,
    3 + parameters partitioned across ranks."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) in CPU memory (stages 1-3); the step is then
    DeepSpeed's CPU Adam, a C++ op built on first use (or by `python -m rwkv_train.ops.build
    --target cpu_adam`)."""
    offload_params: bool = False
    """Keep partitioned parameters in CPU memory (stage 3 only)."""
    reduce_bucket_size: float = 2e8
    """Elements per gradient reduce bucket (about 2e6 suits consumer GPUs, 2e8 A100/H100)."""
    allgather_bucket_size: float = 2e8
    """Elements per all-gather bucket (stage 3: the parameter prefetch bucket)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    param_persistence_threshold: float = 1e5
    """Stage 3: parameters smaller than this stay whole on every rank."""
    pin_memory: bool = False
    """Pin offloaded CPU memory: faster GPU transfers, but torch's pinned allocator rounds
    each buffer up to a power of two, so up to twice the host memory that `rwkv_train.plan`
    (which assumes unpinned) gives for offload."""


@dataclass
class LoggerConfig:
    name: str = "none"
    """"none" (metrics.jsonl only) or "wandb"."""
    project: str = "rwkv-train"
    entity: str | None = None
    mode: str | None = None
    """W&B mode ("online", "offline", "disabled"); null leaves it to WANDB_MODE."""
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    """W&B group: the runs of one sweep shown and compared together (the sweep configs set
    it)."""
    log_samples_every_n_steps: int = 0
    """Log short RNN-mode samples to the W&B table `samples` every N steps (0: never)."""


@dataclass
class NonFiniteConfig:
    policy: str = "skip"
    """"skip": drop the step and count it; "stop": checkpoint and stop at the first one.
    With several ranks a non-finite loss on any rank stops the run (a step cannot be skipped
    across ranks)."""
    max_skips: int = 10
    """With "skip", stop (with a checkpoint and a message) after this many non-finite losses."""


@dataclass
class TrainConfig:
    name: str = "run"
    runs_root: str = "runs"
    run_dir: str = "runs/run"
    """Where the resolved config, checkpoints, metrics and W&B id live; fixed per run so a
    restarted job finds them (never a timestamp)."""
    resume: Any = "auto"
    """"auto" (latest valid checkpoint in run_dir, else start fresh), "none", a checkpoint
    (runs/NAME/checkpoints/stepNNNNNNNN.ckpt) or another run's folder (its newest valid one)."""
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    """The architecture (the fields of RWKVConfig) plus `init_from`: a reference-layout .pth
    to start from, loaded with weights_only=True."""
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)


@dataclass
class Source:
    """One data source of the mixture, its manifest read."""

    manifest: Manifest
    weight: float


@dataclass
class Plan:
    """Everything derived and checked from the config before training starts."""

    cfg: TrainConfig
    model: RWKVConfig
    sources: list[Source]
    val: list[Manifest]  # whose val shards are validated on
    accumulate: int
    world_size: int
    init_from: str | None = None
    lambada: list[Item] | None = None  # the passages of data.lambada_path, tokenized


def to_schema(cfg: DictConfig) -> TrainConfig:
    """Merge a composed config into the typed schema; unknown keys and bad types fail here."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)  # Hydra's own settings are not the run's
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), container)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(str(key), str(e).splitlines()[0]) from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


@dataclass
class DataEntry:
    """One entry of `data.path`: a data-prep folder, its share of the samples, and optional
    multipliers of its sources' own proportions (rwkv_train/data/manifest.py
    split_by_source), which make each source a stream of its own."""

    path: str
    weight: float = 1.0
    sources: dict[str, float] | None = None

    def record(self) -> list[Any]:
        """What a checkpoint keeps of it, to tell a later resume that the data changed."""
        return [self.path, self.weight] + ([self.sources] if self.sources is not None else [])


def data_sources(path: Any) -> list[DataEntry]:
    """`data.path`: a folder, or a list of folders and {path, weight, sources} entries."""
    if path is None or path == "":
        raise ConfigError("data.path", "not set: give a data-prep folder or its manifest.json")
    if isinstance(path, str | Path):
        return [DataEntry(str(path))]
    if not isinstance(path, list | ListConfig):
        raise ConfigError("data.path", f"expected a path or a list of entries, got {path!r}")
    out = []
    for i, entry in enumerate(path):
        if isinstance(entry, str):
            out.append(DataEntry(entry))
            continue
        if not isinstance(entry, dict | DictConfig) or "path" not in entry:
            raise ConfigError(
                f"data.path[{i}]", f"expected a path or {{path, weight, sources}}, got {entry!r}"
            )
        unknown = sorted(set(entry) - {"path", "weight", "sources"})
        if unknown:
            raise ConfigError(f"data.path[{i}]", f"unknown keys {unknown}: path, weight, sources")
        sources = entry.get("sources")
        if sources is not None and not isinstance(sources, dict | DictConfig):
            raise ConfigError(
                f"data.path[{i}].sources", f"expected {{source: multiplier}}, got {sources!r}"
            )
        try:
            multipliers = None if sources is None else {str(k): float(sources[k]) for k in sources}
            out.append(DataEntry(str(entry["path"]), float(entry.get("weight", 1.0)), multipliers))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data.path[{i}]", f"not a number: {e}") from None
    return out


def _launched_per_node() -> bool:
    """Whether a launcher started this process as one of a multi-node job: srun (Slurm),
    torchrun (RANK, GROUP_RANK), or Lightning's manual form (NODE_RANK set on every node)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = os.environ
    return any(k in env for k in ("NODE_RANK", "GROUP_RANK", "RANK")) or SLURMEnvironment.detect()


def check_machine(plan: Plan) -> None:
    """The settings this machine cannot run, named before Lightning or the first forward pass
    fails on them with a traceback. Apart from `validate`, which checks a config for any
    machine (a GPU recipe validates on a laptop)."""
    accelerator, backend = plan.cfg.trainer.accelerator, plan.model.wkv_backend
    cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        raise ConfigError(
            "trainer.accelerator", f"{accelerator!r}, but torch sees no CUDA device here"
        )
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda)
    if backend == "cuda" and not on_gpu:
        raise ConfigError(
            "model.wkv_backend",
            f"'cuda' runs on a GPU, but this run trains on the CPU (trainer.accelerator="
            f"{accelerator}): use auto, cpp or torch",
        )
    if backend == "cpp" and on_gpu:
        raise ConfigError(
            "model.wkv_backend",
            "'cpp' is the CPU op, but this run trains on a GPU: use auto or cuda",
        )
    nodes = plan.cfg.trainer.num_nodes
    if nodes > 1 and not _launched_per_node():
        raise ConfigError(
            "trainer.num_nodes",
            f"{nodes}, but this process was started alone, not by a launcher of one process per "
            "node: it would wait for the other nodes' ranks until the timeout. Launch with "
            "slurm/train.sbatch (srun) or torchrun, or set NODE_RANK and MASTER_ADDR on each "
            "node; or train on this one with trainer.num_nodes=1",
        )
    from rwkv_train.ops.loader import CUDA_HEAD_SIZES

    m = plan.model
    fused_heads = on_gpu and backend in ("auto", "cuda") and m.version != 4
    if fused_heads and m.head_size not in CUDA_HEAD_SIZES:
        raise ConfigError(
            "model.head_size",
            f"{m.head_size}: the CUDA WKV kernels take head sizes "
            f"{', '.join(map(str, CUDA_HEAD_SIZES))}; train this one on the GPU with "
            "model.wkv_backend=torch (the chunked PyTorch form, slower)",
        )


def validate(cfg: DictConfig, world_size: int | None = None) -> Plan:
    """Check a composed config against the schema and the data; fail naming the field.
    `world_size` defaults to trainer.devices x trainer.num_nodes."""
    tc = to_schema(cfg)
    for name in ("devices", "num_nodes"):
        if getattr(tc.trainer, name) < 1:
            raise ConfigError(f"trainer.{name}", "must be at least 1")
    if world_size is None:
        world_size = tc.trainer.devices * tc.trainer.num_nodes
    arch = dict(tc.model)
    init_from = arch.pop("init_from", None)
    try:
        model = RWKVConfig.from_dict(arch)
    except (ValueError, TypeError) as e:
        raise ConfigError("model", str(e)) from None

    d = tc.data
    for name in ("ctx_len", "micro_batch_size", "global_batch_size"):
        if getattr(d, name) < 1:
            raise ConfigError(f"data.{name}", "must be at least 1")
    per_pass = d.micro_batch_size * world_size
    if d.global_batch_size % per_pass:
        raise ConfigError(
            "data.global_batch_size",
            f"{d.global_batch_size} is not a multiple of micro_batch_size x ranks = "
            f"{d.micro_batch_size} x {world_size}",
        )
    accumulate = d.global_batch_size // per_pass

    sources = []
    for i, entry in enumerate(data_sources(d.path)):
        field_name = "data.path" if i == 0 and not isinstance(d.path, list) else f"data.path[{i}]"
        if entry.weight <= 0:
            raise ConfigError(f"{field_name}.weight", f"must be positive, got {entry.weight}")
        manifest = _load(field_name, entry.path)
        if not manifest.train:
            raise ConfigError(field_name, f"{manifest.path} lists no train shards")
        if manifest.train_tokens < d.ctx_len + 1:
            raise ConfigError(
                "data.ctx_len",
                f"{d.ctx_len} needs at least {d.ctx_len + 1} tokens, but {manifest.path} has "
                f"{manifest.train_tokens} train tokens",
            )
        if model.vocab_size < manifest.vocab_size:
            raise ConfigError(
                "model.vocab_size",
                f"{model.vocab_size} is smaller than the vocabulary of the data's tokenizer "
                f"{manifest.tokenizer_name!r} ({manifest.vocab_size}) in {manifest.path}",
            )
        if entry.sources is None:
            sources.append(Source(manifest, entry.weight))
            continue
        try:
            parts, short = split_by_source(manifest, entry.sources, d.ctx_len)
        except ValueError as e:
            raise ConfigError(f"{field_name}.sources", str(e)) from None
        if not parts:
            raise ConfigError(f"{field_name}.sources", "leaves no source to train on")
        if short:
            log.warning(
                "%s: source(s) %s left out: fewer than ctx_len+1 = %d train tokens",
                field_name,
                ", ".join(short),
                d.ctx_len + 1,
            )
        sources += [Source(part, entry.weight * share) for part, share in parts]

    t, o = tc.trainer, tc.optim
    if t.precision not in PRECISIONS:
        raise ConfigError(
            "trainer.precision",
            f"{t.precision!r}: RWKV trains in bf16-mixed (GPU) or 32-true; fp16 overflows "
            "its exponentials and the WKV kernels take bf16 or float32",
        )
    if t.max_steps < 1:
        raise ConfigError("trainer.max_steps", "must be at least 1")
    if t.segment_len < 0:
        raise ConfigError("trainer.segment_len", "must be 0 (whole samples) or a token count")
    for name, value, meaning in (
        ("trainer.val_every_n_steps", t.val_every_n_steps, "0 (once, at the end)"),
        ("checkpoint.every_n_steps", tc.checkpoint.every_n_steps, "0 (only at the end)"),
        ("data.val_samples", d.val_samples, "0 (no validation)"),
        ("data.num_workers", d.num_workers, "0 (load in the training process)"),
    ):
        if value < 0:
            raise ConfigError(name, f"must be {meaning} or a positive count, not {value}")
    if t.log_every_n_steps < 1:
        raise ConfigError("trainer.log_every_n_steps", "must be at least 1")
    if o.decay not in ("cosine", "exponential", "linear", "constant"):
        raise ConfigError(
            "optim.decay", f"{o.decay!r} is not cosine, exponential, linear or constant"
        )
    if o.decay_start_tokens < 0:
        raise ConfigError("optim.decay_start_tokens", "must be >= 0")
    if o.lr_init <= 0 or o.lr_final <= 0:
        raise ConfigError("optim.lr_final" if o.lr_init > 0 else "optim.lr_init", "must be > 0")
    if not 0 <= o.warmup_start <= 1:
        raise ConfigError("optim.warmup_start", "must be within [0, 1]")
    if tc.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last", "must be at least 1")
    if tc.checkpoint.keep_every_n_steps < 0:
        raise ConfigError("checkpoint.keep_every_n_steps", "must be 0 (none) or a step count")
    if tc.nonfinite.policy not in ("skip", "stop"):
        raise ConfigError("nonfinite.policy", f"{tc.nonfinite.policy!r} is not skip or stop")
    if tc.logger.name not in ("none", "wandb"):
        raise ConfigError("logger.name", f"{tc.logger.name!r} is not none or wandb")
    ds = tc.deepspeed
    if ds.stage not in (0, 1, 2, 3):
        raise ConfigError("deepspeed.stage", f"{ds.stage} is not 0, 1, 2 or 3")
    if model.compile and ds.stage == 3:
        raise ConfigError(
            "model.compile",
            "not with deepspeed.stage=3, whose hooks gather each module's weights as it runs: "
            "torch.compile must break a block's graph at every one of them (the losses stay "
            "right, the speed-up is lost to recompiles); use ZeRO-1/2 or model.compile=false",
        )
    if ds.offload_params and ds.stage != 3:
        raise ConfigError("deepspeed.offload_params", "needs deepspeed.stage=3")
    if ds.offload_optimizer and ds.stage == 0:
        raise ConfigError("deepspeed.offload_optimizer", "needs a ZeRO stage (deepspeed.stage)")
    if ds.stage and t.strategy != "auto":
        raise ConfigError(
            "trainer.strategy",
            f"{t.strategy!r} with deepspeed.stage={ds.stage}: pick one (deepspeed=none)",
        )
    if init_from is not None and not Path(init_from).is_file():
        raise ConfigError("model.init_from", f"no file at {init_from}")
    if model.ctx_len != d.ctx_len:
        model = RWKVConfig.from_dict({**model.to_dict(), "ctx_len": d.ctx_len})
    val = [s.manifest for s in sources] if d.val_path is None else _val_manifests(d, model)
    lambada = None if d.lambada_path is None else _lambada_items(d.lambada_path, model)
    return Plan(tc, model, sources, val, accumulate, world_size, init_from, lambada)


def _load(field_name: str, path: str | Path) -> Manifest:
    """The manifest of a data folder named by `field_name`; its faults name that field."""
    try:
        return load_manifest(path)
    except ManifestError as e:
        raise ConfigError(field_name, str(e)) from None


def _lambada_items(path: str, model: RWKVConfig) -> list[Item]:
    """data.lambada_path's passages, tokenized; their ids must be the model's."""
    try:
        items = encode(read_passages(path))
    except (OSError, ValueError) as e:
        raise ConfigError("data.lambada_path", str(e)) from None
    top = largest_id(items)
    if top >= model.vocab_size:
        raise ConfigError(
            "data.lambada_path",
            f"its passages hold World token id {top}, beyond model.vocab_size {model.vocab_size}",
        )
    return items


def _val_manifests(d: DataConfig, model: RWKVConfig) -> list[Manifest]:
    """The manifests named by data.val_path, which must hold val shards of the model's
    vocabulary."""
    paths = d.val_path if isinstance(d.val_path, list | ListConfig) else [d.val_path]
    out = []
    for i, path in enumerate(paths):
        name = "data.val_path" if len(paths) == 1 else f"data.val_path[{i}]"
        if not isinstance(path, str | Path):
            raise ConfigError(name, f"expected a data-prep folder, got {path!r}")
        manifest = _load(name, path)
        if not manifest.val:
            raise ConfigError(name, f"{manifest.path} has no val shards")
        if model.vocab_size < manifest.vocab_size:
            raise ConfigError(
                name, f"its tokenizer has {manifest.vocab_size} ids, model.vocab_size "
                f"{model.vocab_size}",
            )  # fmt: skip
        out.append(manifest)
    return out
