"""The README's main command, in its short mode: data prep, training, export and sampling."""

import subprocess
import sys
from pathlib import Path

import pytest

import rwkv_train


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_quick_runs_end_to_end(tmp_path: Path) -> None:
    root = Path(rwkv_train.__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "rwkv_train.demo", "--quick", "--out", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for step in ("1/4 data", "2/4 train", "3/4 export", "4/4 sample", "== done"):
        assert step in out
    assert (tmp_path / "data" / "manifest.json").is_file()
    assert (tmp_path / "demo-quick.pth").stat().st_size > 1_000_000
    assert "loss " in out and "validation loss " in out
