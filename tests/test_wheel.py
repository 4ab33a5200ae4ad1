"""A non-editable install carries conf/ and cuda/ and works from any folder."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import pathlib, sys, torch
import rwkv_train
from rwkv_train.paths import conf_dir, cuda_dir
from rwkv_train.model import RWKV, RWKVConfig
scratch = pathlib.Path(sys.argv[1]).resolve()
for p in (pathlib.Path(rwkv_train.__file__), conf_dir(), cuda_dir()):
    assert scratch in p.resolve().parents, f"{p} is not from the installed wheel"
assert (conf_dir() / "model" / "finch_debug.yaml").is_file()
assert any(cuda_dir().glob("*.cu"))
model = RWKV(RWKVConfig(version=6, n_layer=1, n_embd=64, head_size=32, vocab_size=100,
                        wkv_backend="torch"))
logits = model(torch.randint(0, 100, (1, 5)))
assert logits.shape == (1, 5, 100) and torch.isfinite(logits).all()
print("wheel ok")
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_and_runs_outside_the_repo(tmp_path: Path) -> None:
    # Build from a copy, so the build leaves nothing behind in the checkout.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "runs", "*_out"),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
    )
    (wheel,) = dist.glob("rwkv_train-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rwkv_train/conf/model/finch_debug.yaml" in names
    assert any(n.startswith("rwkv_train/cuda/") and n.endswith(".cu") for n in names)

    # A fresh virtual environment that sees this environment's dependencies (torch, ...)
    # but not the editable install of the project.
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    env_python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
        check=True,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run(
        [str(env_python), "-c", SCRIPT, str(site)],
        cwd=outside,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wheel ok" in result.stdout
