"""conf/experiment/: every paper model's full run composes and fits, as the planner computes it.

Each file's ZeRO stage, gradient checkpointing, micro-batch and nodes x GPUs were chosen with
`python -m rwkv_train.plan`; these tests keep them in agreement with it when either changes:
the planner must accept the file's settings on an 80 GB GPU, and the pre-emption lead the file
tells sbatch must be the planner's.
"""

import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from rwkv_train import plan
from rwkv_train.model.config import RWKVConfig
from rwkv_train.paths import conf_dir
from rwkv_train.train import compose_config

GPU_MEM_GB = 80
PAPER_MODELS = sorted(
    p.stem for p in (conf_dir() / "model").glob("*.yaml") if not p.stem.endswith("_debug")
)


def plan_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("plan", overrides=overrides)


def test_every_paper_model_has_an_experiment() -> None:
    files = {p.stem for p in (conf_dir() / "experiment").glob("*.yaml")} - {"demo"}
    assert files == set(PAPER_MODELS)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_experiment_composes_and_fits(name: str, capsys: pytest.CaptureFixture) -> None:
    cfg = compose_config([f"experiment={name}"])
    assert cfg.hydra.runtime.choices.model == name
    assert cfg.model.ctx_len == cfg.data.ctx_len == 4096
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    ranks = cfg.trainer.num_nodes * cfg.trainer.devices
    assert cfg.data.global_batch_size % (cfg.data.micro_batch_size * ranks) == 0
    assert 0 < cfg.optim.lr_final < cfg.optim.lr_init <= 6e-4

    settings = [
        f"model={name}",
        f"gpus={ranks}",
        f"gpu_mem_gb={GPU_MEM_GB}",
        f"ctx_len={cfg.data.ctx_len}",
        f"zero_stage={cfg.deepspeed.stage}",
        f"grad_checkpoint={cfg.model.grad_checkpoint}",
        f"micro_batch_size={cfg.data.micro_batch_size}",
    ]
    pc = plan_config(settings)
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    mcfg.pop("init_from", None)
    model = RWKVConfig.from_dict(mcfg)
    est = plan.estimate(
        model,
        ranks,
        cfg.deepspeed.stage,
        cfg.model.grad_checkpoint,
        cfg.data.micro_batch_size,
        cfg.data.ctx_len,
        pc.headroom_gb,
    )
    assert est.total <= GPU_MEM_GB * plan.GB, f"{name}: {est.total / plan.GB:.1f} GB per GPU"
    assert plan.main(settings) == 0, capsys.readouterr().out  # the planner accepts them too

    text = (conf_dir() / "experiment" / f"{name}.yaml").read_text()
    lead = int(re.search(r"--signal=B:USR1@(\d+)", text).group(1))
    assert lead == plan.checkpoint_lead_seconds(model, pc)
    assert f"--nodes={cfg.trainer.num_nodes} " in text


SWEEPS = sorted(p.stem for p in (conf_dir() / "sweep").glob("*.yaml"))


def sweep_jobs(sweep: str) -> list[list[str]]:
    """The overrides of every job of `-m +sweep=NAME`: the cartesian product of its params."""
    params = compose_config([f"+sweep={sweep}"]).hydra.sweeper.params
    jobs: list[list[str]] = [[]]
    for key, values in params.items():
        jobs = [[*job, f"{key}={v.strip()}"] for job in jobs for v in str(values).split(",")]
    return jobs


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_jobs_compose_and_fit(sweep: str) -> None:
    jobs = sweep_jobs(sweep)
    assert len(jobs) >= 3
    for job in jobs:
        cfg = compose_config([f"+sweep={sweep}", *job])
        launcher = cfg.hydra.launcher
        assert "SlurmLauncher" in launcher._target_  # what the sweep submits with by default
        ranks = cfg.trainer.num_nodes * cfg.trainer.devices
        assert (launcher.nodes, launcher.tasks_per_node) == (
            cfg.trainer.num_nodes,
            cfg.trainer.devices,
        )
        assert launcher.gpus_per_node == launcher.tasks_per_node  # one task per GPU
        assert cfg.data.global_batch_size % (cfg.data.micro_batch_size * ranks) == 0
        mcfg = OmegaConf.to_container(cfg.model, resolve=True)
        mcfg.pop("init_from", None)
        est = plan.estimate(
            RWKVConfig.from_dict(mcfg),
            ranks,
            cfg.deepspeed.stage,
            cfg.model.grad_checkpoint,
            cfg.data.micro_batch_size,
            cfg.data.ctx_len,
            plan_config([]).headroom_gb,
        )
        assert est.total <= GPU_MEM_GB * plan.GB, f"{job}: {est.total / plan.GB:.1f} GB"


def test_scaling_sweep_spans_0_46b_to_14b() -> None:
    sizes = []
    for job in sweep_jobs("scaling"):
        mcfg = OmegaConf.to_container(compose_config(["+sweep=scaling", *job]).model)
        mcfg.pop("init_from", None)
        sizes.append(RWKVConfig.from_dict(mcfg).num_params() / 1e9)
    assert round(min(sizes), 2) == 0.46 and round(max(sizes)) == 14
