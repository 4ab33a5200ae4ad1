"""`python -m rwkv_train.evaluate`: saved models scored offline on the val shards give the
validation figures the run logged at their steps."""

from pathlib import Path

import pytest
import torch
from train_utils import (
    TINY_VOCAB,
    compose_train,
    markov_documents,
    train_overrides,
    write_data_folder,
)

from rwkv_train.data import load_manifest
from rwkv_train.data.loader import val_sources
from rwkv_train.evaluate import evaluate, main
from rwkv_train.export import export
from rwkv_train.generate import load_model
from rwkv_train.metrics import read_metrics
from rwkv_train.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    docs = markov_documents(20, 60, TINY_VOCAB, seed=0)
    val = {
        "a": markov_documents(4, 60, TINY_VOCAB, seed=1),
        "b": markov_documents(4, 60, TINY_VOCAB, seed=2, chain=1),
    }
    data = write_data_folder(root / "data", [docs], val)
    overrides = train_overrides(
        data, root / "run", "trainer.max_steps=4", "checkpoint.every_n_steps=2",
        "trainer.val_every_n_steps=2", "data.val_samples=5", "data.ctx_len=80",
    )  # fmt: skip
    train(compose_train(overrides))
    return {"root": root, "data": data, "run": root / "run"}


def logged(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r}


def test_checkpoints_score_what_the_run_logged(run: dict[str, Path]) -> None:
    want = logged(run["run"])
    assert sorted(want) == [2, 4]
    names, streams = val_sources([load_manifest(run["data"])], 80)
    for step in (2, 4):
        net = load_model(run["run"] / "checkpoints" / f"step{step:08d}.ckpt", wkv_backend="torch")
        got = evaluate(net, names, streams, ctx_len=80, samples=5, batch_size=3)
        keys = {k for k in want[step] if k.startswith("val/")}
        assert set(got) == keys and "val/loss_by_pos/64-79" in keys
        for k in keys:
            assert got[k] == pytest.approx(want[step][k], rel=1e-5), k
    # in segments: the same figures
    got = evaluate(net, names, streams, ctx_len=80, samples=5, segment_len=32)
    assert got["val/loss_by_pos/00-63"] == pytest.approx(want[4]["val/loss_by_pos/00-63"], 1e-5)


def test_command_scores_checkpoints_and_a_pth(
    run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpts = [run["run"] / "checkpoints" / f"step{s:08d}.ckpt" for s in (2, 4)]
    pth = export(run["run"], run["root"] / "final.pth")
    out = run["root"] / "eval.jsonl"
    common = ["--data", str(run["data"]), "--ctx-len", "80", "--samples", "5", "--json", str(out)]
    assert main([*map(str, ckpts), str(pth), str(run["run"]), *common]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 4, None, 4]  # the run folder: its newest, step 4
    want = logged(run["run"])
    for row, step in zip(rows, (2, 4, 4, 4), strict=True):
        assert row["val/loss"] == pytest.approx(want[step]["val/loss"], rel=1e-4)
    printed = capsys.readouterr().out
    assert "final.pth: loss" in printed and "; a " in printed and "by position 00-63" in printed
    with pytest.raises(SystemExit):
        main([str(run["root"] / "nowhere"), *common])
    (run["root"] / "empty_run").mkdir()
    for bad in (["empty_run", *common], ["final.pth", "--data", str(run["root"])]):
        with pytest.raises(SystemExit):  # no checkpoint; no manifest: a message, no traceback
            main([str(run["root"] / bad[0]), *bad[1:]])
    printed = capsys.readouterr().err
    assert "no valid checkpoint in" in printed and "no manifest.json at" in printed
    torn = run["root"] / "torn.ckpt"
    torn.write_bytes(ckpts[0].read_bytes()[:1000])
    with pytest.raises(SystemExit):
        main([str(torn), *common])
    assert f"{torn} cannot be opened" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no val chunk of 1000 tokens
        main([str(pth), "--data", str(run["data"]), "--ctx-len", "1000"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a folder given for the passages file
        main([str(pth), "--lambada", str(run["root"])])
    assert "Is a directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main([str(pth), *common, "--device", "cuda"])
        assert "torch sees no CUDA device here" in capsys.readouterr().err
