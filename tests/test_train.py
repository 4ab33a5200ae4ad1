"""The trainer end to end on the CPU: learning, accumulation invariance, checkpoints, export,
W&B offline, non-finite losses."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from train_utils import (
    TINY,
    TINY_VOCAB,
    assert_matches_rwkv_package,
    compose_train,
    markov_documents,
    tiny_data,
    train_overrides,
    write_data_folder,
)

from rwkv_train import lit_module
from rwkv_train.bptt import segmented_loss
from rwkv_train.checkpoint import (
    CheckpointSpaceError,
    find_latest,
    is_valid,
    list_checkpoints,
)
from rwkv_train.config import ConfigError, OptimConfig, validate
from rwkv_train.data import ChunkDataset, TokenStream, load_manifest
from rwkv_train.data.loader import val_sources
from rwkv_train.evaluate import evaluate
from rwkv_train.export import export, load_weights
from rwkv_train.generate import generate_ids, load_model
from rwkv_train.lit_module import NonFiniteLossError, RWKVLitModule
from rwkv_train.metrics import read_metrics
from rwkv_train.model import RWKV, RWKVConfig
from rwkv_train.optim import LRSchedule, param_groups
from rwkv_train.progress import Progress
from rwkv_train.reshard import single_path
from rwkv_train.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data"))


def run(data: Path, run_dir: Path, *overrides: str) -> RWKVLitModule:
    return train(compose_train(train_overrides(data, run_dir, *overrides)))


def losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def unigram_entropy(folder: Path) -> float:
    """Entropy in nats of the token frequencies of the train shards."""
    from rwkv_train.data import TokenStream, load_manifest

    stream = TokenStream(load_manifest(folder).train)
    counts = np.bincount(stream.read(0, len(stream)), minlength=TINY_VOCAB)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_overfits_below_unigram_entropy(tmp_path: Path) -> None:
    docs = markov_documents(12, 40, TINY_VOCAB, seed=5)
    folder = write_data_folder(tmp_path / "data", [docs])
    h = unigram_entropy(folder)
    run(
        folder,
        tmp_path / "run",
        "trainer.max_steps=60",
        "data.val_samples=0",
        "optim.lr_init=3e-3",
        "optim.decay=constant",
        "checkpoint.every_n_steps=0",
    )
    hist = losses(tmp_path / "run")
    assert len(hist) == 60
    assert hist[0] > h  # starts near log(V), above the unigram entropy
    assert np.mean(hist[-5:]) < h, f"final loss {np.mean(hist[-5:]):.3f} >= unigram {h:.3f}"


def test_accumulation_invariance(data: Path, tmp_path: Path) -> None:
    """micro 1 x accumulate 2 == micro 2 x accumulate 1 (same samples, fp32)."""
    common = ("trainer.max_steps=2", "data.global_batch_size=2", "checkpoint.every_n_steps=0")
    a = run(data, tmp_path / "a", "data.micro_batch_size=1", *common)
    b = run(data, tmp_path / "b", "data.micro_batch_size=2", *common)
    assert a.accumulate == 2 and b.accumulate == 1
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la == pytest.approx(lb, abs=1e-6)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    worst = max((sa[k] - sb[k]).abs().max().item() for k in sa)
    assert worst < 1e-6


def test_segment_len_trains_the_whole_samples_run(data: Path, tmp_path: Path) -> None:
    """trainer.segment_len splits each 16-token sample into segments of 5, 5, 5 and 1 (with
    L2Wrap on): the losses, validation loss and weights are those of whole samples."""
    common = ("trainer.max_steps=3", "optim.l2wrap=1e-2", "checkpoint.every_n_steps=0")
    a = run(data, tmp_path / "a", *common)
    b = run(data, tmp_path / "b", "trainer.segment_len=5", *common)
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-6)
    val = [
        [r["val/loss"] for r in read_metrics(d / "metrics.jsonl") if "val/loss" in r]
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert val[0] and val[1] == pytest.approx(val[0], rel=1e-6)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5


def test_compiled_blocks_train_the_eager_runs_losses(cpp_ops, data: Path, tmp_path: Path) -> None:
    """model.compile=true through Lightning: same losses, and the checkpoint loads into an
    eager model (the parameter names are unchanged)."""
    common = ("trainer.max_steps=3", "model.wkv_backend=cpp", "checkpoint.every_n_steps=0")
    run(data, tmp_path / "eager", *common)
    run(data, tmp_path / "compiled", "model.compile=true", *common)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-5)
    pth = export(tmp_path / "compiled", tmp_path / "compiled.pth")
    assert set(load_weights(pth)) == set(RWKV(RWKVConfig(vocab_size=128)).state_dict())


def test_recorded_sample_ids_are_the_trained_ones_with_workers(data: Path, tmp_path: Path) -> None:
    """DataLoader workers draw micro-batches ahead; only those trained are recorded, the
    same lines as without workers (4 steps x 2 micro-batches, ids 0-15)."""
    common = ("trainer.max_steps=4", "data.micro_batch_size=1", "data.record_sample_ids=true")
    run(data, tmp_path / "w0", *common)
    run(data, tmp_path / "w2", "data.num_workers=2", *common)
    lines = [(tmp_path / d / "sample_ids" / "rank0.txt").read_text() for d in ("w0", "w2")]
    assert lines[1] == lines[0]
    assert sorted(int(i) for i in lines[0].split()) == list(range(8))


def test_resume_refuses_other_optimizer_groups_or_model(data: Path, tmp_path: Path) -> None:
    """Turning weight decay on adds a parameter group: the saved optimizer states, matched to
    parameters by position, would no longer fit, so the resume stops and says why; so does
    another model shape, naming the fields that differ. Both before the run's config.yaml
    is rewritten with the settings that cannot continue it (another model run in the folder
    of a real run, say)."""
    rd = tmp_path / "run"
    run(data, rd, "trainer.max_steps=2", "checkpoint.every_n_steps=2")
    config = (rd / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim\.weight_decay turned on or off"):
        run(data, rd, "trainer.max_steps=4", "optim.weight_decay=0.1")
    with pytest.raises(ConfigError) as other_model:
        run(data, rd, "trainer.max_steps=4", "model.n_layer=3", "model.head_size=32")
    assert str(other_model.value) == (
        "model: the checkpoint resumed was trained with head_size=64, n_layer=2 (this config: "
        "head_size=32, n_layer=3); set those to resume it, or train another run (another "
        "run_dir)"
    )
    assert (rd / "config.yaml").read_text() == config
    assert not (rd / "config_history").exists()
    module = run(data, rd, "trainer.max_steps=4", "optim.betas=[0.9,0.95]")  # same groups
    assert {tuple(g["betas"]) for g in module._optimizer.param_groups} == {(0.9, 0.95)}
    assert [r["step"] for r in read_metrics(rd / "metrics.jsonl") if "train/loss" in r] == [
        1,
        2,
        3,
        4,
    ]


def test_one_build_reweighted_by_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`sources: {b: 2}` gives b twice its own share of one build's samples, each source read
    as a stream of its own and validated under its own name, the realised mix logged at the
    start; unknown keys are refused."""
    docs = [markov_documents(30, 60, TINY_VOCAB, seed=s, chain=s) for s in (0, 1)]
    val = {s: markov_documents(3, 60, TINY_VOCAB, seed=9, chain=i) for i, s in enumerate("ab")}
    data = write_data_folder(
        tmp_path / "data", [docs[0], docs[1][:10]], val, train_sources=["a", "b"]
    )
    path = f"data.path=[{{path: {data}, sources: {{b: 2}}}}]"
    overrides = [*TINY, path, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2"]
    plan = validate(compose_train(overrides))
    chunks = [(30 * 61 - 1) // 16, (10 * 61 - 1) // 16]  # a: 114, b: 38
    share_b = 2 * chunks[1] / (chunks[0] + 2 * chunks[1])
    assert [s.weight for s in plan.sources] == pytest.approx([0.6, 0.4]) and share_b == 0.4
    with caplog.at_level(logging.INFO):
        train(compose_train(overrides))
    assert "data: data/b: 40.00% of samples, 610 tokens, 0.0421 epochs in 4 samples" in caplog.text
    ds = ChunkDataset(
        [TokenStream(s.manifest.train) for s in plan.sources], [1 - share_b, share_b], 16, 0
    )
    drawn = [ds.chunk_of(g)[0] for g in range(2000)]
    assert drawn.count(1) / 2000 == pytest.approx(share_b, abs=2e-3)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"val/loss/a", "val/loss/b"} <= set(rows[-1])
    bad = [*TINY, f"data.path=[{{path: {data}, wieght: 2}}]", f"run_dir={tmp_path / 'x'}"]
    with pytest.raises(ConfigError, match=r"data.path\[0\]: unknown keys \['wieght'\]"):
        validate(compose_train(bad))
    bad[-2] = f"data.path=[{{path: {data}, sources: {{c: 2}}}}]"
    with pytest.raises(ConfigError, match=r"data.path\[0\].sources: no source \['c'\]"):
        validate(compose_train(bad))


def test_validation_measures_every_source_and_position(tmp_path: Path) -> None:
    """Two val sources of different text: the samples are taken from each in turn, and
    val/loss/<source>, val/loss and val/loss_by_pos/<first>-<last> are the cross-entropies of
    exactly those samples and positions."""
    docs = markov_documents(20, 60, TINY_VOCAB, seed=0)
    val = {
        "a": markov_documents(4, 60, TINY_VOCAB, seed=1),  # the train text's chain
        "b": markov_documents(4, 60, TINY_VOCAB, seed=2, chain=1),  # another chain
    }
    folder = write_data_folder(tmp_path / "data", [docs], val)
    module = run(
        folder, tmp_path / "run", "trainer.max_steps=3", "data.val_samples=5", "data.ctx_len=80"
    )
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val/loss" in r]
    assert record["step"] == 3

    def ce(source: str, chunk: int) -> np.ndarray:
        stream = np.concatenate(val[source])[chunk * 80 : chunk * 80 + 81].astype(np.int64)
        x = torch.from_numpy(stream)
        with torch.no_grad():
            logits = module.net.eval()(x[None, :-1])[0]
        return F.cross_entropy(logits, x[1:], reduction="none").numpy()

    a, b = [ce("a", k) for k in range(3)], [ce("b", k) for k in range(2)]  # a0 b0 a1 b1 a2
    assert record["val/loss/a"] == pytest.approx(np.mean(a), rel=1e-5)
    assert record["val/loss/b"] == pytest.approx(np.mean(b), rel=1e-5)
    assert record["val/loss"] == pytest.approx(np.mean(a + b), rel=1e-5)
    assert record["val/loss/b"] > record["val/loss/a"]  # trained on a's chain
    every = np.stack(a + b)
    assert record["val/loss_by_pos/00-63"] == pytest.approx(every[:, :64].mean(), rel=1e-5)
    assert record["val/loss_by_pos/64-79"] == pytest.approx(every[:, 64:].mean(), rel=1e-5)


def test_validation_every_n_steps_and_at_the_end(data: Path, tmp_path: Path) -> None:
    """Validated at every multiple of trainer.val_every_n_steps, and at the last step when it is
    not one, also after a resume; a run whose last step is a multiple validates there once."""
    rd = tmp_path / "run"

    def validated() -> list[int]:
        return [r["step"] for r in read_metrics(rd / "metrics.jsonl") if "val/loss" in r]

    run(data, rd, "trainer.max_steps=5", "trainer.val_every_n_steps=2")
    assert validated() == [2, 4, 5]
    run(data, rd, "trainer.max_steps=8", "trainer.val_every_n_steps=2")
    assert validated() == [2, 4, 5, 6, 8]


def test_validation_on_another_folder(data: Path, tmp_path: Path) -> None:
    """data.val_path measures that folder's val shards, not the training data's: the logged
    figures are evaluate()'s of the final model on it."""
    val = {"x": markov_documents(3, 60, TINY_VOCAB, seed=4, chain=2)}
    other = write_data_folder(tmp_path / "yardstick", [val["x"]], val)
    module = run(data, tmp_path / "run", "trainer.max_steps=2", f"data.val_path={other}")
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val/loss" in r]
    names, streams = val_sources([load_manifest(other)], 16)
    want = evaluate(module.net.eval(), names, streams, ctx_len=16, samples=4)
    assert want["val/loss"] == pytest.approx(record["val/loss"], rel=1e-5)
    no_val = write_data_folder(tmp_path / "no_val", [val["x"]])
    with pytest.raises(ConfigError, match=r"data.val_path: .* has no val shards"):
        run(data, tmp_path / "bad", f"data.val_path={no_val}")


def test_checkpoints_keep_last_and_resume_auto(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rd = tmp_path / "run"
    run(
        data, rd, "trainer.max_steps=8", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2",
        "checkpoint.keep_every_n_steps=3",
    )  # fmt: skip
    # the newest two, and the milestone of step 3 (written although not a multiple of 2)
    assert [s for s, _ in list_checkpoints(rd / "checkpoints")] == [3, 6, 8]
    # a torn newest checkpoint (truncated after its record was written) is skipped
    newest = rd / "checkpoints" / "step00000008.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        assert find_latest(rd / "checkpoints").name == "step00000006.ckpt"
    assert "skipping checkpoint" in caplog.text
    # saves cut short by a kill (a ZeRO folder, a file): removed as the next run starts
    stale = [rd / "checkpoints" / ".step00000009.ckpt.tmp", rd / "checkpoints" / ".step7.ckpt.tmp"]
    (stale[0] / "checkpoint").mkdir(parents=True)
    (stale[0] / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    stale[1].write_bytes(b"x")
    with caplog.at_level(logging.INFO):
        run(data, rd, "trainer.max_steps=10", "checkpoint.every_n_steps=2")
    assert "resuming from" in caplog.text and "(step 6)" in caplog.text
    assert not any(p.exists() for p in stale)
    assert caplog.text.count("a save that did not finish") == 2
    assert [r["step"] for r in read_metrics(rd / "metrics.jsonl") if "train/loss" in r] == list(
        range(1, 11)
    )


def test_roll_back_to_an_earlier_checkpoint_of_the_run(data: Path, tmp_path: Path) -> None:
    """resume=<a checkpoint of this run>: the later checkpoints and metrics are set aside (not
    pruned, nor preferred to the new branch's), the new branch repeats the old one's losses,
    and the same command run again (a requeue) continues the new branch."""
    rd = tmp_path / "run"
    ckpts = rd / "checkpoints"
    fixed = "optim.decay_tokens=400"  # the LR schedule does not depend on max_steps
    run(
        data,
        rd,
        "trainer.max_steps=12",
        fixed,
        "checkpoint.every_n_steps=3",
        "checkpoint.keep_last=3",
    )
    old_losses = losses(rd)
    assert [s for s, _ in list_checkpoints(ckpts)] == [6, 9, 12]
    with pytest.raises(ConfigError, match=r"resume=none, but .* step00000012\.ckpt"):
        run(data, rd, "resume=none")
    single_path(ckpts / "step00000009.ckpt").write_bytes(b"x")  # a derived copy goes along
    again = (
        fixed,
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=1",
        f"resume={ckpts}/step00000006.ckpt",
    )
    run(data, rd, "trainer.max_steps=8", *again)
    aside = rd / "abandoned" / "after_step00000006"
    assert [s for s, _ in list_checkpoints(aside)] == [9, 12]
    assert single_path(aside / "step00000009.ckpt").exists()
    assert not any(p.name.startswith("step00000009") for p in ckpts.iterdir())
    assert all(is_valid(p)[0] for _, p in list_checkpoints(aside))
    assert [r["step"] for r in read_metrics(aside / "metrics.jsonl") if "train/loss" in r] == list(
        range(7, 13)
    )
    assert [s for s, _ in list_checkpoints(ckpts)] == [8]
    assert losses(rd) == old_losses[:8]  # an exact resume from step 6
    config = (rd / "config.yaml").read_text()
    with pytest.raises(
        ConfigError, match=r"trainer.max_steps: 7 is below step 8 of .*step00000008"
    ):
        run(data, rd, "trainer.max_steps=7", *again)
    assert (rd / "config.yaml").read_text() == config  # the settings of the run, kept
    run(data, rd, "trainer.max_steps=10", *again)  # the same command again, for longer
    assert [s for s, _ in list_checkpoints(ckpts)] == [10]
    assert losses(rd) == old_losses[:10]
    assert [p.name for p in (rd / "abandoned").iterdir()] == ["after_step00000006"]


def test_resume_from_another_run_or_a_copied_checkpoint(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    run(data, src, "trainer.max_steps=4", "checkpoint.every_n_steps=2")
    with caplog.at_level(logging.INFO):
        run(data, tmp_path / "a", "trainer.max_steps=5", f"resume={src}")
    assert "(step 4)" in caplog.text  # a run folder: its newest checkpoint
    assert "data.path differs" not in caplog.text
    # the same command requeued continues the new run's own checkpoints (step 5)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(data, tmp_path / "a", "trainer.max_steps=6", f"resume={src}")
    assert "(step 5)" in caplog.text
    assert [
        r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "train/loss" in r
    ] == [5, 6]

    other = tiny_data(tmp_path / "other_data", seed=7)  # e.g. an annealing set
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(other, tmp_path / "d", "trainer.max_steps=5", f"resume={src}")
    assert "data.path differs from the checkpoint's" in caplog.text
    assert "global sample 8 of this data's order" in caplog.text  # step 4 x 2 samples

    copied = tmp_path / "copy" / "step00000002.ckpt"  # the file alone, without its record
    copied.parent.mkdir()
    copied.write_bytes((src / "checkpoints" / copied.name).read_bytes())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(data, tmp_path / "b", "trainer.max_steps=3", f"resume={copied}")
    assert "no completion record" in caplog.text and "(step 2)" in caplog.text

    torn = src / "checkpoints" / "step00000004.ckpt"
    torn.write_bytes(torn.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"resume: .* size differs"):
        run(data, tmp_path / "c", "trainer.max_steps=5", f"resume={torn}")
    with pytest.raises(ConfigError, match="neither a run folder nor a checkpoint"):
        run(data, tmp_path / "c", "trainer.max_steps=5", f"resume={src / 'config.yaml'}")
    with pytest.raises(ConfigError, match="resume: no checkpoint at"):
        run(data, tmp_path / "c", "trainer.max_steps=5", f"resume={tmp_path / 'nowhere'}")
    copied.write_bytes(torn.read_bytes())  # torn, and without a record to say so
    with pytest.raises(ConfigError, match=r"resume: .* cannot be opened"):
        run(data, tmp_path / "c", "trainer.max_steps=5", f"resume={copied}")


def test_resume_warns_when_the_data_was_rebuilt_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tiny_data(tmp_path / "data")
    run(data, tmp_path / "run", "trainer.max_steps=2", "checkpoint.every_n_steps=1")
    with caplog.at_level(logging.WARNING):
        run(data, tmp_path / "run", "trainer.max_steps=3", "checkpoint.every_n_steps=1")
    assert "rebuilt" not in caplog.text and "differs" not in caplog.text
    tiny_data(tmp_path / "data", seed=5)  # same folder, other shards
    with caplog.at_level(logging.WARNING):
        run(data, tmp_path / "run", "trainer.max_steps=4")
    assert "the data folders were rebuilt since the checkpoint" in caplog.text
    assert "global sample 6 of this data's order" in caplog.text


def test_resume_follows_the_configs_lr_schedule(data: Path, tmp_path: Path) -> None:
    """A run extended at a resume (max_steps 4 -> 8, another lr_init) follows the schedule of
    its config, as a run started with it would, not the one saved in the checkpoint."""
    run(data, tmp_path / "a", "trainer.max_steps=4", "checkpoint.every_n_steps=2")
    new = ("trainer.max_steps=8", "optim.lr_init=2e-3", "checkpoint.every_n_steps=0")
    resumed = run(data, tmp_path / "a", *new)
    run(data, tmp_path / "b", *new)
    lrs = [
        [r["optim/lr"] for r in read_metrics(d / "metrics.jsonl") if "optim/lr" in r]
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert len(lrs[0]) == len(lrs[1]) == 8
    assert lrs[0][4:] == pytest.approx(lrs[1][4:], rel=1e-12)
    schedule = LRSchedule.from_config(resumed.cfg.optim, resumed.progress, 8)
    for group in resumed._optimizer.param_groups:  # what the optimizer stepped with last
        assert group["lr"] == pytest.approx(2e-3 * group["lr_mult"] * schedule(8), rel=1e-12)
    # the settings of steps 1-4 stay on record beside those of the resume
    history = tmp_path / "a" / "config_history"
    assert [p.name for p in history.iterdir()] == ["until_step00000004.yaml"]
    before = OmegaConf.load(history / "until_step00000004.yaml")
    after = OmegaConf.load(tmp_path / "a" / "config.yaml")
    assert (before.optim.lr_init, before.trainer.max_steps) == (6e-4, 4)
    assert (after.optim.lr_init, after.trainer.max_steps) == (2e-3, 8)
    run(data, tmp_path / "a", *new)  # the same settings again: nothing more kept
    assert len(list(history.iterdir())) == 1
    # two starts from step 8 with other settings, neither training a step: the settings that
    # trained steps 5-8 are the ones kept
    run(data, tmp_path / "a", *new, "optim.lr_final=1e-5")
    run(data, tmp_path / "a", *new, "optim.lr_final=2e-5")
    kept = OmegaConf.load(history / "until_step00000008.yaml")
    assert (kept.optim.lr_init, kept.optim.lr_final) == (2e-3, after.optim.lr_final)


def test_resume_with_another_global_batch_goes_on_from_the_samples_consumed(
    data: Path, tmp_path: Path
) -> None:
    """4 steps of G=2, then G=4: steps 5-8 read global samples 8-23, each once, in order; the
    token count and the LR schedule go on from the first phase's, and a run resumed again
    within the second phase repeats the same losses (a fixed decay_tokens keeps the schedule
    independent of max_steps)."""
    ids = ("data.micro_batch_size=1", "data.record_sample_ids=true", "checkpoint.every_n_steps=2")
    ids = (*ids, "optim.decay_tokens=300")
    first, second = ("trainer.max_steps=4", *ids), ("data.global_batch_size=4", *ids)
    for name in ("a", "b"):
        run(data, tmp_path / name, *first)
    resumed = run(data, tmp_path / "a", "trainer.max_steps=8", *second)
    run(data, tmp_path / "b", "trainer.max_steps=6", *second)
    run(data, tmp_path / "b", "trainer.max_steps=8", *second)

    assert resumed.progress.phases == ((0, 2, 16), (4, 4, 16))
    for name in ("a", "b"):
        recorded = (tmp_path / name / "sample_ids" / "rank0.txt").read_text().split()
        assert [int(i) for i in recorded] == list(range(24))
    rows = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/tokens_seen"] for r in rows] == [32, 64, 96, 128, 192, 256, 320, 384]
    schedule = LRSchedule.from_config(resumed.cfg.optim, resumed.progress, 8)
    lr = resumed.cfg.optim.lr_init
    assert [r["optim/lr"] for r in rows[4:]] == pytest.approx(
        [lr * schedule(s) for s in range(4, 8)], rel=1e-12
    )
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_resume_with_a_longer_context_says_where_the_data_goes_on(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(data, tmp_path, "trainer.max_steps=2")
    with caplog.at_level(logging.INFO):
        resumed = run(data, tmp_path, "trainer.max_steps=3", "data.ctx_len=32")
    assert "data.ctx_len changed from 16" in caplog.text
    assert resumed.progress.phases == ((0, 2, 16), (2, 2, 32))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/tokens_seen"] for r in rows] == [32, 64, 128]


def test_constant_run_annealed_from_a_checkpoint(data: Path, tmp_path: Path) -> None:
    """4 steps at a constant rate (128 tokens), then resumed with decay=linear from there to
    step 8: the rate goes on unchanged at step 5 and falls linearly towards lr_final."""
    run(data, tmp_path, "trainer.max_steps=4", "optim.decay=constant")
    anneal = ("optim.decay=linear", "optim.decay_start_tokens=128", "optim.lr_final=1e-4")
    lr = run(data, tmp_path, "trainer.max_steps=8", *anneal).cfg.optim.lr_init
    lrs = [r["optim/lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "optim/lr" in r]
    f = 1e-4 / lr
    assert lrs[2:] == pytest.approx(
        [lr, lr] + [lr * (1 - (1 - f) * p) for p in (0, 0.25, 0.5, 0.75)]
    )


def test_lr_schedule_warmup_decay_and_no_rewarm() -> None:
    cfg = OptimConfig(lr_init=1e-3, lr_final=1e-4, warmup_steps=10, warmup_start=0.2)
    s = LRSchedule.from_config(cfg, Progress.start(batch=10, ctx_len=10), max_steps=110)
    assert s(0) == pytest.approx(0.2)
    assert s(5) == pytest.approx(0.6)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx((1 + 0.1) / 2)  # half way through the cosine
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    exp = LRSchedule.from_config(
        OptimConfig(lr_init=1e-3, lr_final=1e-5, warmup_steps=0, decay="exponential"),
        Progress.start(1, 1),
        100,
    )
    assert exp(50) == pytest.approx(0.1)
    # a LambdaLR restored from its state continues where it was
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s)
    for _ in range(30):
        opt.step()
        sched.step()
    opt2 = torch.optim.AdamW([p], lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, s)
    opt2.load_state_dict(opt.state_dict())  # what a resume restores
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * s(30))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * s(31))


@pytest.mark.parametrize("version", [4, 6])
def test_optimizer_groups_follow_the_reference(version: int) -> None:
    net = RWKV(RWKVConfig(version=version, n_layer=2, n_embd=64, vocab_size=64))
    groups = param_groups(net, OptimConfig(weight_decay=0.1))
    where = {n: (g["lr_mult"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert where["blocks.0.att.time_decay"] == (2.0, 0.0)
    assert where["emb.weight"] == (1.0, 0.1) and where["head.weight"] == (1.0, 0.1)
    assert where["blocks.1.att.key.weight"] == (1.0, 0.1)
    assert where["blocks.1.ln1.weight"] == (1.0, 0.0)
    if version == 6:
        assert where["blocks.0.att.time_decay_w1"] == (1.0, 0.0)
        assert where["blocks.0.att.time_maa_w2"] == (1.0, 0.0)
        assert where["blocks.0.att.time_faaaa"] == (1.0, 0.0)
    else:
        assert where["blocks.0.att.time_first"] == (3.0, 0.0)


def test_optimizer_groups_see_through_zero3_partitions() -> None:
    """ZeRO-3 leaves each rank a flat shard; the decay choice must use the full shape."""
    net = RWKV(RWKVConfig(version=6, n_layer=1, n_embd=64, vocab_size=64))
    full = {n: p.shape for n, p in net.named_parameters()}
    for p in net.parameters():
        p.ds_shape = p.shape  # what deepspeed.zero.Init records before partitioning
        p.data = p.data.flatten()[:1]
    cfg = OptimConfig(weight_decay=0.1)
    where = {n: g["weight_decay"] for g in param_groups(net, cfg) for n in g["names"]}
    assert where["head.weight"] == 0.1 and len(full["head.weight"]) == 2
    assert where["blocks.0.att.key.weight"] == 0.1
    assert where["blocks.0.att.time_decay"] == 0.0  # (1, 1, C): one non-unit dimension


def test_export_loads_in_rwkv_package_with_matching_logits(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rd = tmp_path / "run"
    module = run(data, rd, "trainer.max_steps=3", "model.vocab_size=256")
    pth = export(rd, tmp_path / "out.pth")
    sd = torch.load(pth, weights_only=True)
    assert set(sd) == set(module.net.state_dict())

    assert_matches_rwkv_package(pth, [5, 17, 99, 3, 0, 42, 7, 200], monkeypatch)

    # and the .pth is a valid starting point: model.init_from loads it exactly
    start = run(
        data,
        tmp_path / "again",
        "trainer.max_steps=1",
        "model.vocab_size=256",
        f"model.init_from={pth}",
        "optim.lr_init=1e-12",
        "optim.lr_final=1e-12",
    )
    for k, v in start.net.state_dict().items():
        assert torch.allclose(v, sd[k], atol=1e-6), k


def test_generate_stops_at_token_zero(data: Path, tmp_path: Path) -> None:
    rd = tmp_path / "run"
    run(data, rd, "trainer.max_steps=1")
    net = load_model(rd, wkv_backend="torch")
    ids = list(generate_ids(net, [5, 6], max_tokens=20, temperature=1.0, seed=1))
    assert 0 not in ids and len(ids) <= 20
    again = list(generate_ids(net, [5, 6], max_tokens=20, temperature=1.0, seed=1))
    assert ids == again
    assert load_weights(rd).keys() == net.state_dict().keys()


def test_nonfinite_loss_stops_with_checkpoint(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    def poisoned(net, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        loss, ce = segmented_loss(net, *args, **kwargs)
        nan = float("nan") if calls["n"] >= 4 and net.training else 1.0
        return loss * nan, ce * nan

    monkeypatch.setattr(lit_module, "segmented_loss", poisoned)
    rd = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        run(data, rd, "trainer.max_steps=20", "nonfinite.max_skips=2", "data.val_samples=0")
    record = read_metrics(rd / "metrics.jsonl")
    assert record[-1]["train/nonfinite_skipped"] == 3  # two skipped, the third stops
    skipped = [r["train/loss"] for r in record if r.get("train/nonfinite_skipped", 0) > 0]
    assert skipped and all(np.isnan(v) for v in skipped)  # not a loss of 0
    assert find_latest(rd / "checkpoints") is not None


def test_a_checkpoint_that_cannot_fit_stops_the_run_before_writing(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first save goes by a lower bound of a checkpoint's size, later ones by the previous
    checkpoint's: a disk short of either stops the run at once, with nothing half-written."""
    import shutil

    free = {"bytes": 2**50}
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free["bytes"]))
    rd = tmp_path / "run"
    net = run(data, rd, "trainer.max_steps=4", "checkpoint.every_n_steps=2").net
    size = json.loads((rd / "checkpoints" / "step00000004.json").read_text())["bytes"]
    params = sum(p.numel() for p in net.parameters())
    assert 12 * params < size < 13 * params  # the lower bound holds, and is close
    free["bytes"] = size - 1
    with pytest.raises(CheckpointSpaceError, match=r"step 6 .* needs about .* free on rank 0"):
        run(data, rd, "trainer.max_steps=8", "checkpoint.every_n_steps=2")
    assert [s for s, _ in list_checkpoints(rd / "checkpoints")] == [2, 4]
    assert sorted(p.name for p in (rd / "checkpoints").iterdir() if p.name.startswith(".")) == []
    free["bytes"] = 12 * params - 1
    with pytest.raises(CheckpointSpaceError, match="step 2 in"):
        run(data, tmp_path / "fresh", "trainer.max_steps=4", "checkpoint.every_n_steps=2")
    assert not list((tmp_path / "fresh" / "checkpoints").iterdir())
    free["bytes"] = size
    run(data, rd, "trainer.max_steps=6", "checkpoint.every_n_steps=2")
    assert [s for s, _ in list_checkpoints(rd / "checkpoints")][-1] == 6


def test_wandb_offline_keeps_metrics_in_run_dir(data: Path, tmp_path: Path) -> None:
    rd = tmp_path / "run"
    run(
        data,
        rd,
        "trainer.max_steps=3",
        "logger=wandb",
        "logger.mode=offline",
        "logger.log_samples_every_n_steps=2",
        "logger.group=lr_sweep_7",
    )
    run_id = (rd / "wandb_id.txt").read_text().strip()
    (first,) = (rd / "wandb").glob(f"offline-run-*-{run_id}")
    history = (first / f"run-{run_id}.wandb").read_bytes()  # protobuf records of the run
    keys = (b"train/loss", b"optim/lr", b"optim/grad_norm", b"val/loss", b"val/ppl", b"samples")
    for key in keys:
        assert key in history, key
    # the run's settings, to filter and compare runs by (JSON inside the config record)
    assert b"lr_sweep_7" in history  # the W&B group
    for setting in (b'"lr_init":0.0006', b'"global_batch_size":2', b'"tokens_per_step":32'):
        assert setting in history, setting
    # a resumed run logs into the same W&B run id
    run(data, rd, "trainer.max_steps=4", "logger=wandb", "logger.mode=offline")
    assert (rd / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((rd / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert len(list((rd / "wandb").glob("offline-run-*"))) == 2
    text = " ".join(
        p.read_text(errors="ignore") for p in rd.rglob("*") if p.suffix in (".yaml", ".txt")
    )
    assert "api_key" not in text.lower()


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"NODE_RANK": "1"}, 4),  # the first process of node 1 (Lightning starts the rest)
        ({"NODE_RANK": "1", "LOCAL_RANK": "3"}, 7),
        ({"RANK": "5", "LOCAL_RANK": "1", "NODE_RANK": "1"}, 5),  # torchrun
        ({"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "6"}, 6),  # srun
        ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "bash", "SLURM_PROCID": "0", "NODE_RANK": "1"}, 4),
    ],
)
def test_launch_rank_before_the_trainer_exists(
    env: dict[str, str], rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rwkv_train.train import launch_rank

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_JOB_NAME", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_rank(devices=4) == rank
