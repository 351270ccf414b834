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
from tinymodels import random_ternary  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
# (out, in): widths that are and are not multiples of 128 (the last block shorter); out not
# a multiple of 5 leaves the last packed byte half empty
SHAPES = [(40, 256), (37, 300), (13, 100)] + ([(4100, 4096), (1000, 1408)] if CUDA else [])
MS = [1, 2, 7, 16, 128, 2048]


@pytest.fixture
def bf16_dot(monkeypatch):
    """The interpreter keeps bf16 as its raw 16-bit patterns (uint16) and its dot multiplies
    those as integers; have it widen bf16 tiles to fp32 first, as the GPU does. CUDA: as is."""
    if CUDA:
        return
    from triton.runtime.interpreter import InterpreterBuilder
    tl = triton.language
    dot = InterpreterBuilder.create_dot

    def widened(self, a, b, d, *args):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return dot(self, a, b, d, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", widened)


def _to_bf16(w):
    """fp32 -> bf16 as the kernel's store rounds: to nearest on CUDA; the interpreter truncates."""
    if CUDA:
        return w.to(torch.bfloat16)
    return (w.contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _layer(out_f, in_f, gen, bias=True, block=128):
    return random_ternary(out_f, in_f, gen, bias, block).to(DEV)


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
    # prefill: with perm's inverse computed inside, and given (int32, as a caller may cache it)
    inv = tt.inverse_perm(mod.perm).to(torch.int32)
    for path, inv_perm in [("fused", None), ("prefill", None), ("prefill", inv)]:
        y = tt.linear(x, mod.packed, mod.alpha, mod.mu, mod.perm, mod.bias, out_f, 128, path=path,
                      inv_perm=inv_perm)
        assert y.shape == (m, out_f) and y.dtype == torch.float16
        assert torch.isfinite(y).all()
        assert _rel(y, exact) < 2e-3, path
        torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("out_f,in_f", [(37, 300), (13, 100)])
def test_bf16(out_f, in_f, gen, bf16_dot):
    mod = _layer(out_f, in_f, gen)
    for m in [1, 7, 16, 128]:
        x = torch.randn(m, in_f, generator=gen).to(DEV, torch.bfloat16)
        exact, _ = _reference(mod, x)
        for path, inv_perm in [("fused", None), ("prefill", None), ("prefill", tt.inverse_perm(mod.perm))]:
            y = tt.linear(x, mod.packed, mod.alpha, mod.mu, mod.perm, mod.bias, out_f, 128, path=path,
                          inv_perm=inv_perm)
            assert y.shape == (m, out_f) and y.dtype == torch.bfloat16
            assert _rel(y, exact) < 1.5e-2, (m, path)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_split_k_and_no_bias(splits, gen):
    mod = _layer(37, 700, gen, bias=False)
    x = torch.randn(3, 700, generator=gen).to(DEV, torch.float16)
    exact, _ = _reference(mod, x)
    y = tt.matmul(x, mod.packed, mod.alpha, mod.mu, mod.perm, None, 37, 128, splits=splits)
    assert _rel(y, exact) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 16])
def test_activations_gathered_before_the_kernel_give_the_same_output(m, dtype, gen, bf16_dot):
    """Large layers at M >= 2 gather x[:, perm] once, before the fused kernel (GATHER=False):
    forced here on a small layer, the output is the in-kernel gather's, bit for bit."""
    mod = _layer(37, 700, gen)
    x = torch.randn(m, 700, generator=gen).to(DEV, dtype)
    exact, _ = _reference(mod, x)
    inside = tt.matmul(x, mod.packed, mod.alpha, mod.mu, mod.perm, mod.bias, 37, 128, gather_from_weights=1 << 62)
    before = tt.matmul(x, mod.packed, mod.alpha, mod.mu, mod.perm, mod.bias, 37, 128, gather_from_weights=0,
                       gather_from_m=1)
    assert _rel(before, exact) < (2e-3 if dtype == torch.float16 else 1.5e-2)
    assert torch.equal(before, inside)


