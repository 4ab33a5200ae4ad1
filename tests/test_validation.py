"""The validation metrics (rwkv_train/validation.py): by source, by position, padding."""

import pytest
import torch

from rwkv_train.validation import ValidationLoss, position_buckets


def test_position_buckets_grow_fourfold_and_end_at_ctx_len() -> None:
    assert position_buckets(64) == []  # one bucket would only repeat val/loss
    assert position_buckets(100) == [(0, 64), (64, 100)]
    assert position_buckets(4096) == [(0, 64), (64, 256), (256, 1024), (1024, 4096)]
    assert position_buckets(5000)[-1] == (4096, 5000)


def test_sums_by_source_and_position_skip_padding() -> None:
    g = torch.Generator().manual_seed(0)
    ce = torch.rand(4, 100, generator=g)
    val = ValidationLoss(["a", "b"], 100, torch.device("cpu"))
    val.add(ce[:3], torch.tensor([0, 1, -1]))  # the third a padding repeat
    val.add(ce[3:], torch.tensor([0]))
    m = val.metrics(lambda t: t * 2)  # two ranks that saw the same: means unchanged
    counted = ce[[0, 1, 3]].double()
    assert m["val/loss"] == pytest.approx(counted.mean().item())
    assert m["val/loss/a"] == pytest.approx(ce[[0, 3]].double().mean().item())
    assert m["val/loss/b"] == pytest.approx(ce[1].double().mean().item())
    assert m["val/loss_by_pos/00-63"] == pytest.approx(counted[:, :64].mean().item())
    assert m["val/loss_by_pos/64-99"] == pytest.approx(counted[:, 64:].mean().item())
    assert set(m) == {
        "val/loss", "val/ppl", "val/loss/a", "val/loss/b",
        "val/loss_by_pos/00-63", "val/loss_by_pos/64-99",
    }  # fmt: skip


def test_one_source_and_nothing_counted() -> None:
    val = ValidationLoss(["only"], 16, torch.device("cpu"))
    assert val.metrics(lambda t: t) == {}
    val.add(torch.ones(2, 16), torch.tensor([0, 0]))
    assert val.metrics(lambda t: t) == {"val/loss": 1.0, "val/ppl": pytest.approx(2.718281828)}
