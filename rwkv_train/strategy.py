"""Lightning's DeepSpeed strategy, made to run on CPUs as well, and the config it runs with.

Why this module exists: Lightning's `DeepSpeedStrategy` refuses any accelerator but CUDA
(`setup_environment`), checks that device indices equal local ranks (CPU devices have no
index), and passes `device_rank=root_device.index` (None on a CPU) to `deepspeed.initialize`.
DeepSpeed itself runs on CPUs (its CPU accelerator, gloo collectives), and that is how the
ZeRO stages, their checkpoints and resuming are tested without a GPU. On a GPU this class
defers to the stock strategy in every method it overrides but `backward`, which keeps DeepSpeed
from scaling the loss for gradient accumulation a second time.

`deepspeed_config()` turns the `deepspeed` config group (conf/deepspeed/*.yaml) into
DeepSpeed's JSON config; precision (bf16) and gradient accumulation are added by Lightning
from the Trainer's own arguments.
"""

import argparse
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from rwkv_train.config import TrainConfig


def deepspeed_config(tc: TrainConfig, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's config dict for a ZeRO stage 1-3 run of `tc`; `load_universal` when it
    resumes from a universal checkpoint (rwkv_train/reshard.py)."""
    ds = tc.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": int(ds.reduce_bucket_size),
        "allgather_bucket_size": int(ds.allgather_bucket_size),
    }
    if ds.stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(ds.allgather_bucket_size)
        zero["stage3_param_persistence_threshold"] = int(ds.param_persistence_threshold)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": ds.pin_memory}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": ds.pin_memory}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        # the optimizer is the module's own torch AdamW (parameter groups, LR multipliers)
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": tc.data.micro_batch_size,
        "gradient_clipping": float(tc.optim.grad_clip),
        "steps_per_print": 2**31 - 1,  # metrics.jsonl has the numbers; keep the log quiet
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


class RWKVDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` that also accepts the CPU accelerator (gloo), and whose gradients
    are the mean over the accumulated micro-batches, as under DDP."""

    strategy_name = "rwkv_deepspeed"

    def backward(
        self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        # Lightning's loop has divided the loss by the accumulation count already; DeepSpeed's
        # engine.backward would divide it again (by the gradient_accumulation_steps Lightning
        # puts in its config), halving the gradients, their norm and the clipping threshold
        # in effect at an accumulation of two.
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            super().setup_environment()
            return
        DDPStrategy.setup_environment(self)  # everything but the CUDA-only check

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            super().setup_distributed()
            return
        # CPU devices have no index, so the device-index == local-rank check cannot apply
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        lr_scheduler: Any = None,
    ) -> tuple[Any, Any]:
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer
