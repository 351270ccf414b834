"""Randomized property tests (hypothesis): ATQ on degenerate blocks, the blockwise loop
under every method and order, and the code packers.

Tensors are built from a drawn seed plus drawn shapes, scales and degeneracy flags, so a
failing example is reproducible from what hypothesis prints.
"""
import numpy as np
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pt2llm import pack, ternary
from pt2llm.ternary import atq

D = torch.float64
SEEDS = st.integers(0, 2 ** 32 - 1)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- strategies

@st.composite
def weight_block(draw, n_max=16, widths=(1, 2, 5, 127, 128, 129), exp_range=(-8.0, 4.0),
                 dtypes=(torch.float32, torch.float64)):
    """W [n, k] at scale 10^exp with optional row offsets, heavy tails, an all-zero row,
    a constant row, duplicate columns and a zero column."""
    n = draw(st.integers(1, n_max), label="n")
    k = draw(st.sampled_from(widths), label="k")
    exp = draw(st.floats(*exp_range), label="log10 scale")
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    g = torch.Generator().manual_seed(draw(SEEDS, label="seed"))
    W = torch.randn(n, k, generator=g, dtype=D)
    offset = draw(st.sampled_from([0.0, 0.1, 1.0, 10.0]), label="row offset")
    W += offset * torch.randn(n, 1, generator=g, dtype=D)
    if draw(st.booleans(), label="heavy tails"):
        W = W ** 3
    W *= 10.0 ** exp
    if draw(st.booleans(), label="zero row"):
        W[draw(st.integers(0, n - 1))] = 0
    if draw(st.booleans(), label="constant row"):
        W[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-3.0, 0.37, 1.0])) * 10.0 ** exp
    if k > 1 and draw(st.booleans(), label="duplicate columns"):
        src = draw(st.integers(0, k - 1))
        dst = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k))
        W[:, dst] = W[:, [src]]
    if draw(st.booleans(), label="zero column"):
        W[:, draw(st.integers(0, k - 1))] = 0
    return W.to(dtype)


@st.composite
def hessian(draw, k, allow_none=True):
    """H [k, k] (float64): None, SPD, rank-deficient X X^T (fewer samples than k, possibly
    none at all), badly conditioned (eigenvalues 1e-8..1), optionally with a dead
    (all-zero) row and column."""
    kinds = ["spd", "rank-deficient", "ill-conditioned"] + (["none"] if allow_none else [])
    kind = draw(st.sampled_from(kinds), label="H kind")
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(draw(SEEDS, label="H seed"))
    mean = draw(st.sampled_from([0.0, 0.5]), label="X mean")
    if kind == "spd":
        X = torch.randn(k, 2 * k + 4, generator=g, dtype=D) + mean
        H = X @ X.T / X.shape[1]
    elif kind == "rank-deficient":
        N = draw(st.integers(0, max(0, k - 1)), label="samples")
        X = torch.randn(k, N, generator=g, dtype=D) + mean
        H = X @ X.T
    else:
        Q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=D))
        eig = torch.logspace(-8, 0, k, dtype=D)[torch.randperm(k, generator=g)]
        H = (Q * eig) @ Q.T
        H = (H + H.T) / 2
    H = H * 10.0 ** draw(st.sampled_from([-4, 0, 4]), label="log10 H scale")
    if draw(st.booleans(), label="dead input"):
        i = draw(st.integers(0, k - 1))
        H[i, :] = 0
        H[:, i] = 0
    return H


# ------------------------------------------------------------------- 1. ATQ on one block

@FAST
@given(data=st.data(), itf=st.booleans(), aga=st.booleans())
def test_quantize_block_outputs_are_valid_on_degenerate_inputs(data, itf, aga):
    W = data.draw(weight_block(), label="W")
    n, k = W.shape
    H = data.draw(hessian(k), label="H")
    T, alpha, mu = atq.quantize_block(W, H, itf=itf, aga=aga)
    assert T.shape == (n, k) and alpha.shape == (n,) and mu.shape == (n,)
    assert T.dtype == torch.int8
    assert set(T.unique().tolist()) <= {-1, 0, 1}, T.unique()
    assert torch.isfinite(alpha).all(), alpha
    assert torch.isfinite(mu).all(), mu
    assert (alpha >= 0).all(), alpha
    W_hat = alpha[:, None] * T.to(alpha.dtype) + mu[:, None]
    assert torch.isfinite(W_hat).all()


@FAST
@given(W=weight_block(dtypes=(D,)))
def test_itf_grid_is_the_rowwise_least_squares_solution(W):
    n, k = W.shape
    T, alpha, mu = atq.quantize_block(W, None, itf=True, aga=False)
    Tn = T.numpy().astype(np.float64)
    Wn = W.numpy()
    checked = 0
    for i in range(n):
        t, w = Tn[i], Wn[i]
        a, b, d = t @ t, t.sum(), float(k)
        if not a * d - b * b > 1e-6 * a * d:
            continue  # singular 2x2 system: (alpha, mu) not unique
        ref, *_ = np.linalg.lstsq(np.stack([t, np.ones(k)], axis=1), w, rcond=None)
        tol = 1e-6 * np.abs(w).max()
        assert abs(float(alpha[i]) - ref[0]) <= tol, (i, float(alpha[i]), ref[0], tol)
        assert abs(float(mu[i]) - ref[1]) <= tol, (i, float(mu[i]), ref[1], tol)
        checked += 1
    event(f"rows checked: {'none' if checked == 0 else 'some'}")


