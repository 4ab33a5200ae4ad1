"""Train an RWKV model: `python -m rwkv_train.train model=finch_debug data.path=DIR [k=v ...]`.

Compose the config (Hydra, conf/train.yaml), validate it against the data, build the
LightningModule, the DataModule and the Trainer, resume from the run's newest valid
checkpoint, and fit.
"""

import hashlib
import logging
import os
import secrets
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from rwkv_train.checkpoint import (
    CheckpointManager,
    CheckpointSpaceError,
    checkpoint_step,
    find_latest,
    is_valid,
    list_checkpoints,
    resume_form,
    set_aside_after,
    unopenable,
)
from rwkv_train.compatible import check_init_from, check_resume
from rwkv_train.config import ConfigError, Plan, TrainConfig, check_machine, validate
from rwkv_train.data.loader import TokenDataModule
from rwkv_train.lit_module import NonFiniteLossError, RWKVLitModule
from rwkv_train.metrics import JsonlLogger
from rwkv_train.paths import conf_dir
from rwkv_train.preempt import PreemptionCallback, Terminated, slurm_plugins
from rwkv_train.progress_lines import ProgressLines
from rwkv_train.reshard import ensure_loadable
from rwkv_train.samples import SampleLogger

log = logging.getLogger(__name__)


def make_loggers(plan: Plan, run_dir: Path) -> list:
    """metrics.jsonl always; W&B when logger.name=wandb, with an id kept in run_dir."""
    loggers: list = [JsonlLogger(run_dir / "metrics.jsonl")]
    lc = plan.cfg.logger
    if lc.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        id_file = run_dir / "wandb_id.txt"
        if rank_zero_only.rank == 0 and not id_file.exists():  # other ranks never log to W&B
            id_file.write_text(secrets.token_hex(6))  # [0-9a-f]: valid as a W&B run id
        run_id = id_file.read_text().strip() if id_file.exists() else None
        kwargs = {"mode": lc.mode} if lc.mode else {}
        loggers.append(
            WandbLogger(
                project=lc.project,
                entity=lc.entity,
                name=plan.cfg.name,
                id=run_id,
                resume="allow",
                save_dir=str(run_dir),
                tags=list(lc.tags),
                group=lc.group,
                config=run_config(plan),
                **kwargs,
            )
        )
    return loggers


def run_config(plan: Plan) -> dict:
    """What W&B shows and filters runs by: the resolved config, and the figures derived from
    it (ranks, accumulation, parameters, tokens per step). A resume with other settings
    updates it."""
    out = OmegaConf.to_container(OmegaConf.structured(plan.cfg), resolve=True)
    assert isinstance(out, dict)
    d = plan.cfg.data
    out["derived"] = {
        "world_size": plan.world_size,
        "accumulate": plan.accumulate,
        "parameters": plan.model.num_params(),
        "tokens_per_step": d.global_batch_size * d.ctx_len,
    }
    return out


def close_loggers(loggers: list) -> None:
    """Finish the W&B run so its summary is written and a later run in this process starts
    cleanly (Lightning leaves it open)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            import wandb

            logger.experiment.finish()
            wandb.teardown()  # stops W&B's service process, which flushes the run's files


class ValidateAtTheEnd(L.Callback):
    """Lightning validates every `val_check_interval` batches, so a run whose max_steps is not
    a multiple of trainer.val_every_n_steps would end unvalidated. A fit stopped at its last
    step is validated there by Lightning (once, when that step was due anyway)."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


def callbacks(tc: TrainConfig, run_dir: Path) -> list[L.Callback]:
    """Checkpoints and their save on SIGUSR1 or SIGTERM (see rwkv_train/preempt.py) and a
    validation at the last step, always; progress as log lines when the output is not a
    terminal (Lightning's bar, which writes to stdout, is kept for one); W&B text samples when
    the wandb logger asks for them."""
    manager = CheckpointManager(run_dir / "checkpoints", **vars(tc.checkpoint))
    out: list[L.Callback] = [manager, PreemptionCallback(manager), ValidateAtTheEnd()]
    if tc.trainer.progress_bar and not sys.stdout.isatty():
        out.append(ProgressLines())
    if tc.logger.name == "wandb" and tc.logger.log_samples_every_n_steps > 0:
        out.append(SampleLogger(tc.logger.log_samples_every_n_steps))
    return out


def make_strategy(tc: TrainConfig, load_universal: bool = False) -> Strategy | str:
    """DeepSpeed when a ZeRO stage is chosen, else `trainer.strategy` ("auto" becomes plain
    DDP when there is more than one process)."""
    t = tc.trainer
    if tc.deepspeed.stage > 0:
        from rwkv_train.strategy import RWKVDeepSpeedStrategy, deepspeed_config

        return RWKVDeepSpeedStrategy(config=deepspeed_config(tc, load_universal))
    if t.strategy == "auto" and t.devices * t.num_nodes > 1:
        return "ddp"
    return t.strategy


