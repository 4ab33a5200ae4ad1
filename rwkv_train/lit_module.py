"""The LightningModule: where the plain model meets the loss, the optimizer and the logs.

It wraps `rwkv_train.model.RWKV` (as `self.net`, built on the meta device in
`configure_model()` and then initialised in place, so large models never exist twice in
memory), computes the loss as the mean over every target token of the global batch
(Lightning divides each micro-batch's mean by the accumulation count, and all micro-batches
hold the same number of tokens), adds L2Wrap (both through `bptt.segmented_loss`, which
runs a sample in segments when `trainer.segment_len` asks for it), owns the optimizer
groups and the LR schedule, and writes one record of metrics per optimizer step.

Under several ranks the logged loss and performance figures are reduced across ranks (see
`_reduce_across_ranks`); under DeepSpeed the engine clips gradients itself (its
`gradient_clipping` is optim.grad_clip) and reports the global norm; under ZeRO-3 the net is
built partitioned (see `configure_model`).
"""

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from rwkv_train.bptt import segmented_loss
from rwkv_train.compatible import (
    architecture,
    architecture_difference,
    group_layout,
    groups_difference,
    read_pth,
)
from rwkv_train.config import ConfigError, TrainConfig, data_sources
from rwkv_train.data.manifest import load_manifest
from rwkv_train.lambada import metrics as lambada_metrics
from rwkv_train.lambada import passage_scores
from rwkv_train.metrics import Throughput, max_memory_gib, peak_flops
from rwkv_train.model import RWKV, RWKVConfig
from rwkv_train.optim import (
    LRSchedule,
    adopt_loaded_state,
    apply_group_settings,
    build_optimizer,
    param_groups,
)
from rwkv_train.progress import Progress
from rwkv_train.reshard import INFO_KEY as UNIVERSAL_INFO_KEY
from rwkv_train.validation import ValidationLoss

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped because of non-finite losses (a checkpoint was written first)."""


def rng_state() -> dict[str, Any]:
    """Every RNG the training process may draw from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_pth(net: RWKV, path: str) -> None:
    """Load a reference-layout .pth (weights only, any float dtype) into `net`."""
    own = net.state_dict()
    sd = read_pth(path, {k: v.shape for k, v in own.items()})
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k].to(p.dtype))


def _load_pth_partitioned(net: RWKV, path: str) -> None:
    """`load_pth` for a model whose parameters ZeRO-3 has partitioned: one module's own
    parameters are gathered at a time, rank 0 copies the file's values in, and leaving the
    gather hands every rank its partition. Every rank checks the file (shapes from ds_shape)."""
    import torch.distributed as dist
    from deepspeed import zero
    from deepspeed.runtime.zero.partition_parameters import (
        restore_init_context,
        shutdown_init_context,
    )

    shutdown_init_context()  # zero.Init's patched tensor constructors break torch.load
    try:
        params = dict(net.named_parameters())
        sd = read_pth(path, {k: p.ds_shape for k, p in params.items()})
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        for prefix, module in net.named_modules():
            own = list(module.named_parameters(prefix=prefix, recurse=False))
            if not own:
                continue
            with zero.GatheredParameters([p for _, p in own], modifier_rank=0), torch.no_grad():
                if rank0:
                    for name, p in own:
                        p.copy_(sd[name].to(p.dtype))
    finally:
        restore_init_context()


