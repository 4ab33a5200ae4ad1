"""LAMBADA scoring (rwkv_train/lambada.py and `evaluate --lambada`): the bookkeeping against a
model whose answers are known, and the figures against the `rwkv` package and its tokenizer."""

import json
import math
from pathlib import Path

import pytest
import torch
from model_utils import build, tiny_config
from torch import Tensor, nn
from train_utils import compose_train, tiny_data, train_overrides

from rwkv_train.config import ConfigError, validate
from rwkv_train.evaluate import main
from rwkv_train.generate import load_model
from rwkv_train.lambada import encode, read_passages, score
from rwkv_train.metrics import read_metrics
from rwkv_train.train import train

PASSAGES = [
    "The keeper locked the gate and walked back to the lighthouse",
    "She poured the tea, sat down by the window and opened her book",
    "Die Katze schlief den ganzen Tag auf dem warmen Sofa",
    "他每天早上六点起床 然后去公园跑步",
    "In the end, the committee voted to postpone the decision until spring",
    "Ten green bottles hanging on the wall",
    "Water boils at one hundred degrees",
]


def write_passages(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return path


def test_passages_split_at_the_last_space_and_bad_lines_are_named(tmp_path: Path) -> None:
    path = write_passages(tmp_path / "a.jsonl", PASSAGES[:2])
    path.write_text(path.read_text() + "\n")  # a blank line is skipped
    assert read_passages(path) == [
        ("The keeper locked the gate and walked back to the", " lighthouse"),
        ("She poured the tea, sat down by the window and opened her", " book"),
    ]
    items = encode(read_passages(path))
    assert all(ctx[0] == 0 and len(ctx) > 5 and word for ctx, word in items)

    for lines, problem in (
        (['{"text": "fine words"}', '{"txt": "a b"}'], ":2: expected a JSON object"),
        (['{"text": "oneword"}'], ":1: no last word after a space"),
        (["not json"], ":1: expected a JSON object"),
        ([], "no passages"),
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(line + "\n" for line in lines))
        with pytest.raises(ValueError, match=problem):
            read_passages(bad)


class KnowsSome(nn.Module):
    """Logits `margin` for the true next token at every position of the passages whose context
    starts with token `known_first`, and for token 1 (never a target here) elsewhere."""

    def __init__(self, vocab: int, margin: float, known_first: int) -> None:
        super().__init__()
        self.vocab, self.margin, self.known_first = vocab, margin, known_first
        self.dummy = nn.Parameter(torch.zeros(1))  # gives score() a device

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.zeros(*x.shape, self.vocab)
        nxt = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
        known = (x[:, 1] == self.known_first)[:, None].expand_as(x)
        pick = torch.where(known, nxt, torch.ones_like(nxt))
        return logits.scatter(2, pick[..., None], self.margin)


def test_score_bookkeeping_with_padding_and_batches() -> None:
    """Passages of different lengths in batches of 3 (padded on the right): accuracy is the
    share the model gets right at every word token, perplexity the per-word figure."""
    vocab, margin = 50, 4.0
    items = [
        ([0, 7, 3, 4], [9, 10]),
        ([0, 5, 3], [11]),
        ([0, 7, 2, 2, 2, 2, 2], [12, 13, 14]),
        ([0, 6], [15, 16]),
        ([0, 7, 8], [17]),
    ]
    metrics = score(KnowsSome(vocab, margin, known_first=7), items, batch_size=3)
    assert metrics["lambada/acc"] == 3 / 5
    log_norm = math.log(math.exp(margin) + vocab - 1)
    total = sum(len(word) * ((margin if ctx[1] == 7 else 0.0) - log_norm) for ctx, word in items)
    assert metrics["lambada/ppl"] == pytest.approx(math.exp(-total / len(items)), rel=1e-5)


def test_lambada_matches_the_rwkv_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`evaluate model.pth --lambada FILE` against the per-word scores computed with the `rwkv`
    package's model and its own tokenizer (TRIE_TOKENIZER), passage by passage."""
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    monkeypatch.delenv("RWKV_V7_ON", raising=False)
    import rwkv
    from rwkv.model import RWKV as Reference
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    net = build(tiny_config(6, vocab_size=65536), seed=4)
    pth = tmp_path / "model.pth"
    torch.save(net.state_dict(), pth)
    data = write_passages(tmp_path / "lambada.jsonl", PASSAGES)
    out = tmp_path / "rows.jsonl"
    assert main([str(pth), "--lambada", str(data), "--batch-size", "3", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["step"] is None and "val/loss" not in row
    assert f"lambada ppl {row['lambada/ppl']:.2f}" in capsys.readouterr().out

    ref = Reference(model=str(pth.with_suffix("")), strategy="cpu fp32")
    tok = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    log_prob, right = 0.0, 0
    for text in PASSAGES:
        context, word = text.rsplit(" ", 1)
        src, dst = [0, *tok.encode(context)], tok.encode(" " + word)
        logits, _ = ref.forward(src + dst, None, full_output=True)
        at = logits[len(src) - 1 : len(src) + len(dst) - 1].double()
        log_prob += torch.log_softmax(at, -1)[range(len(dst)), dst].sum().item()
        right += at.argmax(-1).tolist() == dst
    assert row["lambada/ppl"] == pytest.approx(math.exp(-log_prob / len(PASSAGES)), rel=1e-4)
    assert row["lambada/acc"] == right / len(PASSAGES)


def test_evaluate_needs_something_to_score(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pth = tmp_path / "model.pth"
    torch.save(build(tiny_config(6, vocab_size=1000)).state_dict(), pth)
    with pytest.raises(SystemExit):
        main([str(pth)])
    assert "give --data folders, --lambada, or both" in capsys.readouterr().err
    data = write_passages(tmp_path / "lambada.jsonl", PASSAGES[:1])
    with pytest.raises(SystemExit):  # a 1000-token model cannot read World token ids
        main([str(pth), "--lambada", str(data)])
    assert "has 1000 token ids" in capsys.readouterr().err


def test_training_logs_lambada_as_evaluate_scores_it(tmp_path: Path) -> None:
    """`data.lambada_path`: the lambada/ppl and lambada/acc logged at a validation are the
    figures `evaluate --lambada` gives for that step's checkpoint; bad settings are refused."""
    data = tiny_data(tmp_path / "data")
    passages = write_passages(tmp_path / "lambada.jsonl", PASSAGES)
    run_dir = tmp_path / "run"
    overrides = train_overrides(
        data, run_dir, "model.vocab_size=65536", "trainer.max_steps=2",
        "trainer.val_every_n_steps=2", "checkpoint.every_n_steps=2",
        f"data.lambada_path={passages}",
    )  # fmt: skip
    train(compose_train(overrides))
    (logged,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if "lambada/ppl" in r]
    assert logged["step"] == 2 and "val/loss" in logged
    rows = tmp_path / "rows.jsonl"
    assert main([str(run_dir), "--lambada", str(passages), "--json", str(rows)]) == 0
    row = json.loads(rows.read_text())
    assert row["step"] == 2
    assert logged["lambada/ppl"] == pytest.approx(row["lambada/ppl"], rel=1e-5)
    assert logged["lambada/acc"] == row["lambada/acc"]

    with pytest.raises(ConfigError, match=r"^data\.lambada_path: .*No such file"):
        validate(compose_train([*overrides, "data.lambada_path=/nowhere.jsonl"]))
    with pytest.raises(ConfigError, match=r"^data\.lambada_path: .*beyond model\.vocab_size 128"):
        validate(compose_train([*overrides, "model.vocab_size=128"]))


def test_lambada_on_two_zero3_ranks(tmp_path: Path) -> None:
    """Seven passages on two ZeRO-3 ranks: rank 1 pads with a passage that counts nowhere, so
    both run the same forward passes (else the parameter gathers would hang), and the logged
    figures are the one-process figures of the same checkpoint."""
    from dist_utils import command, launch

    data = tiny_data(tmp_path / "data")
    passages = write_passages(tmp_path / "lambada.jsonl", PASSAGES)
    run_dir = tmp_path / "run"
    launch(
        command(
            data, run_dir, "deepspeed=zero3", "model.vocab_size=65536", "trainer.max_steps=2",
            "trainer.val_every_n_steps=2", "checkpoint.every_n_steps=2",
            f"data.lambada_path={passages}",
        ),
        tmp_path,
    )  # fmt: skip
    (logged,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if "lambada/ppl" in r]
    net = load_model(run_dir, wkv_backend="torch")
    expected = score(net, encode(read_passages(passages)), batch_size=4)
    assert logged["lambada/ppl"] == pytest.approx(expected["lambada/ppl"], rel=1e-5)
    assert logged["lambada/acc"] == expected["lambada/acc"]
