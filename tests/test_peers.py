"""Peers through their own packages, checked against what their formats are documented to do."""
import pytest
import torch
from torch import nn

from pt2llm import peers


def _tq_reference(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp's TQ1_0/TQ2_0 rule, independently: per 256 weights of a row, d = max|x|
    stored in fp16, codes round(x / d) in {-1, 0, 1}; a short tail padded with zeros."""
    out_f, in_f = w.shape
    pad = -(-in_f // 256) * 256
    x = torch.zeros(out_f, pad, dtype=torch.float64)
    x[:, :in_f] = w.double()
    blocks = x.reshape(out_f, -1, 256)
    d = blocks.abs().amax(-1, keepdim=True)
    codes = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0).clamp(-1, 1)
    deq = codes * d.half().double()
    return deq.reshape(out_f, pad)[:, :in_f]


@pytest.mark.parametrize("kind,bits", [("TQ1_0", 1.6875), ("TQ2_0", 2.0625)])
@pytest.mark.parametrize("in_f", [512, 576])  # 576 = 2.25 blocks of 256: padded
def test_gguf_ternary_roundtrip(kind, bits, in_f, gen):
    w = torch.randn(8, in_f, generator=gen)
    deq, nbytes = peers.gguf_roundtrip(w, kind)
    ref = _tq_reference(w)
    # the reference rounds half away from zero like ggml's nearest_int; ties are measure-zero here
    assert torch.allclose(deq.double(), ref, rtol=1e-3, atol=1e-6)
    levels = {round(v, 6) for v in (deq[0, :256] / ref[0, :256].abs().max()).tolist()}
    assert levels <= {-1.0, 0.0, 1.0}
    assert nbytes * 8 == pytest.approx(bits * 8 * (-(-in_f // 256) * 256))


def test_gguf_ternary_on_a_model_counts_padding():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(576, 64)
            self.b = nn.Linear(256, 32)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    m = Model()
    before = m.layers[0].a.weight.detach().clone()
    bpw = peers.gguf_ternary(m, "TQ1_0", progress=False)
    weights = 2 * (576 * 64 + 256 * 32)
    stored_bits = 2 * (768 * 64 + 256 * 32) * 1.6875
    assert bpw == pytest.approx(stored_bits / weights)
    assert torch.allclose(m.layers[0].a.weight.double(), _tq_reference(before), rtol=1e-3, atol=1e-6)


def test_hqq_two_bit_groups(gen):
    pytest.importorskip("hqq")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(128, 16, bias=False))])

    m = Model()
    w = torch.randn(16, 128, generator=gen)
    m.layers[0][0].weight.data.copy_(w)
    bpw = peers.hqq(m, bits=2, group_size=64, progress=False)
    assert bpw == pytest.approx(2 + 32 / 64)  # 2-bit codes + fp16 scale and zero per 64
    deq = m.layers[0][0].weight.data
    for g in deq.reshape(-1, 64):  # at most 4 levels per group
        assert len(torch.unique(g)) <= 4
    rel = ((deq - w).pow(2).mean() / w.pow(2).mean()).item()
    assert rel < 0.3