def _align_batch_progress(checkpoint: dict[str, Any], accumulate: int) -> None:
    """Count the restored micro-batches in this run's accumulation.

    Lightning ends an optimizer step when its count of micro-batches reaches a multiple of the
    accumulation. A checkpoint counts them in the accumulation it was written with, which
    differs after resuming on another number of ranks (16 ranks with 1 micro-batch per step
    become 8 with 2): from an odd step the first step would end after one micro-batch, and
    every later one would straddle two steps of the sampler. Shifting the counts to
    global_step x accumulate (keeping their offsets from one another) restores the boundary;
    with an unchanged accumulation the shift is zero.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = loop.get("epoch_loop.batch_progress")
    if not progress:
        return
    shift = checkpoint["global_step"] * accumulate - progress["total"]["ready"]
    for part in ("total", "current"):
        for key in progress[part]:
            progress[part][key] += shift


def _init_partitioned(net: RWKV) -> None:
    """`net.init_weights()` for a model whose parameters ZeRO-3 has partitioned.

    zero.Init casts every float tensor that torch constructors make (torch.arange ...) to
    its dtype, so the constructors' own initialisation ran partly in fp32 where the init
    formulas use fp64. This repeats `init_weights()` (children first, registration order)
    with those constructors restored, gathering the parameters of one initialising module
    (its subtree: a time-mix sets its ln_x) at a time: the weights are bitwise those of an
    eager build, and at most one layer's time-mix or channel-mix is ever whole.
    """
    from deepspeed import zero
    from deepspeed.runtime.zero.partition_parameters import (
        restore_init_context,
        shutdown_init_context,
    )

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            visit(child)
        if hasattr(module, "reset_parameters"):
            with zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                module.reset_parameters()

    shutdown_init_context()
    try:
        visit(net)
    finally:
        restore_init_context()


class RWKVLitModule(L.LightningModule):
    """Training of one RWKV model under a `TrainConfig` (see rwkv_train/config.py)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: RWKVConfig,
        accumulate: int,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.init_from = init_from
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.accumulate = accumulate
        self.net: RWKV | None = None
        self.tokens_per_step = cfg.data.global_batch_size * cfg.data.ctx_len
        self.progress = Progress.start(cfg.data.global_batch_size, cfg.data.ctx_len)
        self.schedule = LRSchedule.from_config(cfg.optim, self.progress, cfg.trainer.max_steps)
        self.nonfinite_count = 0
        self.stop_reason: str | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._micro = 0
        self._loss_sum, self._loss_count = 0.0, 0  # over the micro-batches of this step
        self._grad_norm = float("nan")
        self._throughput = Throughput()
        self._optimizer: torch.optim.Optimizer | None = None
        self._val: ValidationLoss | None = None
        self._lambada: Tensor | None = None
        self._fingerprints: list[str] | None = None

    # ------------------------------------------------------------------ model
    def _zero_stage(self) -> int:
        return self.cfg.deepspeed.stage

    def configure_model(self) -> None:
        """Build on the meta device, then allocate on the strategy's device and initialise.

        Under ZeRO-3, Lightning runs this inside `deepspeed.zero.Init`, which allocates each
        submodule's parameters as it is constructed and partitions them across ranks at once,
        so the whole model never exists on one rank (see `_init_partitioned`).
        """
        if self.net is not None:
            return
        if self._zero_stage() == 3:
            rng = torch.get_rng_state()
            net = RWKV(self.model_cfg)
            torch.set_rng_state(rng)  # initialise from the RNG state a meta build would see
            if self.init_from:  # every parameter comes from the file: no init needed
                _load_pth_partitioned(net, self.init_from)
                log.info("initialised the weights from %s", self.init_from)
            else:
                _init_partitioned(net)
            self.net = net
            return
        with torch.device("meta"):
            net = RWKV(self.model_cfg)
        net.to_empty(device=torch.get_default_device())
        net.init_weights()
        if self.init_from:
            load_pth(net, self.init_from)
            log.info("initialised the weights from %s", self.init_from)
        self.net = net

    def forward(self, idx: Tensor) -> Tensor:
        assert self.net is not None
        return self.net(idx)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch  # (B, T), (B, T)
        loss, ce = segmented_loss(self.net, x, y, self._segment_len(x), self.cfg.optim.l2wrap)
        ce = ce.mean()
        if self.trainer.world_size > 1:
            # Every rank must take the same branch, and Lightning cannot skip a step across
            # ranks: a non-finite loss on any rank stops the run on all of them (the last
            # checkpoint holds the state before it). The zero loss keeps the collectives of
            # this last step in line; its update is never saved.
            bad = (~torch.isfinite(ce)).float()
            if self.trainer.strategy.reduce(bad, reduce_op="max") > 0:
                self._on_nonfinite(ce, stop=True)
                return sum(p.sum() for p in self.net.parameters()) * 0.0
        elif not torch.isfinite(ce):
            self._on_nonfinite(ce)
            return None
        self._loss_sum = self._loss_sum + ce
        self._loss_count += 1
        return loss

    def _segment_len(self, x: Tensor) -> int:
        """Tokens per forward+backward segment: trainer.segment_len, or the whole sample."""
        return self.cfg.trainer.segment_len or x.shape[1]

    def _on_nonfinite(self, loss: Tensor, stop: bool = False) -> None:
        self.nonfinite_count += 1
        nf = self.cfg.nonfinite
        step = self.trainer.global_step
        log.warning(
            "non-finite loss %s at step %d (%d so far): step skipped",
            loss.item(),
            step,
            self.nonfinite_count,
        )
        if stop or nf.policy == "stop" or self.nonfinite_count > nf.max_skips:
            self.stop_reason = (
                f"stopped at step {step}: {self.nonfinite_count} non-finite losses "
                f"(nonfinite.policy={nf.policy}, max_skips={nf.max_skips}); the last checkpoint "
                "holds the state before it. Lower optim.lr_init, check the data, or raise "
                "nonfinite.max_skips."
            )
            self.trainer.should_stop = True

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None, **_: Any
    ) -> None:
        """Clip to optim.grad_clip and keep the pre-clip global norm for the logs (DeepSpeed
        clips inside its engine, which computes the norm over every rank's partition)."""
        if self._zero_stage() > 0:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        limit = self.cfg.optim.grad_clip or float("inf")
        if params:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(params, limit).item()

    def configure_optimizers(self) -> dict:
        assert self.net is not None
        optimizer = build_optimizer(
            self.net, self.cfg.optim, offload=self.cfg.deepspeed.offload_optimizer
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        schedule = {"scheduler": scheduler, "interval": "step"}
        self._optimizer = optimizer  # DeepSpeed wraps it; the state it loads lands here
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if self._optimizer is not None:  # after a resume: saved by AdamW or by CPU Adam
            adopt_loaded_state(self._optimizer)
            groups = param_groups(self.net, self.cfg.optim)
            self._schedule_from_config(groups)
            apply_group_settings(self._optimizer, groups, self.lr_schedulers())
        self._micro, self._loss_sum, self._loss_count = 0, 0.0, 0

    def _schedule_from_config(self, groups: list[dict]) -> None:
        """Make the LR schedule this config's. LambdaLR saves its schedule object's fields and
        base rates with its step, and a resume restores them: without this, a run resumed
        with another optim.lr_*, warmup, decay or trainer.max_steps would keep following the
        checkpoint's curve while its config.yaml said otherwise."""
        scheduler = self.lr_schedulers()
        fresh = LRSchedule.from_config(self.cfg.optim, self.progress, self.cfg.trainer.max_steps)
        base_lrs = [g["lr"] for g in groups]  # lr_init x each group's lr_mult
        if fresh != self.schedule or base_lrs != scheduler.base_lrs:
            log.info(
                "LR schedule from the config (%s), not the checkpoint's (%s)", fresh, self.schedule
            )
        vars(self.schedule).update(vars(fresh))  # the object LambdaLR calls
        scheduler.base_lrs = base_lrs
        scheduler._last_lr = [b * self.schedule(scheduler.last_epoch) for b in base_lrs]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._throughput.batch_start()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._throughput.batch_end()
        self._micro += 1
        if self._micro < self.accumulate:
            return
        step = self.trainer.global_step  # already counts the step just taken
        # the mean over the micro-batches that counted: NaN for a step that was all skipped
        n = self._loss_count
        loss = float(self._loss_sum) / n if n else float("nan")
        self._micro, self._loss_sum, self._loss_count = 0, 0.0, 0
        world = self.trainer.world_size
        if self._zero_stage() > 0:
            norm = self.trainer.strategy.deepspeed_engine.get_global_grad_norm()
            self._grad_norm = float("nan") if norm is None else float(norm)
        local_tokens = self.tokens_per_step // world
        rates = self._throughput.step_end(local_tokens)
        memory = max_memory_gib(self.device)
        if world > 1:
            loss, rates, memory = self._reduce_across_ranks(loss, rates, memory)
        metrics = {
            "train/loss": loss,
            "optim/lr": self.cfg.optim.lr_init * self.schedule(step - 1),
            "optim/grad_norm": self._grad_norm,
            "train/tokens_seen": self.progress.tokens(step),
            "train/nonfinite_skipped": self.nonfinite_count,
        }
        if rates:
            tps = rates["tokens_per_sec"]  # per device (the mean over ranks)
            metrics["perf/tokens_per_sec_per_device"] = tps
            metrics["perf/tokens_per_sec"] = rates.get("tokens_per_sec_total", tps * world)
            metrics["perf/data_wait_pct"] = rates["data_wait_pct"]
            if "data_wait_pct_max" in rates:
                metrics["perf/data_wait_pct_max"] = rates["data_wait_pct_max"]
            peak = peak_flops(self.device, self.cfg.trainer.peak_flops)
            if peak:
                metrics["perf/mfu"] = tps * self.model_cfg.flops_per_token() / peak
            self.log("tok/s", metrics["perf/tokens_per_sec"], prog_bar=True, logger=False)
        metrics["mem/max_reserved_gib"] = memory
        self.log("loss", loss, prog_bar=True, logger=False)
        if step % self.cfg.trainer.log_every_n_steps == 0 or step == self.trainer.max_steps:
            self._log_metrics(metrics, step)

    def _reduce_across_ranks(
        self, loss: float, rates: dict[str, float], memory: float
    ) -> tuple[float, dict[str, float], float]:
        """The global batch's loss (mean of the ranks' equal-sized shares), tokens/s summed
        and per device (mean), data wait (mean and worst rank) and memory (worst rank).
        Every rank calls this at every optimizer step (it is a collective)."""
        tps, wait = rates.get("tokens_per_sec", 0.0), rates.get("data_wait_pct", 0.0)
        local = torch.tensor([loss, tps, wait, memory], dtype=torch.float64, device=self.device)
        table = self.trainer.strategy.all_gather(local).reshape(-1, 4).cpu()  # (ranks, 4)
        mean, high = table.mean(0).tolist(), table.max(0).values.tolist()
        out = {}
        if rates:
            out = {
                "tokens_per_sec": mean[1],
                "tokens_per_sec_total": float(table[:, 1].sum()),
                "data_wait_pct": mean[2],
                "data_wait_pct_max": high[2],
            }
        return mean[0], out, high[3]

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        names = self.trainer.datamodule.val_names
        self._val = ValidationLoss(names, self.cfg.data.ctx_len, self.device)
        # LAMBADA: summed log-probability, passages right, passages (rwkv_train/lambada.py)
        self._lambada = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(
        self, batch: tuple[Tensor, Tensor, Tensor] | dict[str, Tensor], batch_idx: int, *_: int
    ) -> None:
        if isinstance(batch, dict):  # LAMBADA passages
            log_prob, right = passage_scores(self.net(batch["x"]), batch["targets"])
            w = batch["weight"]
            self._lambada += torch.stack([(log_prob * w).sum(), (right * w).sum(), w.sum()])
            return
        x, y, source = batch
        _, ce = segmented_loss(self.net, x, y, self._segment_len(x))
        assert self._val is not None
        self._val.add(ce, source)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._val is None:
            return

        def reduce(t: Tensor) -> Tensor:  # the sum over ranks
            return self.trainer.strategy.reduce(t, reduce_op="sum")

        metrics = self._val.metrics(reduce)
        if "val/loss" in metrics:
            self.log("val_loss", metrics["val/loss"], prog_bar=True, logger=False)
        if self.trainer.datamodule.lambada:
            metrics |= lambada_metrics(*reduce(self._lambada).tolist())
        if metrics:
            self._log_metrics(metrics, self.trainer.global_step)

    # ------------------------------------------------------------------ checkpoint state
    def _continue_progress(self, step: int, extra: dict[str, Any]) -> None:
        """Take the checkpoint's data phases up to `step`, and this config's batch and
        context length from there on (a new phase if either changed)."""
        d = self.cfg.data
        phases = extra.get("phases")
        if phases is None:  # checkpoints of older versions: one batch size throughout
            batch = extra["consumed_samples"] // step if step else d.global_batch_size
            phases = [(0, batch, d.ctx_len)]
        saved = Progress.of(phases)
        if saved.samples(step) != extra["consumed_samples"]:
            raise ValueError(
                f"the checkpoint's phases {phases} do not add up to the "
                f"{extra['consumed_samples']} samples it consumed by step {step}"
            )
        self.progress = saved.resumed(step, d.global_batch_size, d.ctx_len)
        if (d.global_batch_size, d.ctx_len) == (saved.batch, saved.ctx_len) or self.global_rank:
            return
        log.info(
            "from step %d on: %d samples of %d tokens per step (the checkpoint's %d of %d); the "
            "data continues at global sample %d and the LR schedule's count at %d tokens",
            step,
            d.global_batch_size,
            d.ctx_len,
            saved.batch,
            saved.ctx_len,
            saved.samples(step),
            saved.tokens(step),
        )
        if d.ctx_len != saved.ctx_len:
            log.warning(
                "data.ctx_len changed from %d: samples are cut anew, and training goes on with "
                "global sample %d of the new order, as if the run had read it from the start",
                saved.ctx_len,
                saved.samples(step),
            )

    def _group_layout(self) -> list[list[Any]]:
        assert self.net is not None
        return group_layout(self.net, self.cfg.optim)

    def _data_sources(self) -> list[list[Any]]:
        return [entry.record() for entry in data_sources(self.cfg.data.path)]

    def _data_fingerprints(self) -> list[str]:
        """Of each data folder's shards: tells a folder rebuilt in place from the same one."""
        if self._fingerprints is None:
            entries = data_sources(self.cfg.data.path)
            self._fingerprints = [load_manifest(e.path).fingerprint for e in entries]
        return self._fingerprints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rwkv_train"] = {
            "rng": rng_state(),
            "consumed_samples": self.progress.samples(self.trainer.global_step),
            "phases": [list(p) for p in self.progress.phases],
            "nonfinite_count": self.nonfinite_count,
            "model_config": architecture(self.model_cfg),
            "param_groups": self._group_layout(),
            "data": self._data_sources(),
            "data_fingerprints": self._data_fingerprints(),
        }
        checkpoint[UNIVERSAL_INFO_KEY] = {}  # lets a ZeRO checkpoint be resharded (reshard.py)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint["rwkv_train"]
        reason = architecture_difference(extra["model_config"], architecture(self.model_cfg))
        if reason:
            raise ConfigError("model", reason)
        self._continue_progress(checkpoint["global_step"], extra)
        saved_groups = extra.get("param_groups")  # absent from checkpoints of older versions
        reason = saved_groups and groups_difference(saved_groups, self._group_layout())
        if reason:
            raise ConfigError("optim", reason)
        saved_data = extra.get("data")  # absent from checkpoints of older versions
        saved_prints = extra.get("data_fingerprints")
        if saved_data is not None and saved_data != self._data_sources():
            changed = f"data.path differs from the checkpoint's {saved_data}"
        elif saved_prints is not None and saved_prints != self._data_fingerprints():
            changed = "the data folders were rebuilt since the checkpoint (their shards differ)"
        else:
            changed = ""
        if changed and self.global_rank == 0:
            log.warning(
                "%s: training goes on with global sample %d of this data's order, as if the "
                "run had read it from the start (the position of a sample is a function of "
                "its index and the data)",
                changed,
                self.progress.samples(checkpoint["global_step"]),
            )
        self.nonfinite_count = extra["nonfinite_count"]
        self._rng_to_restore = extra["rng"]
        _align_batch_progress(checkpoint, self.accumulate)