def resume_from(plan: Plan, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, as `resume` asks. A path outside this run's folder
    only starts the run: once the run has saved checkpoints of its own, a requeued job with
    the same command continues from those, not again from the other run. A checkpoint of
    this run rolls it back once: the later checkpoints are set aside (set_aside_after), and
    the same command run again continues the new branch."""
    resume = str(plan.cfg.resume)
    own = find_latest(run_dir / "checkpoints")
    if resume == "none":
        if own is not None:
            raise ConfigError(
                "resume",
                f"resume=none, but {run_dir} holds checkpoints (up to {own.name}) that a new "
                "run would mix with its own: choose another run_dir (or name), or remove them",
            )
        return None
    if resume == "auto":
        return own
    path = Path(resume)
    inside = path.resolve().is_relative_to(run_dir.resolve())
    if own is not None and not inside:
        log.info("%s has checkpoints of its own: continuing from them, not %s", run_dir, path)
        return own
    if inside and path.parent.resolve() == (run_dir / "checkpoints").resolve():
        return _roll_back(run_dir, path)
    if not path.exists():
        raise ConfigError("resume", f"no checkpoint at {path}")
    if (path / "checkpoints").is_dir():  # another run's folder: its newest valid checkpoint
        latest = find_latest(path / "checkpoints")
        if latest is None:
            raise ConfigError("resume", f"no valid checkpoint in {path / 'checkpoints'}")
        return latest
    try:
        checkpoint_step(path)
    except ValueError:
        raise ConfigError(
            "resume", f"{path} is neither a run folder nor a checkpoint (stepNNNNNNNN.ckpt)"
        ) from None
    ok, reason = is_valid(path)
    if not ok and path.with_suffix(".json").exists():
        raise ConfigError("resume", f"{path}: {reason}")
    if not ok:  # e.g. a checkpoint copied without its record: nothing to check it against
        if reason := unopenable(path):
            raise ConfigError("resume", f"{path}: {reason}")
        log.warning("%s has no completion record beside it: loading it unchecked", path)
    return path


def _roll_back(run_dir: Path, path: Path) -> Path | None:
    """resume=<a checkpoint of this run>: from it, with the later checkpoints set aside (by
    rank 0; the other ranks find the same checkpoint before, or after, it is done)."""
    try:
        step = checkpoint_step(path)
    except ValueError:
        raise ConfigError("resume", f"{path} is not a checkpoint (stepNNNNNNNN.ckpt)") from None
    aside = run_dir / "abandoned" / f"after_step{step:08d}"
    if aside.is_dir():  # rolled back before: a requeue of the same command goes on
        own = find_latest(run_dir / "checkpoints")
        log.info("%s was rolled back to step %d before: continuing from %s", run_dir, step, own)
        return own
    if not path.exists():
        raise ConfigError("resume", f"no checkpoint at {path}")
    ok, reason = is_valid(path)
    if not ok:
        raise ConfigError("resume", f"{path}: {reason}")
    later = [s for s, _ in list_checkpoints(run_dir / "checkpoints") if s > step]
    if rank_zero_only.rank == 0:
        set_aside_after(run_dir, step)
        log.warning(
            "rolling %s back to step %d: checkpoints %s and the metrics after step %d moved "
            "to %s (delete that folder to roll back to step %d again)",
            run_dir, step, later or "(none)", step, aside, step,
        )  # fmt: skip
    return path


def sweep_subdir(override_dirname: str, limit: int = 240) -> str:
    """A sweep job's folder name (hydra.sweep.subdir): its overrides, or where they are too
    long for a file name (255 bytes), their start and a hash of them all."""
    if len(override_dirname.encode()) <= limit:
        return override_dirname
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:12]
    return f"{override_dirname.encode()[: limit - 13].decode(errors='ignore')}_{digest}"


OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir, replace=True)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `python -m rwkv_train.train OVERRIDES...` would run, for use from Python
    (the demo, tests); Hydra's settings are registered so `${hydra:...}` values resolve."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def record_config(run_dir: Path, tc: TrainConfig, start_step: int) -> None:
    """Write the run's config.yaml. A start with other settings than the last (a larger batch,
    an anneal, a longer context) first moves the old one to
    config_history/until_stepN.yaml, N the step this start continues from, so the settings
    of every stretch of the run stay on record."""
    text = OmegaConf.to_yaml(OmegaConf.structured(tc))
    current = run_dir / "config.yaml"
    if current.exists() and current.read_text() != text:
        kept = run_dir / "config_history" / f"until_step{start_step:08d}.yaml"
        kept.parent.mkdir(exist_ok=True)
        if not kept.exists():  # else a start since then saved no step: the first one counts
            current.replace(kept)
    current.write_text(text)


def launch_rank(devices: int) -> int:
    """This process's global rank as its launcher set it, before the Trainer exists: torchrun's
    RANK, srun's SLURM_PROCID, or NODE_RANK x devices + LOCAL_RANK (Lightning's own launcher).
    Lightning's first guess leaves NODE_RANK out, so the first process of every node would
    act as rank 0 while the run folder is prepared (the W&B id, metrics.jsonl)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if SLURMEnvironment.detect():
        return int(env["SLURM_PROCID"])
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    return node * devices + int(env.get("LOCAL_RANK", 0))


