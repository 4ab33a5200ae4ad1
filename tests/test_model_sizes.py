"""Every conf/model file, checked against the reference document rather than the model code.

The expected sizes, keys and shapes below are written out from the reference tables (model
sizes, the .pth layout, the init formulas); the model is only built (on the meta device for
the big sizes) and compared with them.
"""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rwkv_train.model import RWKV, RWKVConfig
from rwkv_train.paths import conf_dir

# name: (version, L, C, F, mix LoRA m, decay LoRA d). F = floor(3.5C/32)*32 (v5/v6) or 4C (v4).
SIZES = {
    "eagle_0.4b": (5, 24, 1024, 3584, 32, 64),
    "eagle_1.5b": (5, 24, 2048, 7168, 32, 64),
    "eagle_3b": (5, 32, 2560, 8960, 32, 64),
    "eagle_7b": (5, 32, 4096, 14336, 32, 64),
    "finch_1.6b": (6, 24, 2048, 7168, 32, 64),
    "finch_3b": (6, 32, 2560, 8960, 32, 64),
    "finch_7b": (6, 32, 4096, 14336, 64, 128),
    "finch_14b": (6, 61, 4096, 14336, 64, 128),
    "rwkv4_169m": (4, 12, 768, 3072, 32, 64),
    "rwkv4_430m": (4, 24, 1024, 4096, 32, 64),
    "rwkv4_1.5b": (4, 24, 2048, 8192, 32, 64),
    "rwkv4_3b": (4, 32, 2560, 10240, 32, 64),
    "rwkv4_7b": (4, 32, 4096, 16384, 32, 64),
    "rwkv4_14b": (4, 40, 5120, 20480, 32, 64),
    "finch_debug": (6, 2, 128, 448, 32, 64),
    "eagle_debug": (5, 2, 128, 448, 32, 64),
    "rwkv4_debug": (4, 2, 128, 512, 32, 64),
}

# The .pth layout. Shapes are expressions in C, F, H, N, V, m (mix LoRA) and d (decay LoRA).
TOP = {
    "emb.weight": "V,C",
    "blocks.0.ln0.weight": "C",
    "blocks.0.ln0.bias": "C",
    "ln_out.weight": "C",
    "ln_out.bias": "C",
    "head.weight": "V,C",
}
BLOCK_COMMON = {
    "ln1.weight": "C",
    "ln1.bias": "C",
    "ln2.weight": "C",
    "ln2.bias": "C",
    "att.receptance.weight": "C,C",
    "att.key.weight": "C,C",
    "att.value.weight": "C,C",
    "att.output.weight": "C,C",
    "ffn.key.weight": "F,C",
    "ffn.receptance.weight": "C,C",
    "ffn.value.weight": "C,F",
}
BLOCK = {
    6: {
        **{f"att.time_maa_{i}": "1,1,C" for i in "xwkvrg"},
        "att.time_maa_w1": "C,5*m",
        "att.time_maa_w2": "5,m,C",
        "att.time_decay": "1,1,C",
        "att.time_decay_w1": "C,d",
        "att.time_decay_w2": "d,C",
        "att.time_faaaa": "H,N",
        "att.gate.weight": "C,C",
        "att.ln_x.weight": "C",
        "att.ln_x.bias": "C",
        "ffn.time_maa_k": "1,1,C",
        "ffn.time_maa_r": "1,1,C",
    },
    5: {
        **{f"att.time_mix_{i}": "1,1,C" for i in "kvrg"},
        "att.time_decay": "H,N",
        "att.time_faaaa": "H,N",
        "att.gate.weight": "C,C",
        "att.ln_x.weight": "C",
        "att.ln_x.bias": "C",
        "ffn.time_mix_k": "1,1,C",
        "ffn.time_mix_r": "1,1,C",
    },
    4: {
        **{f"att.time_mix_{i}": "1,1,C" for i in "kvr"},
        "att.time_decay": "C",
        "att.time_first": "C",
        "ffn.time_mix_k": "1,1,C",
        "ffn.time_mix_r": "1,1,C",
    },
}