def test_split_count_fills_the_waves():
    # the fused kernel's row tiles (64 packed rows) and 128-column blocks of Llama shapes on an
    # H100 (264 programs at once): 28672x8192's 90 tiles split 8 ways (3 waves of 8 blocks, not
    # 1 wave of 32: 82 against 104 us measured); the others as the old rule slots // tiles had it
    assert tt.split_count(90, 64, 264) == 8
    for tiles, blocks, old in [(13, 32, 16), (35, 32, 7), (13, 86, 18), (26, 64, 10), (26, 224, 10)]:
        assert tt.split_count(tiles, blocks, 264) == old
    assert tt.split_count(1, 7, 264) == 7      # one tile: a program per block
    assert tt.split_count(264, 50, 264) == 1   # a full wave of tiles: no split
    assert tt.split_count(528, 50, 264) == 1
    for tiles in range(1, 300, 7):
        for blocks in [1, 3, 64, 224]:
            assert 1 <= tt.split_count(tiles, blocks, 264) <= blocks


def test_update_tuning_keeps_what_a_saved_file_does_not_name(monkeypatch):
    monkeypatch.setattr(tt, "TUNING", {k: dict(v) if isinstance(v, dict) else v for k, v in tt.TUNING.items()})
    before = dict(tt.TUNING["fused"])
    tt.update_tuning({"fused": {"block_g": 32, "programs": 100}, "prefill_from_m": 9, "variant": "old file"})
    assert tt.TUNING["fused"] == {**before, "block_g": 32, "programs": 100}
    assert tt.TUNING["prefill_from_m"] == 9 and tt.TUNING["variant"] == "old file"


@pytest.mark.parametrize("block", [32, 64])
def test_other_block_sizes(block, gen):
    mod = _layer(21, 200, gen, block=block)
    x = torch.randn(4, 200, generator=gen).to(DEV, torch.float16)
    exact, _ = _reference(mod, x)
    for path in ["fused", "prefill"]:
        assert _rel(tt.linear(x, mod.packed, mod.alpha, mod.mu, mod.perm, mod.bias, 21, block, path=path), exact) < 2e-3


@pytest.mark.parametrize("in_f", [300, 40])  # 40: one block, shorter than 128
@pytest.mark.parametrize("tile", [dict(block_g=8, warps=2), dict(block_g=16, warps=4)])
def test_dequantize_is_exactly_the_reference_weight(in_f, tile, gen):
    mod = _layer(23, in_f, gen)
    ref = mod.weight_permuted(torch.float32)
    for dtype in [torch.float16, torch.bfloat16]:
        w = tt.dequantize(mod.packed, mod.alpha, mod.mu, 23, 128, dtype, **tile)
        # alpha * code + mu rounded once (fp16: the reference's own arithmetic gives the same)
        assert torch.equal(w, ref.to(dtype) if dtype == torch.float16 else _to_bf16(ref))
        if dtype == torch.float16:
            assert torch.equal(w, mod.weight_permuted(dtype))


@pytest.mark.parametrize("in_f,block", [(300, 128), (256, 128), (40, 128), (200, 32)])
@pytest.mark.parametrize("tile", [dict(block_c=64, warps=2), dict(block_c=256, warps=4), dict(block_c=1024, warps=4)])
def test_dequantize_original_is_the_stored_weight_with_columns_put_back(in_f, block, tile, gen):
    mod = _layer(23, in_f, gen, block=block)  # a random perm
    inv = tt.inverse_perm(mod.perm)
    for dtype in [torch.float16, torch.bfloat16]:
        stored = tt.dequantize(mod.packed, mod.alpha, mod.mu, 23, block, dtype)
        want = torch.full_like(stored, float("nan"))
        want[:, mod.perm.long()] = stored
        for inv_perm in [inv, inv.to(torch.int32)]:
            w = tt.dequantize_original(mod.packed, mod.alpha, mod.mu, inv_perm, 23, block, dtype, **tile)
            assert torch.equal(w, want), (dtype, inv_perm.dtype)
        if dtype == torch.float16:
            assert torch.equal(w, mod.dequantize(torch.float32).to(dtype))  # TernaryLinear's own
        # the identity order gives the stored weight itself
        ident = torch.arange(in_f, device=DEV)
        assert torch.equal(tt.dequantize_original(mod.packed, mod.alpha, mod.mu, ident, 23, block, dtype, **tile),
                           stored)


