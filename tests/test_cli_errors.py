"""`python -m rwkv_train.generate` and `python -m rwkv_train.export`: ordinary mistakes (a
missing or damaged model, a bad setting, an output that cannot be written) are one line
naming the path or setting, with exit status 2, never a traceback; top_p=0 samples."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from train_utils import compose_train, tiny_data, train_overrides

from rwkv_train import export, generate
from rwkv_train.train import train

Capsys = pytest.CaptureFixture[str]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-step run, its .pth, and the damaged or wrong inputs a user may pass instead."""
    root = tmp_path_factory.mktemp("cli_errors")
    data = tiny_data(root / "data")
    train(compose_train(train_overrides(data, root / "run", "trainer.max_steps=1")))
    ckpt = next((root / "run" / "checkpoints").glob("step*.ckpt"))
    pth = export.export(root / "run", root / "model.pth")
    (root / "empty").mkdir()
    (root / "truncated.ckpt").write_bytes(ckpt.read_bytes()[:1000])
    (root / "truncated.pth").write_bytes(pth.read_bytes()[:1000])
    torch.save({"foo": torch.zeros(2)}, root / "other.pth")
    weights = torch.load(pth, weights_only=True)
    torch.save({**weights, "head.bias": torch.zeros(1)}, root / "extra.pth")  # not RWKV's
    torch.save({"epoch": 1}, root / "step00000001.ckpt")  # a torch file, not a checkpoint
    (root / "plain").write_text("a file, not a folder\n")
    return {"root": root, "run": root / "run", "pth": pth}


def usage_error(main: Callable[[list[str]], object], argv: list[str], capsys: Capsys) -> str:
    """The error line of a command that must stop with a usage error (status 2)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    usage, line = err.strip().splitlines()  # argparse's usage line, then the one error line
    assert usage.startswith("usage:") and "error: " in line
    return line


def test_top_p_zero_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([0.5, 2.0, 1.0, -1.0])
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        assert generate.sample(logits, 1.0, 0.0, gen) == 1
        assert generate.sample(logits, 1.0, -0.5, gen) == 1
    # a small top_p keeps the smallest set reaching it: here the top two tokens
    picks = {generate.sample(logits, 1.0, 0.8, torch.Generator().manual_seed(s)) for s in range(40)}
    assert picks == {1, 2}


def test_sample_refuses_a_negative_temperature() -> None:
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate.sample(torch.zeros(4), -1.0, 0.85, torch.Generator())


# the prompt "x" is a token of the tiny test vocabulary
def test_generate_with_top_p_zero_is_greedy(models: dict[str, Path], capsys: Capsys) -> None:
    outputs = []
    for setting in ("top_p=0", "temperature=0"):
        generate.main([str(models["pth"]), "prompt=x", "max_tokens=5", setting, "seed=3"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("x")


@pytest.mark.parametrize(
    "setting",
    ["max_tokens=abc", "max_tokens=-1", "temperature=-1", "temperature=nan", "top_p=1.5",
     "top_p=x", "seed=1.5"],
)  # fmt: skip
def test_generate_refuses_bad_settings(
    models: dict[str, Path], setting: str, capsys: Capsys
) -> None:
    line = usage_error(generate.main, [str(models["pth"]), "prompt=x", setting], capsys)
    key, value = setting.split("=")
    assert f"{key} must be" in line and repr(value) in line


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("nowhere.pth", "no model at"),
        ("empty", "no valid checkpoint in"),
        ("truncated.ckpt", "cannot be opened"),
        ("truncated.pth", "cannot be opened"),
        ("other.pth", "does not hold RWKV weights"),
        ("extra.pth", "does not hold RWKV weights"),
        ("step00000001.ckpt", "is not a training checkpoint"),
    ],
)
def test_generate_names_a_model_it_cannot_load(
    models: dict[str, Path], name: str, problem: str, capsys: Capsys
) -> None:
    line = usage_error(generate.main, [str(models["root"] / name), "prompt=x"], capsys)
    assert problem in line and str(models["root"] / name) in line


@pytest.mark.parametrize(
    ("src", "out", "problem", "named"),
    [
        ("nowhere", "out.pth", "no checkpoint or run folder at", "nowhere"),
        ("empty", "out.pth", "no valid checkpoint in", "empty"),
        ("truncated.ckpt", "out.pth", "cannot be opened", "truncated.ckpt"),
        ("step00000001.ckpt", "out.pth", "is not a training checkpoint", "step00000001.ckpt"),
        ("run", "plain/out.pth", "plain is a file, not a folder", "plain/out.pth"),
        ("run", "plain/deeper/out.pth", "plain is a file, not a folder", "plain/deeper/out.pth"),
        ("run", "empty", "is a folder: name the .pth file", "empty"),
        ("run", "model.pt", "name the output NAME.pth", "model.pt"),  # unreadable later
    ],
)
def test_export_names_the_path_and_the_problem(
    models: dict[str, Path], src: str, out: str, problem: str, named: str, capsys: Capsys
) -> None:
    root = models["root"]
    line = usage_error(export.main, [str(root / src), str(root / out)], capsys)
    assert problem in line and str(root / named) in line
    assert not (root / "out.pth").exists() and not list(root.glob("*.tmp"))


def test_export_of_a_damaged_pth_writes_nothing(models: dict[str, Path], capsys: Capsys) -> None:
    root = models["root"]
    line = usage_error(export.main, [str(root / "truncated.pth"), str(root / "re.pth")], capsys)
    assert "truncated.pth cannot be opened" in line and not (root / "re.pth").exists()


class FixedLogits(torch.nn.Module):
    """A model stand-in whose every next-token distribution peaks at `peak`."""

    def __init__(self, peak: int, vocab: int = 65536) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.logits[peak] = 30.0
            self.logits[200] = 20.0  # the best of the rest

    def forward_with_state(self, ids: torch.Tensor, state: object) -> tuple:
        return self.logits.expand(1, ids.shape[1], -1), state


def test_only_ids_the_tokenizer_has_are_sampled() -> None:
    """65530-65535 are model outputs without a World token: decoding one crashed generate
    and the training-time samples of an early model."""
    net = FixedLogits(65533)
    assert list(generate.generate_ids(net, [5], max_tokens=3, temperature=0)) == [65533] * 3
    for t in (0.0, 1.0):
        ids = list(generate.generate_ids(net, [5], max_tokens=50, temperature=t, vocab=65530))
        assert ids == [200] * 50
    text = "".join(generate.generate_text(net, "x", max_tokens=5, temperature=1.0))
    assert isinstance(text, str)


def test_generate_refuses_a_model_of_another_vocabulary(
    models: dict[str, Path], capsys: Capsys
) -> None:
    """A prompt id past the model's last crashed with an IndexError; a Pile-vocabulary
    RWKV-4 model printed its ids decoded as World tokens."""
    line = usage_error(generate.main, [str(models["pth"]), "prompt=语言模型"], capsys)
    assert "the prompt has World token id" in line and "only 128 ids" in line
    from rwkv_train.model import RWKV, RWKVConfig

    pile = models["root"] / "pile4.pth"
    cfg = RWKVConfig(version=4, n_layer=1, n_embd=64, vocab_size=generate.PILE_VOCAB)
    torch.save(RWKV(cfg).state_dict(), pile)
    line = usage_error(generate.main, [str(pile), "prompt=x"], capsys)
    assert "GPT-NeoX (Pile) vocabulary" in line
