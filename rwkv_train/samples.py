"""Text samples logged to W&B while training: the quickest check that a run learns language.

Every `logger.log_samples_every_n_steps` optimizer steps, rank 0 continues a few prompts in
RNN mode and logs (step, prompt, text) rows to the W&B table `samples`. Sampling uses its
own seeded generator and runs under no_grad in eval mode, so it changes neither the training
RNG nor the weights: a resumed run stays bitwise identical with or without samples.

Under ZeRO-3 every forward call gathers its weights from all ranks, so rank 0 cannot sample
alone (the others would be in the next training step's collectives: a crash or a hang).
There every rank samples, continuing with rank 0's token, and only rank 0 logs.
"""

from collections.abc import Callable
from functools import partial

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from rwkv_train.generate import generate_text

PROMPTS = ("\n", "The ", "def ")


class SampleLogger(L.Callback):
    """Logs short RNN-mode continuations of PROMPTS every `every_n_steps` optimizer steps."""

    def __init__(self, every_n_steps: int, max_tokens: int = 64) -> None:
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self._last_step = -1
        self._tokenizer = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step  # the callback runs once per micro-batch
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        partitioned = any(hasattr(p, "ds_id") for p in pl_module.net.parameters())  # ZeRO-3
        if not (partitioned or trainer.is_global_zero):
            return
        agree = partial(trainer.strategy.broadcast, src=0) if partitioned else None
        rows = [[step, p, self.sample(pl_module.net, p, agree)] for p in PROMPTS]
        if trainer.is_global_zero:
            for lg in loggers:
                lg.log_text(key="samples", columns=["step", "prompt", "text"], data=rows, step=step)

    def sample(
        self, net: torch.nn.Module, prompt: str, agree: Callable[[int], int] | None = None
    ) -> str:
        """One continuation of `prompt`, sampled with a fixed seed (see generate_ids)."""
        if self._tokenizer is None:
            from data_prep.tokenizer import WorldTokenizer

            self._tokenizer = WorldTokenizer()
        if max(self._tokenizer.encode(prompt), default=0) >= net.cfg.vocab_size:
            prompt = ""  # a model with a cut-down vocabulary (tests) starts from token 0
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                pieces = generate_text(
                    net, prompt, self._tokenizer, max_tokens=self.max_tokens, seed=0, agree=agree
                )
                return "".join(pieces)
        finally:
            net.train(was_training)