def test_prefill_wider_than_the_original_order_kernel_takes(gen, monkeypatch):
    """Past MAX_ORIGINAL_K prefill dequantizes in stored order and gathers the activations."""
    monkeypatch.setattr(tt, "MAX_ORIGINAL_K", 128)
    mod = _layer(37, 300, gen)
    x = torch.randn(20, 300, generator=gen).to(DEV, torch.float16)
    exact, _ = _reference(mod, x)
    assert _rel(tt.linear(x, mod.packed, mod.alpha, mod.mu, mod.perm, mod.bias, 37, 128, path="prefill"), exact) < 2e-3


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_byte_value_decodes_like_the_lookup_table(dtype):
    """All 256 byte values in every position of a pair, through the kernel's decoder."""
    b = torch.arange(256, dtype=torch.uint8).reshape(1, 256).repeat(2, 1)
    b[1] = b[1].flip(0)
    ones = torch.ones(10, 2, dtype=torch.float16)
    w = tt.dequantize(b.to(DEV), ones.to(DEV), torch.zeros_like(ones).to(DEV), 10, 128, dtype)
    assert torch.equal(w.cpu(), pack.unpack_trit_rows(b, 10).to(dtype))


# ---- the online Hadamard kernel (rotated models) ----------------------------------------------

from pt2llm.kernels import triton_hadamard as th  # noqa: E402
from pt2llm.rotate import hadamard  # noqa: E402

# the real models' online widths (SmolLM2 576 / 1536, Qwen 896 / 4864), Llama-2 7B and 70B
# (4096 / 11008, 8192 / 28672), and the largest small factor the kernel takes (108 in 13824:
# a 128 x 128 tile)
HADAMARD_WIDTHS = [576, 896, 1536, 4864, 4096, 11008] + ([8192, 13824, 28672] if CUDA else [])