def expected_table(version: int, L: int, C: int, F: int, m: int, d: int, V: int) -> dict:
    """{key: shape} of the reference layout for one size."""
    dims = {"C": C, "F": F, "H": C // 64, "N": 64, "V": V, "m": m, "d": d}

    def shape(expr: str) -> tuple[int, ...]:
        return tuple(int(eval(part, {}, dims)) for part in expr.split(","))

    table = {key: shape(expr) for key, expr in TOP.items()}
    for layer in range(L):
        for key, expr in {**BLOCK_COMMON, **BLOCK[version]}.items():
            table[f"blocks.{layer}.{key}"] = shape(expr)
    return table


def load_conf(name: str) -> RWKVConfig:
    return RWKVConfig(**OmegaConf.load(Path(conf_dir()) / "model" / f"{name}.yaml"))


def test_conf_files_are_exactly_the_listed_sizes():
    assert {p.stem for p in (Path(conf_dir()) / "model").glob("*.yaml")} == set(SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_conf_file_builds_on_meta_with_the_reference_layout(name):
    version, L, C, F, m, d = SIZES[name]
    raw = OmegaConf.to_container(OmegaConf.load(Path(conf_dir()) / "model" / f"{name}.yaml"))
    assert set(raw) == set(RWKVConfig.__dataclass_fields__), "keys must be the config fields"
    cfg = load_conf(name)
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (version, L, C, 65536)
    with torch.device("meta"):
        model = RWKV(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_table(version, L, C, F, m, d, 65536)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_params() == sum(math.prod(s) for s in got.values())
    # the reference's rule of thumb: about 13 C^2 per layer + 2 V C
    assert abs(n / (13 * L * C * C + 2 * 65536 * C) - 1) < 0.03


def test_published_totals():
    """Finch 1.6B is about 1.31B (13 C^2 per layer) + 0.27B (2 V C), 1.60B with the LoRAs and
    vectors; RWKV-4 169M only comes out with the Pile vocabulary."""
    finch = load_conf("finch_1.6b")
    assert 2 * finch.vocab_size * finch.n_embd == pytest.approx(0.27e9, rel=0.01)
    assert finch.num_params() == pytest.approx(1.6e9, rel=0.01)
    pile = RWKVConfig(**{**load_conf("rwkv4_169m").to_dict(), "vocab_size": 50277})
    assert pile.num_params() == pytest.approx(169e6, rel=0.01)


# ---------------------------------------------------------------------- init statistics
def ramps(C: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = torch.arange(C, dtype=torch.float64)
    return n / C, n / (C - 1), ((n + 1) % 3) - 1  # d_n, e_n, zigzag


def ratios(layer: int, L: int) -> tuple[float, float]:
    return (layer / (L - 1) if L > 1 else 0.0), 1 - layer / L


def close(t: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(t.double().flatten(), expected.double().flatten(), atol=1e-6)


def orthogonal_with_gain(w: torch.Tensor, gain: float) -> bool:
    w = w.double()
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T  # the small side is orthonormal
    return torch.allclose(gram, gain**2 * torch.eye(gram.shape[0], dtype=w.dtype), atol=1e-4)


@pytest.mark.parametrize("L", [1, 3])
def test_init_statistics_v6(L):
    C, V = 128, 300
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(version=6, n_layer=L, n_embd=C, vocab_size=V))
    dn, en, zz = ramps(C)
    for layer, block in enumerate(model.blocks):
        r0, r1 = ratios(layer, L)
        att, ffn = block.att, block.ffn
        for name in "xwk":
            assert close(getattr(att, f"time_maa_{name}"), 1 - dn**r1)
        assert close(att.time_maa_v, 1 - (dn**r1 + 0.3 * r0))
        assert close(att.time_maa_r, 1 - dn ** (0.5 * r1))
        assert close(att.time_maa_g, 1 - dn ** (0.5 * r1))
        decay = -6 + 5 * en ** (0.7 + 1.3 * r0)
        assert close(att.time_decay, decay)
        assert decay[0] == -6 and abs(decay[-1] + 1) < 1e-12  # range [-6, -1] in every layer
        assert close(att.time_faaaa, r0 * (1 - en) + 0.1 * zz)
        assert not att.time_maa_w1.any() and not att.time_decay_w1.any()
        for w2 in (att.time_maa_w2, att.time_decay_w2):
            assert w2.abs().max() <= 0.01 and w2.std() > 0.004  # U(-0.01, 0.01)
        assert close(att.ln_x.weight, torch.full((C,), ((layer + 1) / L) ** 0.7))
        assert not att.ln_x.bias.any()
        assert att.ln_x.eps == pytest.approx(64e-5)
        for zero in (att.output, ffn.value, ffn.receptance):
            assert not zero.weight.any()
        assert orthogonal_with_gain(att.receptance.weight, 1.0)
        assert orthogonal_with_gain(att.value.weight, 1.0)
        assert orthogonal_with_gain(att.key.weight, 0.1)
        assert orthogonal_with_gain(att.gate.weight, 0.1)
        assert orthogonal_with_gain(ffn.key.weight, math.sqrt(448 / C))  # tall: sqrt(F/C)
        assert close(ffn.time_maa_k, 1 - dn**r1) and close(ffn.time_maa_r, 1 - dn**r1)
        for ln in (block.ln1, block.ln2):
            assert (ln.weight == 1).all() and not ln.bias.any()
    assert model.emb.weight.abs().max() <= 1e-4 and model.emb.weight.std() > 4e-5
    assert orthogonal_with_gain(model.head.weight, 0.5 * math.sqrt(V / C))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("L", [1, 3])
def test_init_statistics_v5(L):
    C, V = 128, 100  # V < C: head gain 0.5
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(version=5, n_layer=L, n_embd=C, vocab_size=V))
    dn, en, zz = ramps(C)
    for layer, block in enumerate(model.blocks):
        r0, r1 = ratios(layer, L)
        att, ffn = block.att, block.ffn
        assert close(att.time_mix_k, dn**r1)
        assert close(att.time_mix_v, dn**r1 + 0.3 * r0)
        assert close(att.time_mix_r, dn ** (0.5 * r1)) and close(att.time_mix_g, dn ** (0.5 * r1))
        assert att.time_decay.shape == (2, 64)
        assert close(att.time_decay, -6 + 5 * en ** (0.7 + 1.3 * r0))
        assert close(att.time_faaaa, r0 * (1 - en) + 0.1 * zz)
        assert close(att.ln_x.weight, torch.full((C,), ((layer + 1) / L) ** 0.7))
        assert att.ln_x.eps == pytest.approx(1e-5)
        for zero in (att.output, ffn.value, ffn.receptance):
            assert not zero.weight.any()
        for gain1 in (att.receptance, att.key, att.value, att.gate):
            assert orthogonal_with_gain(gain1.weight, 1.0)
        assert close(ffn.time_mix_k, dn**r1) and close(ffn.time_mix_r, dn**r1)
    assert orthogonal_with_gain(model.head.weight, 0.5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("L", [1, 3])
def test_init_statistics_v4(L):
    C, V = 128, 300
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(version=4, n_layer=L, n_embd=C, vocab_size=V))
    dn, en, zz = ramps(C)
    for layer, block in enumerate(model.blocks):
        r0, r1 = ratios(layer, L)
        att, ffn = block.att, block.ffn
        decay = -5 + 8 * en ** (0.7 + 1.3 * r0)
        assert close(att.time_decay, decay) and decay[0] == -5 and abs(decay[-1] - 3) < 1e-12
        assert close(att.time_first, math.log(0.3) + 0.5 * zz)
        assert close(att.time_mix_k, dn**r1) and close(att.time_mix_v, dn**r1 + 0.3 * r0)
        assert close(att.time_mix_r, dn ** (0.5 * r1))
        for zero in (att.key, att.receptance, att.output, ffn.value, ffn.receptance):
            assert not zero.weight.any()
        assert orthogonal_with_gain(att.value.weight, 1.0)
        assert orthogonal_with_gain(ffn.key.weight, 2.0)
        assert close(ffn.time_mix_k, dn**r1) and close(ffn.time_mix_r, dn**r1)
    assert orthogonal_with_gain(model.head.weight, 0.5 * math.sqrt(V / C))
    assert all(torch.isfinite(p).all() for p in model.parameters())
