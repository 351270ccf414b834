import pytest
import torch

from pt2llm import ternary
from pt2llm.nn import TernaryLinear


def _module(gen, out_f=40, in_f=300, method="pt2", bits=None, bias=True):
    W = torch.randn(out_f, in_f, generator=gen) * 0.05
    X = torch.randn(500, in_f, generator=gen)
    H = 2 * X.T @ X / 500
    r = ternary.quantize_weight(W, H, ternary.make_quantizer(method, bits=bits or 2), reorder="ssr")
    b = torch.randn(out_f, generator=gen) if bias else None
    return r, TernaryLinear.from_result(r, b, bits=bits), b


@pytest.mark.parametrize("method,bits", [("pt2", None), ("gptq", 2), ("gptq", 3)])
def test_dequantize_is_in_original_order_and_forward_matches(method, bits, gen):
    r, mod, b = _module(gen, method=method, bits=bits)
    W = mod.dequantize()
    torch.testing.assert_close(W, r.dequantize(), rtol=0, atol=0)
    x = torch.randn(2, 5, 300, generator=gen)
    torch.testing.assert_close(mod(x), x @ W.T + b.half().float(), rtol=1e-5, atol=1e-5)
    assert mod.alpha.dtype == torch.float16 and mod.alpha.shape == (40, 3)
    assert mod.perm.dtype == torch.int16 and sorted(mod.perm.tolist()) == list(range(300))


def test_state_dict_round_trip(gen):
    _, mod, _ = _module(gen)
    fresh = TernaryLinear(300, 40, True)
    fresh.load_state_dict(mod.state_dict())
    assert torch.equal(fresh.dequantize(), mod.dequantize())


@pytest.mark.parametrize("in_f,limit", [(4096, 1.86), (1536, 1.9), (576, 1.93)])
def test_storage_is_dense(in_f, limit):
    mod = TernaryLinear(in_f, 4096)
    bpw = 8 * mod.storage_bytes() / (in_f * 4096)
    assert bpw <= limit
    assert bpw >= 1.6 + 0.25  # trits + alpha/mu: nothing is left out of the count