def train(cfg: DictConfig) -> RWKVLitModule:
    """Validate `cfg`, then train; returns the module (its `net` holds the final weights)."""
    plan = validate(cfg)
    check_machine(plan)
    if plan.init_from is not None:
        check_init_from(plan.init_from, plan.model)
    tc = plan.cfg
    rank_zero_only.rank = launch_rank(tc.trainer.devices)  # the Trainer sets the same later
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tc.trainer.num_threads > 0:
        torch.set_num_threads(tc.trainer.num_threads)
    L.seed_everything(tc.seed, workers=True, verbose=False)

    module = RWKVLitModule(tc, plan.model, plan.accumulate, plan.init_from)
    data = TokenDataModule(
        [s.manifest for s in plan.sources],
        [s.weight for s in plan.sources],
        tc.data.ctx_len,
        tc.data.micro_batch_size,
        plan.accumulate,
        tc.seed,
        lambda step: module.progress.samples(step),
        tc.data.num_workers,
        tc.data.val_samples,
        run_dir / "sample_ids" if tc.data.record_sample_ids else None,
        plan.val,
        plan.lambada,
    )
    if rank_zero_only.rank == 0:
        for line in data.mixture(tc.trainer.max_steps * tc.data.global_batch_size):
            log.info("data: %s", line)
    ckpt = resume_from(plan, run_dir)
    if ckpt is not None and checkpoint_step(ckpt) > tc.trainer.max_steps:
        raise ConfigError(
            "trainer.max_steps",
            f"{tc.trainer.max_steps} is below step {checkpoint_step(ckpt)} of {ckpt}, the "
            "checkpoint resumed: nothing to train (raise it to go on, or resume= an earlier "
            "checkpoint of the run to roll back)",
        )
    if ckpt is not None:
        check_resume(ckpt, plan.model, tc.optim)
    if rank_zero_only.rank == 0:
        record_config(run_dir, tc, 0 if ckpt is None else checkpoint_step(ckpt))
    load_path = ckpt
    form = None if ckpt is None else resume_form(ckpt, plan.world_size, tc.deepspeed.stage)
    if form is not None:
        load_path = ensure_loadable(ckpt, form, tc.optim, tc.deepspeed.stage)
        log.info("%s was written by another rank count or strategy: loading %s", ckpt, load_path)
    loggers = make_loggers(plan, run_dir)
    if ckpt is not None:
        log.info("resuming from %s (step %d)", ckpt, checkpoint_step(ckpt))
        loggers[0].truncate_after(checkpoint_step(ckpt))
    else:
        loggers[0].truncate_after(0)
    t = tc.trainer
    val_every = t.val_every_n_steps or t.max_steps
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(tc, load_universal=form == "universal"),
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=plan.accumulate,
        gradient_clip_val=tc.optim.grad_clip or None,
        deterministic=t.deterministic,
        logger=loggers,
        callbacks=callbacks(tc, run_dir),
        enable_checkpointing=False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=val_every * plan.accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if data.val_streams or data.lambada else 0,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        plugins=slurm_plugins(),
    )
    preempt = next(c for c in trainer.callbacks if isinstance(c, PreemptionCallback))
    try:
        trainer.fit(module, datamodule=data, ckpt_path=load_path, weights_only=False)
    except SIGTERMException:  # Lightning's handler caught SIGTERM before ours took over
        stop = preempt.stop() or Terminated(None)
        log.warning("%s", stop)
        raise stop from None
    finally:
        close_loggers(loggers)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # else gloo may abort at interpreter exit
    if module.stop_reason:
        raise NonFiniteLossError(module.stop_reason)
    stop = preempt.stop()
    if stop is not None:
        log.warning("%s", stop)
        raise stop
    return module


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and not any(o.startswith("run_dir=") for o in hc.overrides.task):
        with open_dict(cfg):  # each sweep job trains in its own deterministic folder
            cfg.run_dir = hc.runtime.output_dir
    try:
        train(cfg)
    except ConfigError as e:  # the message names the field: a traceback would bury it
        log.error("%s", e)
        sys.exit(2)
    except (NonFiniteLossError, CheckpointSpaceError) as e:  # every rank stops with the message
        log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