# --------------------------------------------------------------- 2. the blockwise loop

@st.composite
def loop_case(draw, widths, methods=("pt2", "gptq", "rtn"), max_bits=7):
    method = draw(st.sampled_from(methods), label="method")
    orders = ["ssr", "random", "none"] + (["hessian"] if method != "rtn" else [])
    reorder = draw(st.sampled_from(orders), label="reorder")
    bits = draw(st.integers(2, max_bits), label="bits") if method == "gptq" else 2
    block_size = draw(st.sampled_from([32, 128]), label="block_size")
    W = draw(weight_block(n_max=8, widths=widths, exp_range=(-8.0, 4.0)), label="W")
    grid_dtype = draw(st.sampled_from([torch.float16, None]), label="grid_dtype")
    if grid_dtype is torch.float16:
        # the stored grid is float16: keep |W| well inside its range (max 65504)
        W = W * min(1.0, 1e3 / max(float(W.abs().max()), 1e-300))
    if method == "rtn":
        H = None
    else:
        H = draw(hessian(W.shape[1], allow_none=reorder != "hessian"), label="H")
        if H is not None:
            H = H.to(W.dtype)
    seed = draw(st.integers(0, 1000), label="order seed")
    return method, reorder, bits, block_size, W, H, seed, grid_dtype


def _check_loop(case):
    method, reorder, bits, block_size, W, H, seed, grid_dtype = case
    n, m = W.shape
    q = ternary.make_quantizer(method, bits=bits)
    r = ternary.quantize_weight(W, H, q, block_size=block_size, reorder=reorder, seed=seed,
                                grid_dtype=grid_dtype)
    nb = -(-m // block_size)
    assert r.codes.shape == (n, m)
    assert r.codes.dtype == (torch.int8 if q.hi <= 127 else torch.int16)
    assert r.scale.shape == (n, nb) and r.offset.shape == (n, nb)
    assert sorted(r.perm.tolist()) == list(range(m))
    if reorder == "none":
        assert r.perm.tolist() == list(range(m))
    if reorder == "hessian":
        diag = torch.diagonal(H).clone()
        diag[diag == 0] = 1  # dead inputs count as unit diagonal in the loop
        assert (diag[r.perm][1:] <= diag[r.perm][:-1]).all()
    assert torch.isfinite(r.scale).all(), r.scale
    assert torch.isfinite(r.offset).all(), r.offset
    codes = r.codes.long()
    assert int(codes.min()) >= q.lo and int(codes.max()) <= q.hi, (q.lo, q.hi, codes.min(), codes.max())
    Wh = r.dequantize()
    assert Wh.shape == (n, m) and torch.isfinite(Wh).all()
    # independent reconstruction in float64, column by column
    ref = torch.full((n, m), float("nan"), dtype=D)
    s, o = r.scale.double(), r.offset.double()
    for j, col in enumerate(r.perm.tolist()):
        ref[:, col] = s[:, j // block_size] * r.codes[:, j].double() + o[:, j // block_size]
    assert torch.isfinite(ref).all()
    tol = 1e-6 * (s.abs().max() * max(abs(q.lo), abs(q.hi)) + o.abs().max()) + 1e-30
    assert float((Wh.double() - ref).abs().max()) <= float(tol)


@FAST
@given(case=loop_case(widths=(1, 5, 127, 129)))
def test_quantize_weight_outputs_are_consistent(case):
    _check_loop(case)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=loop_case(widths=(576,)))
def test_quantize_weight_outputs_are_consistent_wide(case):
    _check_loop(case)


@FAST
@given(case=loop_case(widths=(1, 5, 127, 129), methods=("gptq",), max_bits=8))
def test_quantize_weight_gptq_codes_up_to_8_bits(case):
    """make_quantizer accepts bits 2..8, so codes up to 255 must survive in QuantResult."""
    _check_loop(case)


# ---------------------------------------------------------------------------- 3. packing

LEAD = st.lists(st.integers(1, 3), min_size=0, max_size=2)


@FAST
@given(lead=LEAD, L=st.integers(1, 700), seed=SEEDS)
def test_trits_round_trip(lead, L, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (*lead, L), generator=g, dtype=torch.int8)
    b = pack.pack_trits(t)
    assert b.dtype == torch.uint8 and tuple(b.shape) == (*lead, pack.packed_trit_width(L))
    assert b.numel() == 0 or int(b.max()) <= 242
    u = pack.unpack_trits(b, L)
    assert u.dtype == torch.int8 and torch.equal(u, t)


@FAST
@given(lead=LEAD, L=st.integers(1, 300), bits=st.integers(2, 8), seed=SEEDS)
def test_bits_round_trip(lead, L, bits, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 2 ** bits, (*lead, L), generator=g).to(torch.uint8)
    b = pack.pack_bits(c, bits)
    assert b.dtype == torch.uint8 and tuple(b.shape) == (*lead, pack.packed_bits_width(L, bits))
    u = pack.unpack_bits(b, L, bits)
    assert u.dtype == torch.uint8 and torch.equal(u, c)
