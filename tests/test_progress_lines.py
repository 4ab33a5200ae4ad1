"""Training progress as log lines when the output is a file (rwkv_train/progress_lines.py)."""

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_utils import compose_train, tiny_data, train_overrides

from rwkv_train.progress_lines import ProgressLines
from rwkv_train.train import train


def test_lines_at_the_first_step_every_interval_and_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    bar = ProgressLines(interval=60, clock=lambda: now[0])
    trainer = SimpleNamespace(global_step=200, max_steps=1200, progress_bar_metrics={})
    bar.on_train_start(trainer, None)  # resumed at step 200
    with caplog.at_level(logging.INFO, logger="rwkv_train.progress_lines"):
        for step in range(201, 1201):  # two micro-batches a step: the step moves at the second
            for trainer.global_step in (step - 1, step):
                trainer.progress_bar_metrics = {"loss": 3.0 + 1 / step, "tok/s": 812345.0}
                now[0] += 0.25
                bar.on_train_batch_end(trainer)
                bar.on_train_batch_start(trainer)  # the step's metrics are in by then
    lines = caplog.messages
    assert lines[0] == (
        "step 201/1200 (16.8 %), loss 3.0050, 812,345 tok/s, 0m00s elapsed, about 8m19s left"
    )
    assert [int(re.match(r"step (\d+)/", ln).group(1)) for ln in lines] == [201, 321, 441, 561,
        681, 801, 921, 1041, 1161, 1200]  # fmt: skip
    assert lines[-1] == "step 1200/1200 (100.0 %), loss 3.0008, 812,345 tok/s, 8m20s elapsed"
    bar.disable()
    caplog.clear()
    bar.on_train_batch_end(SimpleNamespace(global_step=1300, max_steps=1300))
    bar.on_train_end(trainer, None)
    assert caplog.messages == []


def test_a_run_logging_to_a_file_gets_lines_not_a_bar(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    overrides = train_overrides(
        tiny_data(tmp_path / "data"), tmp_path / "run", "trainer.max_steps=6",
        "data.global_batch_size=4", "trainer.val_every_n_steps=3", "trainer.progress_bar=true",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="rwkv_train.progress_lines"):
        train(compose_train(overrides))
    lines = [r.getMessage() for r in caplog.records if r.name == "rwkv_train.progress_lines"]
    assert re.fullmatch(r"step 1/6 \(16\.7 %\), loss \d+\.\d{4}, .*left", lines[0]), lines
    assert lines[1] == "validating at step 3"
    assert re.fullmatch(r"validation at step 3 took \dm\d\ds: val_loss \d+\.\d{4}", lines[2])
    assert re.fullmatch(r"step 6/6 \(100\.0 %\), loss \d+\.\d{4}, .* elapsed", lines[3]), lines
    assert [ln.split(" ")[:4] for ln in lines[4:]] == [["validating", "at", "step", "6"],
        ["validation", "at", "step", "6"]]  # fmt: skip
    assert "\r" not in capsys.readouterr().out  # no tqdm redraws
