"""The blockwise loop: exact compensation under any order, against independent code."""
import numpy as np
import pytest
import torch

from pt2llm import ternary
from pt2llm.ternary import atq, gptq

D = torch.float64


def _data(gen, n=24, m=300, N=2000):
    A = torch.randn(m, m, generator=gen, dtype=D) / m ** 0.5
    X = torch.randn(N, m, generator=gen, dtype=D) @ A + 0.2 * torch.randn(N, m, generator=gen, dtype=D)
    W = torch.randn(n, m, generator=gen, dtype=D) * 0.02 + 0.004
    H = 2 * X.T @ X / N
    return W, H, X


def _naive_gptq(W, H, quantizer, order, block_size, percdamp=0.01):
    """Independent reference: one column at a time in `order`; the inverse of the
    damped Hessian of the not-yet-quantized columns is recomputed from scratch (numpy)
    for every column; a block's grid is fitted when its first column comes up."""
    W = W.numpy().copy()
    Hn = H.numpy()
    m = W.shape[1]
    Hd = Hn + percdamp * np.mean(np.diag(Hn)) * np.eye(m)
    order = list(order)
    codes = np.zeros_like(W)
    scale = offset = None
    for pos, j in enumerate(order):
        if pos % block_size == 0:
            blk = order[pos:pos + block_size]
            s, o = quantizer.fit(torch.from_numpy(W[:, blk]), torch.from_numpy(Hn[np.ix_(blk, blk)]))
            scale, offset = s.to(torch.float16).double().numpy(), o.to(torch.float16).double().numpy()
        rest = order[pos:]
        Minv = np.linalg.inv(Hd[np.ix_(rest, rest)])  # row 0 is column j
        c = np.clip(np.round((W[:, j] - offset) / scale), quantizer.lo, quantizer.hi)
        codes[:, pos] = c
        err = (W[:, j] - (scale * c + offset)) / Minv[0, 0]
        W[:, rest[1:]] -= np.outer(err, Minv[0, 1:])
    return codes


@pytest.mark.parametrize("method", ["pt2", "gptq"])
@pytest.mark.parametrize("reorder", ["none", "hessian", "random", "ssr"])
def test_loop_matches_naive_column_by_column_reference(method, reorder, gen):
    W, H, _ = _data(gen, m=200)
    q = ternary.make_quantizer(method, bits=2)
    r = ternary.quantize_weight(W, H, q, block_size=64, reorder=reorder, seed=5)
    ref = _naive_gptq(W, H, q, r.perm.tolist(), 64)
    agree = (r.codes.double().numpy() == ref).mean()
    assert agree > 0.999, agree  # float64 round-off may flip an exact tie, nothing more


def test_ssr_order_gives_the_same_result_as_that_order_fixed_up_front(gen):
    W, H, _ = _data(gen, m=300)
    q = ternary.make_quantizer("pt2")
    r = ternary.quantize_weight(W, H, q, reorder="ssr")
    assert sorted(r.perm.tolist()) == list(range(300))
    assert not torch.equal(r.perm, torch.arange(300))
    r2 = ternary.quantize_weight(W, H, q, reorder=r.perm.clone())
    assert torch.equal(r.codes, r2.codes)
    assert torch.allclose(r.scale, r2.scale) and torch.allclose(r.offset, r2.offset)


@pytest.mark.parametrize("method", ["pt2", "gptq", "rtn"])
def test_identity_hessian_equals_independent_blocks(method, gen):
    W = torch.randn(20, 300, generator=gen, dtype=D) * 0.02
    q = ternary.make_quantizer(method, bits=3)
    r = ternary.quantize_weight(W, torch.eye(300, dtype=D), q, block_size=128, reorder="none")
    for b, lo in enumerate(range(0, 300, 128)):
        Wb = W[:, lo:lo + 128]
        s, o = q.fit(Wb, torch.eye(Wb.shape[1], dtype=D))
        s, o = s.to(torch.float16).double(), o.to(torch.float16).double()
        c = gptq.round_to_grid(Wb, s[:, None], o[:, None], q.lo, q.hi)
        assert torch.equal(r.codes[:, lo:lo + 128].double(), c)
        assert torch.equal(r.scale[:, b], s) and torch.equal(r.offset[:, b], o)
    if method == "pt2":  # with the fp16 grid, codes are ATQ's T up to fp16 rounding ties
        T, _, _ = atq.quantize_block(W[:, :128], torch.eye(128, dtype=D))
        assert (r.codes[:, :128] == T).double().mean() > 0.99


@pytest.mark.parametrize("method", ["pt2", "gptq"])
def test_compensation_lowers_output_error(method, gen):
    W, H, X = _data(gen, n=64, m=256)
    q = ternary.make_quantizer(method, bits=2)
    with_c = ternary.quantize_weight(W, H, q, reorder="none").dequantize()
    without = ternary.quantize_weight(W, None, q, reorder="none").dequantize()
    def err(Wh):
        return float(((W - Wh) @ X.T).pow(2).sum())
    assert err(with_c) < 0.9 * err(without)


def test_hessian_accumulator_is_2xxT_over_n(gen):
    acc = gptq.HessianAccumulator(16)
    xs = [torch.randn(3, 7, 16, generator=gen) for _ in range(4)]
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    ref = 2 * X.T @ X / X.shape[0]
    assert acc.n == 84
    torch.testing.assert_close(acc.H.double(), ref, rtol=1e-5, atol=1e-6)


def test_dead_columns_and_indefinite_hessian_stay_finite(gen):
    W, H, _ = _data(gen, m=140)
    H = H.clone()
    H[10, :] = 0
    H[:, 10] = 0
    q = ternary.make_quantizer("pt2")
    r = ternary.quantize_weight(W, H, q, reorder="ssr")
    Wh = r.dequantize()
    assert torch.isfinite(Wh).all()
    # a dead column is zeroed first, so its weights land on a grid point near 0
    assert float(Wh[:, 10].abs().max()) <= float(r.scale.abs().max() + r.offset.abs().max()) + 1e-6
    bad = H - 3 * torch.eye(140, dtype=D) * float(torch.diagonal(H).mean())  # indefinite
    r = ternary.quantize_weight(W, bad, q, reorder="hessian")
    assert r.damp > 0.01 and torch.isfinite(r.dequantize()).all()


def test_quant_result_dequantize_puts_columns_back(gen):
    W = torch.randn(8, 130, generator=gen, dtype=D)
    q = ternary.make_quantizer("rtn")
    r = ternary.quantize_weight(W, None, q, block_size=64, reorder="random", seed=1)
    Wh = r.dequantize()
    s = r.scale.repeat_interleave(64, 1)[:, :130]
    o = r.offset.repeat_interleave(64, 1)[:, :130]
    Wp = s * r.codes.double() + o
    for j, col in enumerate(r.perm.tolist()):
        assert torch.equal(Wh[:, col], Wp[:, j])
