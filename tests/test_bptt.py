"""Segmented exact BPTT (rwkv_train/bptt.py): the loss and every gradient of a long sample
equal those of the whole sample, and the forward pass keeps far less memory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from model_utils import build, rel_err, tiny_config

from rwkv_train.bptt import segmented_loss
from rwkv_train.optim import L2Wrap


def whole_loss(net, x, y, l2wrap):
    logits = net(x)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return (L2Wrap.apply(ce, logits, l2wrap) if l2wrap > 0 else ce), ce.detach()


def grads(net, loss):
    net.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("version", [4, 5, 6])
@pytest.mark.parametrize(
    ("segment_len", "grad_checkpoint"), [(16, False), (23, True), (200, False)]
)
def test_segments_give_the_whole_samples_loss_and_gradients(version, segment_len, grad_checkpoint):
    net = build(tiny_config(version, grad_checkpoint=grad_checkpoint)).train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 1000, (2, 64), generator=gen)
    y = torch.randint(0, 1000, (2, 64), generator=gen)
    ref_loss, ref_ce = whole_loss(net, x, y, l2wrap=1e-2)
    ref = grads(net, ref_loss)
    loss, ce = segmented_loss(net, x, y, segment_len, l2wrap=1e-2)
    got = grads(net, loss)
    assert ce.requires_grad is False and ce.shape == (2, 64)
    torch.testing.assert_close(ce.mean(), ref_ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-6, atol=0)
    for name in ref:
        # every block's weights get gradient through the state from later segments
        assert rel_err(got[name], ref[name]) < 2e-5, name


@pytest.mark.parametrize("version", [4, 5, 6])
def test_segments_on_the_fused_cpu_op(cpp_ops, version):
    """The same through the C++ op, whose state gradient is its own backward code."""
    net = build(tiny_config(version, wkv_backend="cpp")).train()
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 1000, (2, 48), generator=gen)
    y = torch.randint(0, 1000, (2, 48), generator=gen)
    ref = grads(net, whole_loss(net, x, y, 0.0)[0])
    got = grads(net, segmented_loss(net, x, y, 13)[0])
    for name in ref:
        assert rel_err(got[name], ref[name]) < 2e-5, name


def test_cut_state_would_change_the_gradient():
    """The comparison above can tell exact BPTT from a cut one: detaching the state between
    segments (truncated BPTT) changes the early-token weights' gradients beyond its bound."""
    net = build(tiny_config(6)).train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 1000, (2, 64), generator=gen)
    y = torch.randint(0, 1000, (2, 64), generator=gen)
    ref = grads(net, whole_loss(net, x, y, 0.0)[0])
    la, state = net.forward_with_state(x[:, :32], None)
    lb, _ = net.forward_with_state(x[:, 32:], [s.detach() for s in state])
    ce = F.cross_entropy(torch.cat([la, lb], 1).flatten(0, 1), y.flatten())
    cut = grads(net, ce)
    assert max(rel_err(cut[n], ref[n]) for n in ref) > 1e-3


def test_no_grad_runs_segments_without_checkpoints_and_keeps_every_token():
    net = build(tiny_config(5)).eval()
    x = torch.randint(0, 1000, (3, 50))
    y = torch.randint(0, 1000, (3, 50))
    with torch.no_grad():
        loss, ce = segmented_loss(net, x, y, 7)
        ref = F.cross_entropy(net(x).transpose(1, 2), y, reduction="none")
    torch.testing.assert_close(ce, ref, rtol=1e-6, atol=0)
    assert loss.grad_fn is None


def test_bad_segment_len():
    net = build(tiny_config(6))
    with pytest.raises(ValueError, match="segment_len"):
        segmented_loss(
            net, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 0
        )


PEAK = textwrap.dedent(
    """
    import json, resource, sys, torch
    from rwkv_train.bptt import segmented_loss
    from rwkv_train.model import RWKV, RWKVConfig
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = RWKVConfig(version=6, n_layer=2, n_embd=64, head_size=32, vocab_size=16384,
                     wkv_backend="torch")
    net = RWKV(cfg).train()
    x = torch.randint(0, 16384, (1, 8192))
    y = torch.randint(0, 16384, (1, 8192))
    segmented_loss(net, x[:, :64], y[:, :64], 32)[0].backward()  # page in torch's code
    net.zero_grad(set_to_none=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss, _ = segmented_loss(net, x, y, int(sys.argv[1]))
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"grew_mib": (after - before) / 1024}))
    """
)


def peak_growth_mib(segment_len: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(segment_len)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["grew_mib"]


def test_segments_bound_the_peak_memory():
    """A forward+backward at T=8192 with a 16384-token vocabulary: the whole sample holds
    (T, V) float32 logits, their softmax and gradient (512 MiB each); 512-token segments
    hold 1/16 of that. Measured: about 1830 MiB against 200 MiB."""
    whole, segmented = peak_growth_mib(8192), peak_growth_mib(512)
    assert whole > 1200, whole
    assert segmented < whole / 4, (segmented, whole)
