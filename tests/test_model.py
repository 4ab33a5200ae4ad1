"""The model API: config validation, equivalence of the parallel, chunked and RNN modes, batch
independence, meta-device initialisation, bf16 autocast and gradient checkpointing."""

import dataclasses

import pytest
import torch
from model_utils import build, rel_err, tiny_config

from rwkv_train.model import RWKV, RWKVConfig

VERSIONS = [4, 5, 6]


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"version": 7}, "version"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_embd": 100}, "n_embd"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"head_size": 0}, "head_size"),
        ({"dim_ffn": 0}, "dim_ffn"),
        ({"mix_lora_dim": 0}, "mix_lora_dim"),
        ({"wkv_backend": "triton"}, "wkv_backend"),
        ({"n_layer": 2.0}, "n_layer"),
        ({"grad_checkpoint": "yes"}, "grad_checkpoint"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"RWKVConfig.{field}="):
        RWKVConfig(**overrides)


def test_config_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match="n_embed"):
        RWKVConfig.from_dict({"version": 6, "n_embed": 128})
    cfg = RWKVConfig(version=5, n_layer=3, n_embd=256)
    assert RWKVConfig.from_dict(cfg.to_dict()) == cfg


def test_config_v4_ignores_head_size():
    cfg = RWKVConfig(version=4, n_embd=100, head_size=64)
    assert cfg.n_head == 0 and cfg.ffn_dim == 400


def test_derived_ffn_width():
    assert RWKVConfig(version=6, n_embd=2048).ffn_dim == 7168
    assert RWKVConfig(version=5, n_embd=2560).ffn_dim == 8960
    assert RWKVConfig(version=6, n_embd=128, dim_ffn=96).ffn_dim == 96


def test_flops_per_token_is_6n_plus_wkv():
    cfg = RWKVConfig(version=6, n_layer=24, n_embd=2048)
    n = cfg.num_params(embedding=False)
    assert cfg.flops_per_token() == 6 * n + 12 * 24 * 2048 * 64
    assert cfg.num_params() == n + cfg.vocab_size * cfg.n_embd


# ---------------------------------------------------------------------- modes
@pytest.mark.parametrize("version", VERSIONS)
def test_parallel_chunked_and_rnn_modes_agree(version):
    model = build(tiny_config(version, vocab_size=97), seed=version)
    idx = torch.randint(0, 97, (1, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        a, state = model.forward_with_state(idx[:, :17], model.init_state(1))
        b, chunked_state = model.forward_with_state(idx[:, 17:], state)
        chunked = torch.cat([a, b], dim=1)
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = model.forward_with_state(idx[:, t : t + 1], state)
            steps.append(logits)
        rnn = torch.cat(steps, dim=1)
    assert full.shape == (1, 41, 97) and full.dtype == torch.float32
    assert rel_err(chunked, full) < 1e-5
    assert rel_err(rnn, full) < 1e-5
    for s_rnn, s_chunk in zip(state, chunked_state, strict=True):
        assert s_rnn.dtype == torch.float32
        assert rel_err(s_rnn, s_chunk) < 1e-5


@pytest.mark.parametrize("version", VERSIONS)
def test_batch_rows_are_independent(version):
    model = build(tiny_config(version, vocab_size=97), seed=10 + version)
    idx = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched, state = model.forward_with_state(idx, None)
        for row in range(3):
            alone, alone_state = model.forward_with_state(idx[row : row + 1], None)
            assert rel_err(batched[row], alone[0]) < 1e-5
            for s, s1 in zip(state, alone_state, strict=True):
                assert rel_err(s[row], s1[0]) < 1e-5


def test_state_structure_and_input_state_untouched():
    cfg = tiny_config(6, vocab_size=97)
    model = build(cfg)
    state = model.init_state(2)
    assert len(state) == 3 * cfg.n_layer
    assert state[0].shape == (2, 128) and state[1].shape == (2, 2, 64, 64)
    before = [s.clone() for s in state]
    with torch.no_grad():
        model.forward_with_state(torch.zeros(2, 5, dtype=torch.long), state)
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))
    v4_state = RWKV(tiny_config(4, vocab_size=97)).init_state(2)
    assert v4_state[1].shape == (2, 3, 128) and (v4_state[1][:, 2] == -1e30).all()
    with pytest.raises(ValueError, match="3 \\* n_layer"):
        model.forward_with_state(torch.zeros(2, 5, dtype=torch.long), state[:3])


