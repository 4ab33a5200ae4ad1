"""Every file in conf/ composes, every train config fits the schema, every model size builds
on the meta device, and bad configs fail at start-up naming the field."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from train_utils import compose_train, tiny_data, train_overrides

from rwkv_train.config import ConfigError, check_machine, to_schema, validate
from rwkv_train.model import RWKV, RWKVConfig
from rwkv_train.paths import conf_dir
from rwkv_train.train import sweep_subdir, train

CONF = conf_dir()
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "local")


def _defaults_groups(primary: str) -> set[str]:
    """The config groups a primary config's defaults list names."""
    raw = OmegaConf.load(CONF / f"{primary}.yaml")
    groups = set()
    for entry in raw.get("defaults", []):
        if isinstance(entry, str):
            groups.add(entry.split("/")[0].removeprefix("optional "))
        else:
            for key in entry:
                groups.add(str(key).removeprefix("optional ").removeprefix("override /"))
    return groups


def _compose(primary: str, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        # values marked `???` are required on the command line: give them one
        try:
            required = OmegaConf.missing_keys(compose(primary, overrides=overrides))
        except OmegaConfBaseException:  # interpolations into Hydra's own node
            required = set()
        overrides = overrides + [f"{key}=placeholder" for key in sorted(required)]
        cfg = compose(primary, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra")  # runtime fields of Hydra's node only exist inside a real run
    OmegaConf.to_container(job, resolve=True)
    return cfg


def _cases() -> list[tuple[str, list[str]]]:
    cases = [(p, []) for p in PRIMARY]
    for group in GROUPS:
        users = [p for p in PRIMARY if group in _defaults_groups(p)]
        for option in sorted((CONF / group).glob("*.yaml")):
            for p in users:
                cases.append((p, [f"{group}={option.stem}"]))
    return cases


@pytest.mark.parametrize(("primary", "overrides"), _cases(), ids=lambda v: str(v))
def test_config_composes(primary: str, overrides: list[str]) -> None:
    cfg = _compose(primary, overrides)
    if primary == "train":
        to_schema(cfg)  # unknown keys or wrong types in any group fail here


def test_every_group_file_is_used_or_parses() -> None:
    """Files in groups no primary config names must at least be valid YAML."""
    for group in GROUPS:
        if not any(group in _defaults_groups(p) for p in PRIMARY):
            for f in (CONF / group).glob("*.yaml"):
                OmegaConf.load(f)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_size_instantiates_on_meta(name: str) -> None:
    model_cfg = RWKVConfig.from_dict(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    with torch.device("meta"):
        net = RWKV(model_cfg)
    n = sum(p.numel() for p in net.parameters())
    assert n == model_cfg.num_params()
    assert model_cfg.flops_per_token() > 0


def test_run_dir_follows_the_model_name_not_the_clock() -> None:
    cfg = _compose("train", ["model=eagle_debug"])
    assert cfg.run_dir == "runs/eagle_debug"
    assert cfg.hydra.run.dir == "runs/eagle_debug"
    cfg = _compose("train", ["experiment=demo"])
    assert cfg.run_dir == "runs/demo"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("data.path=/nonexistent/folder", "data.path"),
        ("data.ctx_len=100000", "data.ctx_len"),
        ("data.global_batch_size=3", "data.global_batch_size"),
        ("model.vocab_size=64", "model.vocab_size"),
        ("model.n_embd=100", "model"),
        ("optim.decay=step", "optim.decay"),
        ("optim.decay_start_tokens=-1", "optim.decay_start_tokens"),
        ("+data.nonsense=1", "data.nonsense"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("model.init_from=/nonexistent.pth", "model.init_from"),
        ("deepspeed.stage=5", "deepspeed.stage"),
        ("+deepspeed.offload_params=true", "deepspeed.offload_params"),
        ("deepspeed=zero3 model.compile=true", "model.compile"),
        ("trainer.segment_len=-1", "trainer.segment_len"),
        ("trainer.precision=16-mixed", "trainer.precision"),
        ("trainer.val_every_n_steps=-1", "trainer.val_every_n_steps"),
        ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps"),
        ("data.val_samples=-1", "data.val_samples"),
        ("data.num_workers=-1", "data.num_workers"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ],
)
def test_bad_config_names_the_field(data: Path, tmp_path: Path, override: str, field: str) -> None:
    cfg = compose_train(train_overrides(data, tmp_path, *override.split()))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.field == field
    assert str(err.value).startswith(field)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine refuses")
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("trainer.accelerator=gpu", "trainer.accelerator"),
        ("model.wkv_backend=cuda", "model.wkv_backend"),
        ("trainer.accelerator=auto model.wkv_backend=cuda", "model.wkv_backend"),
    ],
)
def test_what_this_machine_cannot_run_is_named_before_training(
    data: Path, tmp_path: Path, override: str, field: str
) -> None:
    cfg = compose_train(train_overrides(data, tmp_path / "run", *override.split()))
    check_machine(validate(compose_train(train_overrides(data, tmp_path / "ok"))))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert err.value.field == field
    assert not (tmp_path / "run").exists()


def test_an_init_from_that_cannot_start_the_model_is_named_before_training(
    data: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 100)
    with torch.device("meta"):
        other = RWKV(
            validate(
                compose_train(
                    train_overrides(data, tmp_path, "model=eagle_debug", "model.vocab_size=128")
                )
            ).model
        )
    eagle = tmp_path / "eagle.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in other.state_dict().items()}, eagle)
    for pth, message in ((garbage, "cannot be read as a .pth"), (eagle, "does not fit the model")):
        run_dir = tmp_path / pth.stem
        with pytest.raises(ConfigError, match=message) as err:
            train(compose_train(train_overrides(data, run_dir, f"model.init_from={pth}")))
        assert err.value.field == "model.init_from"
        assert not run_dir.exists()


def test_sweep_folder_names_fit_a_file_system() -> None:
    assert sweep_subdir("+sweep=lr,optim.lr_init=0.0002") == "+sweep=lr,optim.lr_init=0.0002"
    long = [
        ",".join(f"data.key_{i}=é{i}" for i in range(40)) + f",optim.lr_init={lr}" for lr in (1, 2)
    ]
    names = [sweep_subdir(x) for x in long]
    assert names[0] != names[1] and all(len(n.encode()) <= 240 for n in names)
    assert names[0].startswith(long[0][:100]) and names[0] == sweep_subdir(long[0])


def test_unknown_model_fails_at_compose() -> None:
    with pytest.raises(Exception, match="model"):
        _compose("train", ["model=finch_999b"])


def test_good_config_validates(data: Path, tmp_path: Path) -> None:
    plan = validate(compose_train(train_overrides(data, tmp_path, "data.global_batch_size=8")))
    assert plan.accumulate == 4
    assert plan.model.vocab_size == 128
    assert plan.model.ctx_len == 16


def test_world_v2_data_config_asks_for_its_path() -> None:
    """conf/data/world_v2.yaml reads one build as it is (the paper's mixture): no weights,
    and nothing runs until data.path names the build."""
    cfg = compose_train(["data=world_v2"])
    assert cfg.data.path is None and cfg.data.ctx_len == cfg.model.ctx_len
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.field == "data.path"


def test_a_head_size_the_cuda_kernels_lack_is_named_for_a_gpu_run(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto and cuda would fail at the first forward pass on the GPU; torch trains it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = ("trainer.accelerator=gpu", "model.n_embd=192", "model.wkv_backend=auto")
    plan = validate(compose_train(train_overrides(data, tmp_path, *gpu, "model.head_size=48")))
    with pytest.raises(ConfigError, match=r"^model.head_size: 48: the CUDA WKV kernels take"):
        check_machine(plan)
    torch_form = train_overrides(
        data, tmp_path, *gpu, "model.head_size=48", "model.wkv_backend=torch"
    )
    check_machine(validate(compose_train(torch_form)))
    check_machine(
        validate(compose_train(train_overrides(data, tmp_path, *gpu, "model.head_size=64")))
    )


def test_several_nodes_need_a_launcher(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`experiment=finch_3b trainer=cpu` keeps the experiment's num_nodes=4: started alone,
    the run waited for three other nodes until the rendezvous timed out."""
    for var in ("NODE_RANK", "GROUP_RANK", "RANK", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    nodes = ("trainer.num_nodes=4", "data.global_batch_size=8")
    plan = validate(compose_train(train_overrides(data, tmp_path, *nodes)))
    with pytest.raises(ConfigError, match=r"^trainer.num_nodes: 4, but this process was"):
        check_machine(plan)
    monkeypatch.setenv("NODE_RANK", "0")  # each node's process started by hand
    check_machine(plan)
