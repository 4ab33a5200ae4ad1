"""`python -m data_prep.build`, verify and merge on tiny corpora made by the tests."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_prep.build import BuildConfig, BuildError, build, config_from_hydra, source_specs
from data_prep.encode import val_split
from data_prep.merge import MergeError, merge
from data_prep.sources import BadInputError
from data_prep.tokenizer import WorldTokenizer
from data_prep.verify import main as verify_main
from data_prep.verify import verify

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "Hello world, this is document one.",
    "第二个文档：中文内容。日本語も少し。",
    "def f(x):\n    return x * 2  # code\n",
    "emoji 👍🏽 and 👨‍👩‍👧 in a short line",
    "Русский текст и ελληνικά γράμματα.",
    "x" * 50 + " repeated " * 20,
]


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


def docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{TEXTS[i % len(TEXTS)]} #{i} " * int(rng.integers(1, 6)) for i in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    data = "".join(
        json.dumps({field: t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)
    )
    raw = data.encode("utf-8")
    if path.name.endswith(".zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    elif path.name.endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
    path.write_bytes(raw)
    return path


def cfg(out: Path, inputs: list, **kw) -> BuildConfig:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("val_fraction", 0.2)
    return BuildConfig(output_dir=str(out), inputs=[str(i) for i in inputs], **kw)


def read_all(folder: Path) -> dict[str, bytes]:
    """Every output file except logs, for byte comparisons."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts
    }


def megatron_docs(folder: Path, manifest: dict, source: str, split: str) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    out = []
    for shard in manifest["shards"]:
        if shard["source"] == source and shard["split"] == split:
            ds = IndexedDataset(str(folder / shard["prefix"]))
            out += [ds[i].tolist() for i in range(len(ds))]
    return out


