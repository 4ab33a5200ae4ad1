"""Optimizer parameter groups, the learning-rate schedule and L2Wrap, as in the reference
trainer with two deliberate changes (documented where they happen): the schedule is a pure
function of the optimizer step, so it never re-warms after a resume, and L2Wrap follows the
loss's gradient scale, so gradient accumulation leaves it unchanged.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rwkv_train.config import OptimConfig
from rwkv_train.progress import Phase, Progress


def param_groups(net: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: lr multiplier by parameter name, weight decay only on matrices.

    A multiplier applies when the parameter's own name (the last dotted part) equals a key of
    `cfg.lr_mult`: time_decay 2x, RWKV-4's time_first 3x; LoRAs (time_decay_w1 ...), mixes and
    bonuses stay at 1x, as in the reference. Decay applies to tensors of 2+ non-unit dims whose
    name matches none of `cfg.no_decay` (so emb and head are decayed, LoRAs are not).
    """
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    names: dict[tuple[float, bool], list[str]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        mult = float(cfg.lr_mult.get(name.rsplit(".", 1)[-1], 1.0))
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the full shape here
        decay = (
            cfg.weight_decay > 0
            and sum(n > 1 for n in shape) >= 2
            and not any(pat in name for pat in cfg.no_decay)
        )
        buckets.setdefault((mult, decay), []).append(p)
        names.setdefault((mult, decay), []).append(name)
    return [
        {
            "params": params,
            "lr": cfg.lr_init * mult,
            "lr_mult": mult,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "names": names[(mult, decay)],
        }
        for (mult, decay), params in sorted(buckets.items())
    ]


def build_optimizer(
    net: nn.Module, cfg: OptimConfig, offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (decoupled decay; zero decay is plain Adam).

    `offload`: the optimizer state lives in CPU memory (ZeRO-Offload), where DeepSpeed refuses
    a torch optimizer at start-up and steps with its own vectorised, multi-threaded CPU Adam
    (same update; its C++ op is built on first use).
    """
    groups = param_groups(net, cfg)
    for g in groups:
        g.pop("names")
    betas = tuple(cfg.betas)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from rwkv_train.ops.loader import load_cpu_adam

        load_cpu_adam()  # its C++ op, built once and safely; DeepSpeedCPUAdam then loads it
        return DeepSpeedCPUAdam(groups, lr=cfg.lr_init, betas=betas, eps=cfg.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr_init, betas=betas, eps=cfg.eps)


def adopt_loaded_state(optimizer: torch.optim.Optimizer) -> None:
    """Put a resumed optimizer state into the form this optimizer steps with.

    A run may resume with ZeRO-Offload turned on or off (more GPUs, or fewer), so state that
    torch's AdamW saved can reach DeepSpeed's CPU Adam and the reverse: their Adam moments are
    the same, but CPU Adam wants an int step and a `bias_correction` group key, AdamW a
    tensor step and its own group keys. A state already in this optimizer's form is left as
    it is (an unchanged resume stays bit for bit), except that a step tensor shared by
    several parameters is given to each its own.
    """
    cpu_adam = type(optimizer).__name__ == "DeepSpeedCPUAdam"
    for group in optimizer.param_groups:
        for key, value in optimizer.defaults.items():
            group.setdefault(key, value)
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if step is None:
            continue
        if cpu_adam and torch.is_tensor(step):
            state["step"] = int(step.item())
        elif not cpu_adam and not torch.is_tensor(step):
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
        elif torch.is_tensor(step) and id(step) in seen:
            # DeepSpeed's ZeRO-3 universal loader gives every group one shared step tensor,
            # which AdamW then advances once per group per step
            state["step"] = step.clone()
        seen.add(id(state["step"]))


def apply_group_settings(
    optimizer: torch.optim.Optimizer,
    groups: list[dict],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Set each parameter group's hyperparameters from this run's config after a resume.

    A restored optimizer keeps the groups' settings from the checkpoint, and DeepSpeed's
    ZeRO-3 universal loader (a resume on another rank count or stage) gives every group those of
    group 0: the lr multiplier, and weight decay, which group 0 (the 1x, no-decay group)
    turns off for the matrices for the rest of the run. `groups` are `param_groups()` of the
    net (same order); the rates come from the restored LR scheduler.
    """
    lrs, base_lrs = scheduler.get_last_lr(), scheduler.base_lrs
    if len(optimizer.param_groups) != len(groups) or len(lrs) != len(groups):
        raise RuntimeError(
            f"the optimizer has {len(optimizer.param_groups)} parameter groups, the config "
            f"{len(groups)} and the LR scheduler {len(lrs)}"
        )
    settings = zip(optimizer.param_groups, groups, lrs, base_lrs, strict=True)
    for group, fresh, lr, base_lr in settings:
        group["lr"] = lr
        group["initial_lr"] = base_lr
        group["lr_mult"] = fresh["lr_mult"]
        group["weight_decay"] = fresh["weight_decay"]
        group["betas"] = optimizer.defaults["betas"]
        group["eps"] = optimizer.defaults["eps"]


@dataclass
class LRSchedule:
    """lr(step) / lr_init: linear warmup from `warmup_start`, lr_init until
    `decay_start_tokens` have been trained, then decay over tokens.

    warmup: factor = s + (1 - s) * step / warmup_steps (the Finch-era reference, s = 0.2).
    cosine: lr = lr_init * [(1 + f)/2 + (1 - f)/2 * cos(pi p)], f = lr_final / lr_init,
    exponential: lr = lr_init * f**p, linear: lr = lr_init * (1 - (1 - f) p), where p in
    [0, 1] is the fraction of `decay_tokens` trained since the decay began: at the end of
    warmup or at `decay_start_tokens`, whichever is later (tokens counted through the run's
    `phases`, see rwkv_train/progress.py).
    A function of the step alone: LambdaLR's saved step restores it exactly, so a resumed
    run continues the curve instead of warming up again.
    """

    lr_init: float
    lr_final: float
    warmup_steps: int
    warmup_start: float
    decay: str
    decay_tokens: int
    phases: tuple[Phase, ...]
    decay_start_tokens: int = 0

    def __call__(self, step: int) -> float:
        warm = 1.0
        if step < self.warmup_steps:
            warm = self.warmup_start + (1 - self.warmup_start) * step / self.warmup_steps
        progress = Progress(self.phases)
        start = max(progress.tokens(self.warmup_steps), self.decay_start_tokens)
        done = progress.tokens(step) - start
        p = min(1.0, max(0.0, done / max(1, self.decay_tokens)))
        f = self.lr_final / self.lr_init
        if self.decay == "cosine":
            d = (1 + f) / 2 + (1 - f) / 2 * math.cos(math.pi * p)
        elif self.decay == "exponential":
            d = f**p
        elif self.decay == "linear":
            d = 1 - (1 - f) * p
        else:
            d = 1.0
        return warm * d

    @classmethod
    def from_config(cls, cfg: OptimConfig, progress: Progress, max_steps: int) -> "LRSchedule":
        """The schedule of a run; decay ends at max_steps unless decay_tokens says otherwise."""
        decay_tokens = cfg.decay_tokens
        if decay_tokens is None:
            start = max(progress.tokens(cfg.warmup_steps), cfg.decay_start_tokens)
            decay_tokens = max(1, progress.tokens(max_steps) - start)
        return cls(
            cfg.lr_init,
            cfg.lr_final,
            cfg.warmup_steps,
            cfg.warmup_start,
            cfg.decay,
            decay_tokens,
            progress.phases,
            cfg.decay_start_tokens,
        )


class L2Wrap(torch.autograd.Function):
    """Returns the loss unchanged; its backward adds coef/(B*T) * max logit at the argmax of
    every token, i.e. the gradient of coef * mean_tokens(max_logit^2) / 2, which keeps logits
    from drifting upwards.

    Unlike the reference, the extra gradient is multiplied by the incoming gradient: Lightning
    divides each micro-batch loss by the accumulation count, so the penalty is a mean over the
    global batch like the loss itself (identical to the reference when nothing accumulates).
    """

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor, coef: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        ctx.coef = coef
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        scale = ctx.coef / (logits.shape[0] * logits.shape[1])  # (B, T, V) logits
        top, ids = logits.max(dim=-1, keepdim=True)
        extra = torch.zeros_like(logits).scatter_(-1, ids, top * scale)
        return grad_output, extra * grad_output, None
