"""Parity with the `rwkv` PyPI package (ChatRWKV's inference code) as an independent oracle.

Our state_dict, saved as an fp32 .pth, must load in `rwkv.model.RWKV` unchanged, and the
package's full-sequence logits, its recurrent state and one further RNN step must agree with
ours. Every parameter is perturbed away from its init first: zero-initialised projections would
make whole branches vanish and hide bugs in them.
"""

import importlib
import os
import sys

import pytest
import torch
from model_utils import build, rel_err, tiny_config

from rwkv_train.model import RWKV

TOL = 1e-4


@pytest.fixture(scope="module")
def rwkv_package():
    """`rwkv.model` imported in plain-PyTorch CPU mode (no JIT, no CUDA, not the v7 class).

    The package reads these variables at import time (and RWKV_CUDA_ON again in forward), so
    they are set before the import and left set for the module; a copy imported earlier with
    other settings is reloaded.
    """
    saved = {k: os.environ.get(k) for k in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_V7_ON")}
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    os.environ.pop("RWKV_V7_ON", None)
    module = importlib.import_module("rwkv.model")
    if module.RWKV.__name__ != "RWKV" or os.environ["RWKV_JIT_ON"] != "0":
        module = importlib.reload(sys.modules["rwkv.model"])
    yield module
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _package_state(state: list[torch.Tensor], version: int, layer: int) -> list[torch.Tensor]:
    """The package's per-layer state in our layout: [att shift, wkv, ffn shift]."""
    if version == 4:
        att, aa, bb, pp, ffn = state[5 * layer : 5 * layer + 5]
        return [att, torch.stack([aa, bb, pp]), ffn]
    return list(state[3 * layer : 3 * layer + 3])


def _check_parity(model: RWKV, rwkv_package, tmp_path) -> None:
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    oracle = rwkv_package.RWKV(model=str(path), strategy="cpu fp32", verbose=False)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (23,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, state = model.forward_with_state(tokens[None], None)
        theirs, their_state = oracle.forward(tokens.tolist(), None, full_output=True)
        assert rel_err(ours[0], theirs) < TOL
        for layer in range(cfg.n_layer):
            expected = _package_state(their_state, cfg.version, layer)
            for ours_s, theirs_s in zip(state[3 * layer : 3 * layer + 3], expected, strict=True):
                if cfg.version == 4 and ours_s.dim() == 3:
                    # pp is a log-scale: compare it absolutely, aa and bb relatively
                    assert rel_err(ours_s[0, :2], theirs_s[:2]) < TOL
                    assert (ours_s[0, 2] - theirs_s[2]).abs().max() < 1e-3
                else:
                    assert rel_err(ours_s[0], theirs_s.reshape(ours_s[0].shape)) < TOL
        # one more token in RNN mode, from both states (the package's single-token path)
        nxt = [7]
        ours1, _ = model.forward_with_state(torch.tensor([nxt]), state)
        theirs1, _ = oracle.forward(nxt, their_state)
        assert rel_err(ours1[0, 0], theirs1) < TOL


@pytest.mark.parametrize(
    "version,overrides",
    [
        (6, {}),
        (6, {"mix_lora_dim": 64, "decay_lora_dim": 128}),
        (5, {}),
        (5, {"head_size": 32}),
        (4, {}),
    ],
    ids=["v6", "v6-lora64-128", "v5", "v5-head32", "v4"],
)
def test_parity_with_rwkv_package(version, overrides, rwkv_package, tmp_path):
    model = build(tiny_config(version, **overrides), seed=version)
    _check_parity(model, rwkv_package, tmp_path)