def test_every_format_reads_back_through_megatron(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    inputs = {
        "plain": (write_jsonl(src / "plain.jsonl", docs(20, 1)), docs(20, 1)),
        "zst": (write_jsonl(src / "zst.jsonl.zst", docs(20, 2)), docs(20, 2)),
        "gz": (write_jsonl(src / "gz.jsonl.gz", docs(20, 3)), docs(20, 3)),
    }
    pq.write_table(pa.table({"text": docs(15, 4)}), src / "table.parquet", row_group_size=4)
    inputs["table"] = (src / "table.parquet", docs(15, 4))
    (src / "note.md").write_text(TEXTS[1] + "\n\n" + TEXTS[0], encoding="utf-8")
    inputs["note"] = (src / "note.md", [TEXTS[1] + "\n\n" + TEXTS[0]])
    datasets.Dataset.from_dict({"text": docs(12, 5)}).save_to_disk(str(src / "hfdisk"))
    inputs["hfdisk"] = (src / "hfdisk", docs(12, 5))

    out = tmp_path / "out"
    manifest = build(cfg(out, [p for p, _ in inputs.values()], batch_records=7))
    assert verify(out) == []
    assert [s["name"] for s in manifest["sources"]] == list(inputs)
    for name, (_, texts) in inputs.items():
        expected = {"train": [], "val": []}
        for t in texts:
            split = "val" if val_split(t.encode(), 0.2) else "train"
            expected[split].append([*tok.encode(t), 0])
        for split in ("train", "val"):
            assert megatron_docs(out, manifest, name, split) == expected[split], (name, split)
        src_entry = next(s for s in manifest["sources"] if s["name"] == name)
        assert src_entry["documents_written"] == len(texts)
        assert src_entry["rejected"] == {}
    assert {s["split"] for s in manifest["shards"]} == {"train", "val"}
    keys = {"prefix", "source", "split", "documents", "tokens", "sha256_bin", "sha256_idx"}
    assert all(keys <= set(s) for s in manifest["shards"])
    assert set(manifest["tokenizer"]) >= {"name", "vocab_size", "sha256"}
    assert manifest["total_tokens"] == sum(s["tokens"] for s in manifest["shards"])


def test_output_is_the_same_for_any_worker_count(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl.zst", docs(300))
    other = write_jsonl(tmp_path / "b.jsonl", docs(100, 7))
    kw = dict(shard_size_tokens=2000, shuffle=True, seed=3, batch_records=16)
    build(cfg(tmp_path / "w1", [src, other], workers=1, **kw))
    build(cfg(tmp_path / "w2", [src, other], workers=2, **kw))
    build(cfg(tmp_path / "w3", [src, other], workers=3, **kw))
    one, two = read_all(tmp_path / "w1"), read_all(tmp_path / "w2")
    assert sum(name.endswith(".bin") for name in one) > 4
    assert one == two == read_all(tmp_path / "w3")
    # Spawned workers (used where fork is unavailable or torch is loaded) load the core file.
    monkeypatch.setattr("multiprocessing.get_all_start_methods", lambda: ["spawn"])
    build(cfg(tmp_path / "spawn", [src, other], workers=2, **kw))
    assert read_all(tmp_path / "spawn") == one


def test_shuffle_permutes_within_shards(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", docs(60))
    plain = build(cfg(tmp_path / "plain", [src], val_fraction=0.0))
    shuffled = build(cfg(tmp_path / "shuf", [src], val_fraction=0.0, shuffle=True, seed=1))
    a = megatron_docs(tmp_path / "plain", plain, "a", "train")
    b = megatron_docs(tmp_path / "shuf", shuffled, "a", "train")
    assert a != b and sorted(a) == sorted(b)


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tmp_path):
    src = write_jsonl(tmp_path / "big.jsonl.zst", docs(3000))
    args = [
        f"inputs=[{src}]",
        "shard_size_tokens=1500",
        "batch_records=8",
        "workers=1",
        "progress=false",
        "shuffle=true",
    ]

    def run(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "data_prep.build", f"output_dir={out}", *args],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    clean = tmp_path / "clean"
    build(
        cfg(clean, [src], val_fraction=0.001, shard_size_tokens=1500, batch_records=8, shuffle=True)
    )
    killed = tmp_path / "killed"
    proc = run(killed)
    deadline = time.time() + 120
    while len(list((killed / ".state").glob("big_*.json"))) < 5 and time.time() < deadline:
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.01)
    assert proc.poll() is None, "the build ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    finished = {
        p: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in killed.glob("big_*_0000[0-3].*")  # groups recorded as finished
    }
    assert finished
    assert run(killed).wait() == 0
    assert read_all(killed) == read_all(clean)
    for p, stamp in finished.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{p.name} was rewritten"


def _bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """One input per kind of bad record: path and the reason it must be counted under."""
    folder.mkdir()
    good = json.dumps({"text": "good document"})
    cases = {
        "invalid_json": "{not json",
        "not_a_json_object": "[1, 2]",
        "missing_text_field": json.dumps({"body": "x"}),
        "text_not_a_string": json.dumps({"text": 42}),
        "empty_document": json.dumps({"text": "   \n"}),
        "blank_line": "   ",
        "lone_surrogate": '{"text": "a\\ud800b"}',
    }
    out = {}
    for reason, line in cases.items():
        p = folder / f"{reason}.jsonl"
        p.write_text(f"{good}\n{line}\n{good}\n", encoding="utf-8")
        out[reason] = (p, reason)
    p = folder / "bad_utf8_line.jsonl"
    p.write_bytes(f"{good}\n".encode() + b'{"text": "caf\xe9"}\n')
    out["invalid_utf8_line"] = (p, "invalid_utf8")
    p = folder / "bad_utf8.txt"
    p.write_bytes(b"caf\xe9 au lait")
    out["invalid_utf8_text"] = (p, "invalid_utf8")
    whole = write_jsonl(folder / "whole.jsonl.zst", docs(400))
    p = folder / "cut.jsonl.zst"
    p.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    out["truncated_zst"] = (p, "truncated_input")
    whole = write_jsonl(folder / "whole.jsonl.gz", docs(400))
    p = folder / "cut.jsonl.gz"
    p.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    out["truncated_gz"] = (p, "truncated_input")
    return out


