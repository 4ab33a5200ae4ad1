"""A small real corpus from files every Python installation has, for the demo and CI.

Three sources, about 2 MB in all, described by conf/corpus/demo.yaml:
- stdlib_code.jsonl.zst: standard-library modules, one JSON line per file (code, English);
- stdlib_docs.jsonl: the docstrings of those modules, one line per module (prose);
- cjk/*.txt: the UTF-8 Chinese, Japanese and Korean texts the standard library's codec tests
  ship (test/cjkencodings), one document per file. Some distributions strip the test package;
  the source is then empty and the demo says so.
The files are chosen in sorted order, so a given Python version always gives the same corpus.
`build_demo_data` writes it, packs it into shards with conf/corpus/demo.yaml and verifies them.
"""

from __future__ import annotations

import ast
import json
import logging
import sysconfig
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CODE_BYTES = 1_500_000
DOC_BYTES = 400_000


def stdlib_dir() -> Path:
    """The standard library of the running interpreter (the base one inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def cjk_texts() -> list[Path]:
    """The UTF-8 CJK test texts, or [] when this Python has no test package."""
    folder = stdlib_dir() / "test" / "cjkencodings"
    return sorted(folder.glob("*-utf8.txt")) if folder.is_dir() else []


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree, *ast.walk(tree)]
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(n) for n in nodes if isinstance(n, kinds)]
    return "\n\n".join(dict.fromkeys(d for d in docs if d))


def _write(path: Path, data: bytes) -> None:
    """Write a file unless it already holds these bytes: an unchanged input keeps its
    modification time, so a rerun resumes the build (which checks its inputs' times)."""
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)


def write_demo_corpus(out_dir: str | Path) -> list[Path]:
    """Write the demo corpus under out_dir and return the files written."""
    import zstandard

    out = Path(out_dir)
    (out / "cjk").mkdir(parents=True, exist_ok=True)
    code_lines, doc_lines = [], []
    code_size = doc_size = 0
    for path in sorted(stdlib_dir().glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if code_size < CODE_BYTES:
            code_lines.append(json.dumps({"text": text, "path": path.name}, ensure_ascii=False))
            code_size += len(text)
        docs = _docstrings(text)
        if docs and doc_size < DOC_BYTES:
            doc_lines.append(json.dumps({"text": docs, "module": path.stem}, ensure_ascii=False))
            doc_size += len(docs)
        if code_size >= CODE_BYTES and doc_size >= DOC_BYTES:
            break
    code_path = out / "stdlib_code.jsonl.zst"
    data = ("\n".join(code_lines) + "\n").encode("utf-8")
    _write(code_path, zstandard.ZstdCompressor(level=3).compress(data))
    doc_path = out / "stdlib_docs.jsonl"
    _write(doc_path, ("\n".join(doc_lines) + "\n").encode("utf-8"))
    written = [code_path, doc_path]
    texts = cjk_texts()
    if not texts:
        log.warning("no test/cjkencodings in %s: the demo corpus has no CJK text", stdlib_dir())
    for src in texts:
        dst = out / "cjk" / f"{src.stem}.txt"
        _write(dst, src.read_bytes())
        written.append(dst)
    return written


def demo_corpus_config(root: str | Path) -> dict[str, Any]:
    """conf/corpus/demo.yaml with its paths pointed at `root` (no Hydra needed)."""
    from omegaconf import OmegaConf

    from rwkv_train.paths import conf_dir

    cfg = OmegaConf.create({"corpus": OmegaConf.load(conf_dir() / "corpus" / "demo.yaml")})
    cfg.corpus.root = str(root)
    return OmegaConf.to_container(cfg, resolve=True)["corpus"]  # type: ignore[index,return-value]


def build_demo_data(
    out_dir: str | Path, workers: int | None = None, progress: bool = False
) -> Path:
    """Write the demo corpus to OUT/corpus, build OUT/data from it, verify; returns OUT/data.

    Rerunning resumes (nothing to do when the shards are complete).
    """
    from data_prep.build import BuildConfig, build
    from data_prep.verify import verify

    out = Path(out_dir)
    write_demo_corpus(out / "corpus")
    data = out / "data"
    cfg = BuildConfig(
        output_dir=str(data),
        corpus=demo_corpus_config(out / "corpus"),
        workers=workers,
        progress=progress,
    )
    build(cfg)
    problems = verify(data)
    if problems:
        raise RuntimeError("demo data failed verification: " + "; ".join(problems))
    return data
