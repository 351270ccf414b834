"""The Triton kernels against the reference path: natively on CUDA, and on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported)."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from pt2llm import kernels, pack  # noqa: E402
from pt2llm.kernels import triton_ternary as tt  # noqa: E402
from pt2llm.nn import TernaryLinear  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
# (out, in): widths that are and are not multiples of 128 (the last block shorter); out not
# a multiple of 5 leaves the last packed byte half empty
SHAPES = [(40, 256), (37, 300), (13, 100)] + ([(4100, 4096), (1000, 1408)] if CUDA else [])
MS = [1, 2, 7, 16, 128, 2048]


def _layer(out_f, in_f, gen, bias=True, block=128):
    mod = TernaryLinear(in_f, out_f, bias, block_size=block)
    codes = torch.randint(-1, 2, (out_f, in_f), generator=gen)
    mod.packed.copy_(pack.pack_trit_rows(codes))
    mod.alpha.copy_(torch.rand(mod.alpha.shape, generator=gen) * 0.05 + 0.01)
    mod.mu.copy_(torch.randn(mod.mu.shape, generator=gen) * 0.01)
    mod.perm.copy_(torch.randperm(in_f, generator=gen).to(mod.perm.dtype))
    if bias:
        mod.bias.copy_(torch.randn(out_f, generator=gen))
    return mod.to(DEV)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _reference(mod, x):
    """The reference path in float64 (what fp16 kernels are held to) and in x's dtype."""
    w = mod.weight_permuted(torch.float64)
    exact = kernels.linear(x.double(), w, mod.perm, None if mod.bias is None else mod.bias.double())
    return exact, kernels.linear(x, mod.weight_permuted(x.dtype), mod.perm, mod.bias)


@pytest.mark.parametrize("out_f,in_f", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_kernels_match_reference(out_f, in_f, m, gen):
    if not CUDA and m == 2048 and in_f > 128:
        m = 300  # the interpreter runs a program at a time; 2048 rows stay covered at in=100
    mod = _layer(out_f, in_f, gen)
    x = torch.randn(m, in_f, generator=gen).to(DEV, torch.float16)
    exact, ref = _reference(mod, x)
    # the reference path itself sits within fp16 rounding of the exact product
    assert _rel(ref, exact) < 2e-3
    for path in ["fused", "prefill"]:
        y = torch.full((m, out_f), float("nan"), device=DEV, dtype=torch.float16)
        y = tt.linear(x, mod.packed, mod.alpha, mod.mu, mod.perm, mod.bias, out_f, 128, path=path)
        assert y.shape == (m, out_f) and y.dtype == torch.float16
        assert torch.isfinite(y).all()
        assert _rel(y, exact) < 2e-3, path
        torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_split_k_and_no_bias(splits, gen):
    mod = _layer(37, 700, gen, bias=False)
    x = torch.randn(3, 700, generator=gen).to(DEV, torch.float16)
    exact, _ = _reference(mod, x)
    y = tt.matmul(x, mod.packed, mod.alpha, mod.mu, mod.perm, None, 37, 128, splits=splits)
    assert _rel(y, exact) < 2e-3


@pytest.mark.parametrize("block", [32, 64])
def test_other_block_sizes(block, gen):
    mod = _layer(21, 200, gen, block=block)
    x = torch.randn(4, 200, generator=gen).to(DEV, torch.float16)
    exact, _ = _reference(mod, x)
    for path in ["fused", "prefill"]:
        assert _rel(tt.linear(x, mod.packed, mod.alpha, mod.mu, mod.perm, mod.bias, 21, block, path=path), exact) < 2e-3


def test_dequantize_is_exactly_the_reference_weight(gen):
    mod = _layer(23, 300, gen)
    for dtype in [torch.float16] + ([torch.bfloat16] if CUDA else []):  # the interpreter has no bf16 dot
        w = tt.dequantize(mod.packed, mod.alpha, mod.mu, 23, 128, dtype)
        # alpha * code + mu rounded once (fp16: the reference's own arithmetic gives the same)
        assert torch.equal(w, mod.weight_permuted(torch.float32).to(dtype))
        if dtype == torch.float16:
            assert torch.equal(w, mod.weight_permuted(dtype))


@pytest.mark.skipif(not CUDA, reason="the interpreter's dot is wrong for bf16")
def test_bf16_and_module_dispatch(gen):
    mod = _layer(300, 520, gen)
    for dtype in [torch.float16, torch.bfloat16]:
        for m in [1, 5, 64]:
            x = torch.randn(2, m, 520, generator=gen).to(DEV, dtype)
            exact, _ = _reference(mod, x)
            y = mod(x)  # TernaryLinear.forward dispatches to the kernels on CUDA
            assert y.shape == (2, m, 300) and y.dtype == dtype
            assert _rel(y, exact) < (2e-3 if dtype == torch.float16 else 1.5e-2)


def test_every_byte_value_decodes_like_the_lookup_table():
    """All 256 byte values in every position of a pair, through the kernel's decoder."""
    b = torch.arange(256, dtype=torch.uint8).reshape(1, 256).repeat(2, 1)
    b[1] = b[1].flip(0)
    ones = torch.ones(10, 2, dtype=torch.float16)
    w = tt.dequantize(b.to(DEV), ones.to(DEV), torch.zeros_like(ones).to(DEV), 10, 128)
    assert torch.equal(w.cpu(), pack.unpack_trit_rows(b, 10).to(torch.float16))