def test_a_build_that_writes_nothing_fails(tmp_path, caplog):
    """Every record rejected (here: the text under another key) is an error, not an empty
    data folder; a source that wrote nothing beside others that did is named."""
    src = tmp_path / "body.jsonl"
    src.write_text(json.dumps({"body": "a document"}) + "\n", encoding="utf-8")
    with pytest.raises(BuildError, match=r"no document was written .*check text_field"):
        build(cfg(tmp_path / "out", [src]))
    assert not (tmp_path / "out" / "manifest.json").exists()
    good = write_jsonl(tmp_path / "good.jsonl", docs(3))
    build(cfg(tmp_path / "out2", [good, src]))
    assert "no document written for source(s) body" in caplog.text


def test_bad_inputs_are_counted_by_reason(tmp_path):
    cases = _bad_inputs(tmp_path / "in")
    manifest = build(cfg(tmp_path / "out", [p for p, _ in cases.values()]))
    assert verify(tmp_path / "out") == []
    for src, (_, reason) in zip(manifest["sources"], cases.values(), strict=True):
        assert src["rejected"] == {reason: 1}, src["name"]
        assert src["documents_in"] == src["documents_written"] + 1


@pytest.mark.parametrize(
    "case,where",
    [
        ("invalid_json", "invalid_json.jsonl: line 2: invalid_json"),
        ("missing_text_field", "missing_text_field.jsonl: line 2: missing_text_field"),
        ("text_not_a_string", "text_not_a_string.jsonl: line 2"),
        ("invalid_utf8_line", "bad_utf8_line.jsonl: line 2: invalid_utf8"),
        ("truncated_zst", "cut.jsonl.zst: line"),
    ],
)
def test_strict_names_file_and_line(tmp_path, case, where):
    path, _ = _bad_inputs(tmp_path / "in")[case]
    with pytest.raises(BadInputError, match=where):
        build(cfg(tmp_path / "out", [path], strict=True))


def test_long_documents_are_split_or_rejected(tmp_path, tok):
    long_text = "a long document of many words, " * 200
    src = write_jsonl(tmp_path / "long.jsonl", ["short one", long_text])
    ids = [*tok.encode(long_text), 0]
    limit = 100
    m = build(cfg(tmp_path / "split", [src], val_fraction=0.0, max_doc_tokens=limit))
    items = megatron_docs(tmp_path / "split", m, "long", "train")
    assert items[0] == [*tok.encode("short one"), 0]
    assert all(len(piece) <= limit for piece in items[1:-1]) and len(items[-1]) <= limit + 1
    assert [t for piece in items[1:] for t in piece] == ids
    assert m["sources"][0]["documents_split"] == 1
    assert m["sources"][0]["extra_pieces"] == len(items) - 2
    assert verify(tmp_path / "split") == []
    m = build(
        cfg(tmp_path / "rej", [src], val_fraction=0.0, max_doc_tokens=limit, long_docs="reject")
    )
    assert m["sources"][0]["rejected"] == {"too_long": 1}
    assert m["total_documents"] == 1


def test_verify_catches_a_flipped_byte(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", docs(30))
    out = tmp_path / "out"
    manifest = build(cfg(out, [src]))
    assert verify_main([str(out)]) == 0
    tokens = manifest["total_tokens"]
    val = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "val")
    line = f"  a: 30 documents, {tokens} tokens (100.00 %), {val} of them val"
    assert val > 0 and line in capsys.readouterr().out
    prefix = manifest["shards"][0]["prefix"]
    for suffix, offset in ((".bin", 7), (".idx", 40)):
        path = out / f"{prefix}{suffix}"
        original = path.read_bytes()
        data = bytearray(original)
        data[offset] ^= 0x40
        path.write_bytes(bytes(data))
        assert verify_main([str(out)]) == 1
        err = capsys.readouterr().err
        assert f"shard {prefix}: {suffix} checksum differs" in err and "FAILED" in err
        path.write_bytes(original)
    # A token outside the vocabulary, with the manifest checksums updated to match.
    path = out / f"{prefix}.bin"
    arr = np.fromfile(path, dtype=np.uint16)
    arr[0] = 65535
    arr.tofile(path)
    assert any("outside the vocabulary" in p for p in verify(out, checksums=False))
    assert verify_main([str(tmp_path / "nowhere")]) == 1


