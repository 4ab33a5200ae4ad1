"""The LightningModule: where the plain model meets the loss, the optimizer and the logs.

It wraps `rwkv_train.model.RWKV` (as `self.net`, built on the meta device in
`configure_model()` and then initialised in place, so large models never exist twice in
memory), computes the loss as the mean over every target token of the global batch
(Lightning divides each micro-batch's mean by the accumulation count, and all micro-batches
hold the same number of tokens), adds L2Wrap, owns the optimizer groups and the LR schedule,
and writes one record of metrics per optimizer step.
"""

import logging
import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_train.config import TrainConfig
from rwkv_train.metrics import Throughput, max_memory_gib, peak_flops
from rwkv_train.model import RWKV, RWKVConfig
from rwkv_train.optim import L2Wrap, LRSchedule, build_optimizer

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
    sd = torch.load(path, map_location="cpu", weights_only=True)
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, extra {extra[:5]}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model {own[k].shape}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k].to(p.dtype))


def architecture(cfg: RWKVConfig) -> dict[str, Any]:
    """The fields that fix the weights' shapes and meaning (not how they are computed)."""
    d = cfg.to_dict()
    for k in ("ctx_len", "grad_checkpoint", "wkv_backend"):
        d.pop(k, None)
    return d


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
        self.schedule = LRSchedule.from_config(
            cfg.optim, self.tokens_per_step, cfg.trainer.max_steps
        )
        self.nonfinite_count = 0
        self.stop_reason: str | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._micro = 0
        self._loss_sum = 0.0
        self._grad_norm = float("nan")
        self._throughput = Throughput()
        self._val_sum = 0.0
        self._val_count = 0

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build on the meta device, then allocate on the strategy's device and initialise."""
        if self.net is not None:
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
        logits = self(x)  # (B, T, V) float32
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            self._on_nonfinite(loss)
            return None
        self._loss_sum = self._loss_sum + loss.detach()
        if self.cfg.optim.l2wrap > 0:
            loss = L2Wrap.apply(loss, logits, self.cfg.optim.l2wrap)
        return loss

    def _on_nonfinite(self, loss: Tensor) -> None:
        self.nonfinite_count += 1
        nf = self.cfg.nonfinite
        step = self.trainer.global_step
        log.warning(
            "non-finite loss %s at step %d (%d so far): step skipped",
            loss.item(),
            step,
            self.nonfinite_count,
        )
        if nf.policy == "stop" or self.nonfinite_count > nf.max_skips:
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
        """Clip to optim.grad_clip and keep the pre-clip global norm for the logs."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        limit = self.cfg.optim.grad_clip or float("inf")
        if params:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(params, limit).item()

    def configure_optimizers(self) -> dict:
        assert self.net is not None
        optimizer = build_optimizer(self.net, self.cfg.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self._micro = 0
        self._loss_sum = 0.0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._throughput.batch_start()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._throughput.batch_end()
        self._micro += 1
        if self._micro < self.accumulate:
            return
        step = self.trainer.global_step  # already counts the step just taken
        loss = float(self._loss_sum) / self.accumulate
        self._micro, self._loss_sum = 0, 0.0
        metrics = {
            "train/loss": loss,
            "optim/lr": self.cfg.optim.lr_init * self.schedule(step - 1),
            "optim/grad_norm": self._grad_norm,
            "train/tokens_seen": step * self.tokens_per_step,
            "train/nonfinite_skipped": self.nonfinite_count,
        }
        world = self.trainer.world_size
        local_tokens = self.tokens_per_step // world
        rates = self._throughput.step_end(local_tokens)
        if rates:
            tps = rates["tokens_per_sec"]
            metrics["perf/tokens_per_sec_per_device"] = tps
            metrics["perf/tokens_per_sec"] = tps * world
            metrics["perf/data_wait_pct"] = rates["data_wait_pct"]
            peak = peak_flops(self.device, self.cfg.trainer.peak_flops)
            if peak:
                metrics["perf/mfu"] = tps * self.model_cfg.flops_per_token() / peak
            self.log("tok/s", tps * world, prog_bar=True, logger=False)
        metrics["mem/max_reserved_gib"] = max_memory_gib(self.device)
        self.log("loss", loss, prog_bar=True, logger=False)
        if step % self.cfg.trainer.log_every_n_steps == 0 or step == self.trainer.max_steps:
            self._log_metrics(metrics, step)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_count = 0.0, 0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._val_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        self._val_count += y.numel()

    def on_validation_epoch_end(self) -> None:
        if self._val_count == 0 or self.trainer.sanity_checking:
            return
        loss = self._val_sum / self._val_count
        ppl = math.exp(min(loss, 80.0))
        self.log("val_loss", loss, prog_bar=True, logger=False)
        self._log_metrics({"val/loss": loss, "val/ppl": ppl}, self.trainer.global_step)

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rwkv_train"] = {
            "rng": rng_state(),
            "consumed_samples": self.trainer.global_step * self.cfg.data.global_batch_size,
            "nonfinite_count": self.nonfinite_count,
            "model_config": architecture(self.model_cfg),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint["rwkv_train"]
        if extra["model_config"] != architecture(self.model_cfg):
            raise ValueError(
                "the checkpoint holds a different model config "
                f"({extra['model_config']}); use another run_dir or resume=none"
            )
        expected = checkpoint["global_step"] * self.cfg.data.global_batch_size
        if extra["consumed_samples"] != expected:
            raise ValueError(
                f"checkpoint consumed {extra['consumed_samples']} samples but step "
                f"{checkpoint['global_step']} x data.global_batch_size gives {expected}: "
                "data.global_batch_size changed since it was saved"
            )
        self.nonfinite_count = extra["nonfinite_count"]
        self._rng_to_restore = extra["rng"]