# ---------------------------------------------------------------------- init
@pytest.mark.parametrize("version", VERSIONS)
def test_meta_to_empty_init_equals_eager(version):
    cfg = tiny_config(version, vocab_size=300)
    torch.manual_seed(1234)
    eager = RWKV(cfg)
    with torch.device("meta"):
        lazy = RWKV(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    torch.manual_seed(1234)
    lazy.init_weights()
    ref = eager.state_dict()
    got = lazy.state_dict()
    assert list(got) == list(ref)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_init_weights_resets_a_trained_model():
    cfg = tiny_config(6, vocab_size=300)
    torch.manual_seed(5)
    fresh = RWKV(cfg)
    model = build(cfg, seed=9)  # perturbed
    torch.manual_seed(5)
    model.init_weights()
    for key, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("version", VERSIONS)
def test_every_parameter_gets_a_gradient(version):
    model = build(tiny_config(version, vocab_size=97), seed=2).train()
    idx = torch.randint(0, 97, (2, 9))
    model(idx).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("version", VERSIONS)
def test_grad_checkpoint_gives_the_same_gradients(version):
    cfg = tiny_config(version, vocab_size=97)
    idx = torch.randint(0, 97, (2, 9))
    grads = []
    for ckpt in (False, True):
        model = build(dataclasses.replace(cfg, grad_checkpoint=ckpt), seed=3).train()
        model(idx).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("version", VERSIONS)
def test_bf16_autocast_forward_backward(version):
    model = build(tiny_config(version, vocab_size=97), seed=4).train()
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    assert logits.dtype == torch.float32
    assert rel_err(logits, ref) < 0.1  # bf16 matmuls, fp32 decay and WKV state
    logits.logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        {"version": 6, "mix_lora_dim": 64, "decay_lora_dim": 128},
        {"version": 6, "n_layer": 3, "dim_ffn": 320},
        {"version": 5, "head_size": 32},
        {"version": 4, "vocab_size": 50277},
    ],
)
def test_config_from_state_dict_round_trips(overrides):
    cfg = RWKVConfig(**{"n_layer": 2, "n_embd": 128, "vocab_size": 1000, **overrides})
    with torch.device("meta"):
        sd = RWKV(cfg).state_dict()
    assert RWKVConfig.from_state_dict(sd) == cfg
    assert RWKVConfig.from_state_dict(sd, ctx_len=77).ctx_len == 77


def test_compiled_blocks_match_eager(cpp_ops, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.compile=true: the same logits and gradients (float32, up to the compiler's
    reordered sums) and the same parameter names, so checkpoints and exports do not change.
    Compiled first in a process, the WKV extension loads outside the compiled graphs (its
    loader would break them)."""
    from rwkv_train.ops import backend, loader

    monkeypatch.setattr(loader, "_loaded", {})
    monkeypatch.setattr(backend, "_resolved", {})
    eager = build(tiny_config(6, wkv_backend="cpp")).train()
    compiled = build(tiny_config(6, wkv_backend="cpp", compile=True)).train()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    idx = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    grads = []
    for model in (compiled, eager):
        logits = model(idx)
        logits.square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
        if model is compiled:
            out = logits.detach()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not torch._dynamo.utils.counters["graph_break"]
    assert rel_err(out, logits.detach()) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(grads[0], grads[1], strict=True)) < 2e-4