def test_verify_reports_a_hand_edited_manifest_without_a_traceback(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", docs(30))
    out = tmp_path / "out"
    build(cfg(out, [src]))
    path = out / "manifest.json"
    good = json.loads(path.read_text())

    def edited(change) -> list[str]:
        m = json.loads(json.dumps(good))
        change(m)
        path.write_text(json.dumps(m))
        return verify(out, checksums=False)

    assert edited(lambda m: None) == []
    assert edited(lambda m: m.update(total_documents=m["total_documents"] + 1)) == [
        f"total_documents is {good['total_documents'] + 1}, the shards hold "
        f"{good['total_documents']}"
    ]
    prefix = good["shards"][0]["prefix"]
    assert edited(lambda m: m["shards"][0].update(split="test")) == [
        f"shard {prefix}: split 'test', not train or val"
    ]
    assert edited(lambda m: m["shards"][1].pop("sha256_bin")) == ["shards[1]: no sha256_bin"]
    assert edited(lambda m: m["sources"][0].pop("rejected")) == ["sources[0]: no rejected"]
    path.write_text(json.dumps(good))
    (out / "stray_train_00000.bin").write_bytes(b"\0\0")  # a .bin without its .idx
    assert verify(out, checksums=False) == [
        "stray_train_00000: a shard in the folder that the manifest does not list"
    ]
    path.write_text(path.read_text()[:-20])
    assert verify_main([str(out)]) == 1
    assert "manifest.json: not valid JSON" in capsys.readouterr().err


def test_verify_on_threads_reports_in_shard_order(tmp_path, monkeypatch):
    """Shards checked on three threads, each .bin read in 6-byte blocks: the problems come
    back in shard order, an id out of range in a later block is found, and the progress
    callback sees every byte of every .bin once."""
    import data_prep.verify as verify_mod

    src = write_jsonl(tmp_path / "a.jsonl", docs(60))
    out = tmp_path / "out"
    manifest = build(cfg(out, [src], shard_size_tokens=200, val_fraction=0.0))
    shards = [s["prefix"] for s in manifest["shards"]]
    assert len(shards) >= 4
    monkeypatch.setattr(verify_mod, "BLOCK", 6)
    seen = []
    assert verify(out, workers=3, on_bytes=seen.append) == []
    assert sum(seen) == sum((out / f"{p}.bin").stat().st_size for p in shards)

    flipped = out / f"{shards[1]}.bin"
    data = bytearray(flipped.read_bytes())
    data[3] ^= 0x01
    flipped.write_bytes(bytes(data))
    wide = out / f"{shards[3]}.bin"
    arr = np.fromfile(wide, dtype=np.uint16)
    arr[7] = 65535  # in the third block
    arr.tofile(wide)
    too_wide = f"shard {shards[3]}: token id 65535 outside the vocabulary (< 65530)"
    assert verify(out, workers=3) == [
        f"shard {shards[1]}: .bin checksum differs from the manifest",
        f"shard {shards[3]}: .bin checksum differs from the manifest",
        too_wide,
    ]
    assert verify(out, checksums=False, workers=2) == [too_wide]


def test_parts_and_merge(tmp_path):
    files = [write_jsonl(tmp_path / f"f{i}.jsonl", docs(25, i)) for i in range(5)]
    corpus = {"sources": [{"name": "web", "paths": [str(tmp_path / "f*.jsonl")]}]}
    whole = build(
        BuildConfig(output_dir=str(tmp_path / "whole"), corpus=corpus, progress=False, workers=1)
    )
    parts = []
    for i in range(2):
        out = tmp_path / "merged" / f"part{i}"
        parts.append(
            build(
                BuildConfig(
                    output_dir=str(out),
                    corpus=corpus,
                    workers=1,
                    progress=False,
                    shard_index=i,
                    num_shards=2,
                )
            )
        )
    assert parts[0]["sources"][0]["documents_in"] == 75  # files 0, 2, 4
    assert parts[1]["sources"][0]["documents_in"] == 50
    merged = merge(tmp_path / "merged")
    assert verify(tmp_path / "merged") == []
    assert merged["total_tokens"] == whole["total_tokens"]
    assert merged["sources"][0]["documents_in"] == whole["sources"][0]["documents_in"]
    assert all(s["prefix"].startswith("part") for s in merged["shards"])
    with pytest.raises(MergeError, match="not exactly parts"):
        merge(tmp_path / "only0", [tmp_path / "merged" / "part0"])
    assert len(files) == 5


def test_rerun_with_other_settings_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", docs(10))
    build(cfg(tmp_path / "out", [src]))
    again = build(cfg(tmp_path / "out", [src]))  # same settings: resumes, nothing to do
    assert again["total_documents"] == 10
    with pytest.raises(BuildError, match=r"other settings or inputs \(seed was 0, now 5\)"):
        build(cfg(tmp_path / "out", [src], seed=5))
    with pytest.raises(BuildError, match="source a: text_field was 'text', now 'body'"):
        build(cfg(tmp_path / "out", [src], text_field="body"))
    assert build(cfg(tmp_path / "out", [src], seed=5, overwrite=True))["total_documents"] == 10


def test_resume_refuses_a_changed_input(tmp_path):
    """An input that changed since the killed run (its size or modification time) would mix
    old and new content: the rerun names it instead of resuming."""
    src = write_jsonl(tmp_path / "a.jsonl", docs(40))
    other = write_jsonl(tmp_path / "b.jsonl", docs(5))
    out = tmp_path / "out"
    build(cfg(out, [src, other], shard_size_tokens=200))
    (out / "manifest.json").unlink()  # as if killed
    for p in sorted((out / ".state").glob("a_*.json"))[2:]:
        p.unlink()
    stat = src.stat()
    write_jsonl(src, docs(40, seed=1))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(BuildError, match=f"input {src} changed since"):
        build(cfg(out, [src, other], shard_size_tokens=200))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(BuildError, match=f"input {src} changed since.*overwrite=true"):
        build(cfg(out, [src, other], shard_size_tokens=200))
    m = build(cfg(out, [src, other], shard_size_tokens=200, overwrite=True))
    assert m == build(cfg(tmp_path / "fresh", [src, other], shard_size_tokens=200))


def test_configs_compose():
    from hydra import compose, initialize_config_dir

    from rwkv_train.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        c = config_from_hydra(compose("data_prep", ["corpus=world_v2", "output_dir=x"]))
        specs = source_specs(c)
        # the paper's Table 9: 59 components, in its order
        assert len(specs) == 59
        assert [s.name for s in specs][:3] == ["wikipedia", "slimpajama", "pes2o"]
        assert all(s.paths[0].startswith("/path/to/world_v2/") for s in specs)
        assert {s.name for s in specs if s.text_field == "content"} == {"starcoder", "oscar_2301"}
        c = config_from_hydra(
            compose("data_prep", ["corpus=demo", "corpus.root=r", "output_dir=x"])
        )
        assert [s.name for s in source_specs(c)] == ["stdlib_code", "stdlib_docs", "cjk"]
        with pytest.raises(Exception, match="not_a_key"):
            config_from_hydra(compose("data_prep", ["+not_a_key=1", "output_dir=x"]))


def test_corpus_source_with_a_misspelt_key_is_an_error(tmp_path):
    corpus = {"sources": [{"name": "a", "paths": ["x.jsonl"], "text_feild": "body"}]}
    with pytest.raises(BuildError, match=r"source 0 \(a\): unknown keys \['text_feild'\]"):
        source_specs(cfg(tmp_path, [], corpus=corpus))
    corpus["sources"][0] = {"name": "a", "paths": ["x.jsonl"], "domain": "Web", "note": "n"}
    assert source_specs(cfg(tmp_path, [], corpus=corpus))[0].name == "a"  # documentation keys


@pytest.mark.slow
def test_demo_corpus_builds_and_verifies(tmp_path):
    from data_prep.demo_corpus import cjk_texts, write_demo_corpus

    files = write_demo_corpus(tmp_path / "corpus")
    assert sum(f.stat().st_size for f in files) < 4_000_000
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "data"
    cmd = [
        sys.executable,
        "-m",
        "data_prep.build",
        "corpus=demo",
        f"corpus.root={tmp_path / 'corpus'}",
        f"output_dir={out}",
        "workers=2",
    ]
    built = subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    checked = subprocess.run(
        [sys.executable, "-m", "data_prep.verify", str(out)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    names = {s["name"]: s for s in manifest["sources"]}
    # Off a terminal (a batch job's log), progress is plain lines, no carriage-return redraws.
    assert "\r" not in built.stderr + checked.stderr
    for name, source in names.items():
        counts = f"docs {source['documents_written']}, tokens {source['tokens']}"
        assert any(
            line.startswith(f"{name}: ") and counts in line for line in built.stderr.splitlines()
        )
    assert "verify: " in checked.stderr and " (100.0 %), " in checked.stderr
    assert names["stdlib_code"]["documents_written"] > 10
    assert names["cjk"]["documents_written"] == len(cjk_texts())


def test_groups_close_at_the_shard_size(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", docs(200))
    m = build(cfg(tmp_path / "out", [src], shard_size_tokens=1000, val_fraction=0.3))
    groups: dict[str, int] = {}
    for s in m["shards"]:
        group = s["prefix"].rsplit("_", 1)[1]
        groups[group] = groups.get(group, 0) + s["tokens"]
    sizes = [groups[g] for g in sorted(groups)]
    longest = max(len(x) for x in megatron_docs(tmp_path / "out", m, "a", "train"))
    assert all(1000 <= t < 1000 + longest for t in sizes[:-1])
    assert 0 < sizes[-1] < 1000 + longest


def test_python_tokenizer_engine_builds_the_same_bytes(tmp_path, tok):
    if tok.backend != "cpp":
        pytest.skip("no compiled core here (REQUIRE_CPP_OPS=1 turns this into a failure)")
    src = write_jsonl(tmp_path / "a.jsonl", docs(40))
    build(cfg(tmp_path / "cpp", [src], tokenizer_backend="cpp"))
    build(cfg(tmp_path / "py", [src], tokenizer_backend="python"))
    assert read_all(tmp_path / "cpp") == read_all(tmp_path / "py")


def test_build_demo_data_helper(tmp_path):
    from data_prep.demo_corpus import build_demo_data

    data = build_demo_data(tmp_path / "demo", workers=1)
    manifest = json.loads((data / "manifest.json").read_text())
    assert {s["split"] for s in manifest["shards"]} == {"train", "val"}
    assert build_demo_data(tmp_path / "demo", workers=1) == data  # a rerun resumes


def test_rejects_after_a_group_closes_mid_batch_are_counted(tmp_path):
    """Every document closes a group here (shard_size_tokens=1), so groups close in the middle
    of each batch: the rejects after that are still counted, whatever the batch size."""
    src = tmp_path / "rej.jsonl"
    lines = ['{"text": "hello"}', '{"text": ""}', '{"text": "world"}', '{"x": 1}', "[1]"]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifests = [
        build(cfg(tmp_path / f"b{n}", [src], shard_size_tokens=1, batch_records=n))
        for n in (1, 2, 4096)
    ]
    assert verify(tmp_path / "b4096") == []
    rejected = {"empty_document": 1, "missing_text_field": 1, "not_a_json_object": 1}
    assert manifests[-1]["sources"][0]["rejected"] == rejected
    assert manifests[0] == manifests[1] == manifests[2]


def test_shuffle_keeps_the_pieces_of_a_split_document_together(tmp_path, tok):
    """Shuffling moves whole documents: a long document's pieces (only the last ends in 0)
    stay together and in order, so no piece runs into an unrelated document."""
    texts = [f"word{i} " * (500 if i % 3 == 0 else 30) for i in range(20)]
    src = write_jsonl(tmp_path / "long.jsonl", texts)
    kw = dict(val_fraction=0.0, max_doc_tokens=100)
    plain = build(cfg(tmp_path / "plain", [src], **kw))
    m = build(cfg(tmp_path / "shuf", [src], shuffle=True, seed=1, **kw))
    assert verify(tmp_path / "shuf") == []
    pieces = megatron_docs(tmp_path / "shuf", m, "long", "train")
    assert pieces != megatron_docs(tmp_path / "plain", plain, "long", "train")
    whole: list[list[int]] = [[]]
    for piece in pieces:
        whole[-1] += piece
        if piece[-1] == 0:
            whole.append([])
    assert whole.pop() == []
    assert sorted(whole) == sorted([*tok.encode(t), 0] for t in texts)
    assert m["sources"][0]["documents_split"] == 7


def test_a_build_deletes_only_what_a_build_writes(tmp_path):
    """Other files in output_dir survive a rerun and overwrite=true (a killed run's shard
    temporaries do not), and overwrite=true on a folder holding no build is refused."""
    src = write_jsonl(tmp_path / "a.jsonl", docs(10))
    out = tmp_path / "out"
    out.mkdir()
    mine = {"my_model.bin": b"weights", "my_model.idx": b"index", "notes.tmp": b"draft"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    with pytest.raises(BuildError, match="holds no build to replace but other files"):
        build(cfg(out, [src], overwrite=True))
    assert not (out / ".state").exists()
    build(cfg(out, [src]))
    (out / "a_train_00003.bin.tmp").write_bytes(b"left by a killed run")
    build(cfg(out, [src]))
    assert not (out / "a_train_00003.bin.tmp").exists()
    (out / "a_val_00009.idx").write_bytes(b"a shard of the old build, not in the manifest")
    m = build(cfg(out, [src], seed=5, overwrite=True))
    assert not (out / "a_val_00009.idx").exists()
    assert {name: (out / name).read_bytes() for name in mine} == mine
    built = {p.name for p in out.iterdir()} - set(mine) - {"manifest.json", ".state"}
    assert built == {f"{s['prefix']}{ext}" for s in m["shards"] for ext in (".bin", ".idx")}


def test_merge_refuses_parts_of_other_inputs(tmp_path):
    """Parts built from other inputs (or from an input that changed between them) do not
    belong together, though their manifests' settings agree: merge names what differs."""
    a = [write_jsonl(tmp_path / f"a{i}.jsonl", docs(10, i)) for i in range(2)]
    b = write_jsonl(tmp_path / "b.jsonl", docs(10, 5))

    def part(i: int, pattern: str) -> None:
        corpus = {"sources": [{"name": "web", "paths": [str(tmp_path / pattern)]}]}
        out = tmp_path / "parts" / f"part_{i}"
        build(cfg(out, [], corpus=corpus, shard_index=i, num_shards=2, overwrite=True))

    part(0, "a*.jsonl")
    part(1, "b.jsonl")
    with pytest.raises(MergeError, match=r"part_1: built with other .*inputs added: .*b.jsonl"):
        merge(tmp_path / "parts")
    write_jsonl(a[1], docs(12, 1))  # changed after part 0 was built
    part(1, "a*.jsonl")
    with pytest.raises(MergeError, match=f"input {a[1]} changed since"):
        merge(tmp_path / "parts")
    part(0, "a*.jsonl")
    assert merge(tmp_path / "parts")["sources"][0]["documents_in"] == 22
    assert verify(tmp_path / "parts") == [] and b.exists()


def test_input_mistakes_are_one_clear_error(tmp_path):
    """Inputs that cannot be read as given, and impossible settings, name what is wrong in an
    error the command line turns into one line and exit status 2 (no traceback)."""
    import datasets

    good = write_jsonl(tmp_path / "good.jsonl", docs(3))
    (tmp_path / "table.csv").write_text("text\nhello\n", encoding="utf-8")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", docs(2))
    (mixed / "b.txt").write_text("text", encoding="utf-8")
    datasets.Dataset.from_dict({"text": docs(3)}).save_to_disk(str(tmp_path / "hfdisk"))
    cases = [
        ([tmp_path / "table.csv"], {}, "table.csv: unknown input format"),
        ([mixed / "*"], {}, r"inputs of several formats \['jsonl', 'text'\]"),
        ([mixed], {}, "mixed: a folder input must be a datasets save_to_disk folder"),
        ([tmp_path / "hfdisk"], {"text_field": "nope"}, "has no column 'nope'"),
        ([good], {"tokenizer_backend": "rust"}, "tokenizer_backend must be auto, cpp or python"),
        ([good], {"batch_records": 0}, "batch_records, batch_bytes and in_flight_per_worker"),
        (
            [],
            {"corpus": {"sources": [{"name": "a", "paths": [str(good)], "format": "jsnol"}]}},
            r"corpus source 0 \(a\): format 'jsnol' is none of",
        ),
    ]
    for inputs, kw, message in cases:
        with pytest.raises((BuildError, BadInputError), match=message):
            build(cfg(tmp_path / "out", inputs, **kw))


def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path):
    """What fails before the build starts (Hydra's run folder lives in output_dir, settings
    are checked against BuildConfig) is one line too, not a traceback."""
    good = write_jsonl(tmp_path / "good.jsonl", docs(3))
    (tmp_path / "a_file").write_text("not a folder", encoding="utf-8")
    cases = [
        ([], "output_dir=DIR is required"),
        ([f"output_dir={tmp_path / 'a_file'}"], "a_file is a file, not a folder"),
        ([f"output_dir={tmp_path / 'a_file' / 'out'}"], "a_file/out cannot be created"),
        ([f"output_dir={tmp_path / 'out'}", "+val_fracton=0.1"], "val_fracton: no such setting"),
    ]
    for args, message in cases:
        cmd = [sys.executable, "-m", "data_prep.build", f"inputs=[{good}]", *args]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        output = (done.stdout + done.stderr).strip()
        assert done.returncode == 2 and "Traceback" not in output, output
        assert message in output.splitlines()[-1], output


@pytest.mark.parametrize(
    "source,kw,message",
    [
        ({"val_fraction": 1.5}, {}, r"source 0 \(a\): val_fraction must be in \[0, 1\), not 1.5"),
        ({"val_fraction": -0.5}, {}, r"val_fraction must be in \[0, 1\), not -0.5"),
        ({"name": "web/sub"}, {}, "source 0: name 'web/sub' must be letters, digits"),
        ({"name": ".hidden"}, {}, "source 0: name '.hidden' must be"),
        ({}, {"workers": 0}, "workers must be positive"),
        ({}, {"workers": -2}, "workers must be positive"),
        ({}, {"batch_bytes": -1}, "batch_bytes"),
    ],
)
def test_impossible_values_are_refused(tmp_path, source, kw, message):
    good = write_jsonl(tmp_path / "good.jsonl", docs(3))
    corpus = {"sources": [{"name": "a", "paths": str(good), **source}]}
    with pytest.raises(BuildError, match=message):
        build(cfg(tmp_path / "out", [], corpus=corpus, **kw))
    assert not (tmp_path / "out").exists()


def test_a_corpus_source_may_give_one_path_as_a_string(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", docs(3))
    corpus = {"sources": [{"name": "a", "paths": str(good), "val_fraction": 0.0}]}
    assert build(cfg(tmp_path / "out", [], corpus=corpus))["total_documents"] == 3


def test_upper_case_extensions_are_decompressed(tmp_path, tok):
    texts = docs(5)
    inputs = []
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        inputs.append(write_jsonl(tmp_path / name, texts).rename(tmp_path / name.upper()))
    m = build(cfg(tmp_path / "out", inputs, val_fraction=0.0))
    for source in m["sources"]:
        assert source["documents_written"] == 5 and source["rejected"] == {}, source
    assert megatron_docs(tmp_path / "out", m, "A.JSONL.GZ", "train") == [
        [*tok.encode(t), 0] for t in texts
    ]


def test_help_lists_the_build_settings_only():
    """--help shows data_prep.build's settings, not the training config groups beside them."""
    cmd = [sys.executable, "-m", "data_prep.build", "--help"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert "corpus=NAME reads the sources of conf/corpus/NAME.yaml" in done.stdout
    assert "output_dir: ???" in done.stdout and "long_docs: split" in done.stdout
    assert "deepspeed" not in done.stdout and "experiment" not in done.stdout