@pytest.mark.parametrize("n", HADAMARD_WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hadamard_kernel_matches_the_float64_transform(n, dtype):
    g = torch.Generator().manual_seed(n)
    signs = hadamard.random_signs(n, g)
    x = torch.randn(3, n, generator=g).to(dtype)
    ref = hadamard.transform(x.double(), signs)
    assert th.supported(x.to(DEV))
    y = th.transform(x.to(DEV), signs.to(DEV)).cpu()
    assert y.dtype == dtype and y.shape == x.shape
    # no worse than rounding the exact result to the output's dtype (the interpreter truncates
    # to bf16: twice that), plus TF32 products on CUDA
    rounding = ((ref.to(dtype).double() - ref).norm() / ref.norm()).item()
    factor = 1.5 if dtype == torch.float16 else 2.5
    assert ((y.double() - ref).norm() / ref.norm()).item() <= factor * rounding + (1e-3 if CUDA else 0)
    # one row as three: each row is its own transform (no mixing between rows)
    y1 = th.transform(x[1:2].to(DEV), signs.to(DEV)).cpu()
    torch.testing.assert_close(y1, y[1:2], rtol=0, atol=0)


def test_hadamard_kernel_refuses_what_it_does_not_take():
    # p < 16 (200 = H200 x 1, 100 = random 25 x 4), a power of two it would multiply as one row,
    # no rows, integer inputs: the torch path runs for these
    for n in (200, 100, 64):
        assert th.split(n) is None and not th.supported(torch.zeros(1, n, dtype=torch.float16))
    # tiles beyond the GPU's shared memory: 3200 = H200 x 16 (an [256, 256] A), 18944 = 148 x 128;
    # 28672 = 28 x 1024 and 13824 = 108 x 128 are the largest it takes
    for n in (3200, 6400, 18944):
        assert th.split(n) is None and not th.supported(torch.zeros(1, n, dtype=torch.float16))
    assert th.split(28672) == (28, 32, 16, 64) and th.split(13824) == (108, 128, 1, 128)
    assert not th.supported(torch.zeros(0, 896, dtype=torch.float16))
    assert not th.supported(torch.zeros(1, 896, dtype=torch.int32))
    assert not th.supported(torch.zeros(1, 896))  # float32 keeps the exact torch path
    assert th.supported(torch.zeros(2, 5, 896, dtype=torch.float16))  # leading dims are rows


@pytest.mark.parametrize("cls", ["LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (2, 3, 896), (5, 576), (1, 100)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [20.0, 1e-3])  # 1e-3: the mean square below eps, which then counts
def test_rms_norm_kernel_gives_the_modules_output(cls, shape, dtype, scale):
    """kernels/triton_norm: each transformers RMSNorm class in nn.RMS_NORMS, as installed,
    against its own forward: equal up to one rounding of the 16-bit result (the mean square
    is summed in another order); float64 arithmetic bounds both. bfloat16 on CUDA only:
    Triton's interpreter truncates float32 to bfloat16 (1 + 3/4 2^-7 -> 1, not 1 + 2^-7)."""
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's interpreter rounds to bfloat16 toward zero")
    import transformers

    from pt2llm import nn as pnn
    from pt2llm.kernels import triton_norm
    assert cls in pnn.RMS_NORMS
    gen = torch.Generator().manual_seed(shape[-1])
    mod = getattr(transformers, cls, None) or getattr(
        __import__(f"transformers.models.{cls[:-7].lower()}.modeling_{cls[:-7].lower()}", fromlist=[cls]), cls)
    norm = mod(shape[-1], eps=1e-5).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=gen) * 2 + 0.1)
    h = ((torch.randn(*shape, generator=gen) + 0.15) * scale).to(DEV, dtype)
    with torch.no_grad():
        want = norm(h)
        got = triton_norm.rms_norm(h, norm.weight, norm.variance_epsilon)
    assert got.shape == want.shape and got.dtype == want.dtype
    exact = norm.weight.detach().double() * h.double() / (h.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    exact = exact.to(dtype).double()  # the module's output is rounded once more than this
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    assert float(((got.double() - want.double()).abs() / exact.abs().clamp_min(1e-3)).max()) <= 2.5 * ulp
    assert float(((got.double() - exact).abs() / exact.abs().clamp_min(1e-3)).max()) <= 2.5 * ulp
    assert (got != want).double().mean() < 0.05  # mostly the same bits


def test_fused_norms_patches_the_norms_and_gives_them_back():
    """nn.fused_norms: within it the model's RMSNorms take the kernel on CUDA 16-bit rows and
    their own forward elsewhere (here: float32 rows); after it, their own forward again."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pt2llm import nn as pnn
    from pt2llm.kernels import triton_norm
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(DEV).eval()
    calls, real = [], triton_norm.rms_norm
    triton_norm.rms_norm = lambda *a: calls.append(1) or real(*a)
    try:
        norm = model.model.norm
        h32 = torch.randn(1, 3, 64, device=DEV)
        ref32 = norm(h32)
        with pnn.fused_norms(model) as mods:
            assert len(mods) == 5  # two a layer and the final one
            assert torch.equal(norm(h32), ref32) and not calls  # float32: its own forward
            model.half()
            h = h32.half()
            got = norm(h)
            assert len(calls) == (1 if DEV == "cuda" else 0)  # the kernel on CUDA only
            torch.testing.assert_close(got, type(norm).forward(norm, h), rtol=2e-3, atol=2e-3)
        assert "forward" not in norm.__dict__
        norm(h)
        assert len(calls) == (1 if DEV == "cuda" else 0)
    finally:
        triton_norm.rms_norm = real
