"""ATQ (init, ITF, AGA) against independent float64 computations."""
import itertools

import numpy as np
import pytest
import torch

from pt2llm.ternary import atq

D = torch.float64


def _rows_lstsq(W, T, X=None):
    """Per-row least squares for (alpha, mu) with numpy: min ||(alpha t + mu - w) X||."""
    W, T = W.numpy(), T.numpy().astype(np.float64)
    out = []
    for w, t in zip(W, T):
        A = np.stack([t, np.ones_like(t)], axis=1)           # [k, 2]
        b = w
        if X is not None:
            A, b = X.numpy().T @ A, X.numpy().T @ w          # [N, 2], [N]
        out.append(np.linalg.lstsq(A, b, rcond=None)[0])
    out = np.array(out)
    return out[:, 0], out[:, 1]


@pytest.mark.parametrize("k", [1, 5, 64, 127, 128])
def test_itf_grid_is_least_squares_and_T_is_a_fixed_point(k, gen):
    W = (torch.randn(48, k, generator=gen, dtype=D) * 0.02 + 0.01 * torch.randn(48, 1, generator=gen, dtype=D))
    T, alpha, mu = atq.quantize_block(W, None, itf=True, aga=False)
    assert T.dtype == torch.int8 and set(T.unique().tolist()) <= {-1, 0, 1}
    nondeg = torch.tensor([np.linalg.matrix_rank(np.stack([t, np.ones(k)])) == 2 for t in T.double().numpy()])
    a_ref, m_ref = _rows_lstsq(W, T.double())
    np.testing.assert_allclose(alpha[nondeg].numpy(), a_ref[nondeg.numpy()], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mu[nondeg].numpy(), m_ref[nondeg.numpy()], rtol=1e-9, atol=1e-12)
    # nearest grid point, checked by brute force over {-1, 0, 1}
    grid = alpha[:, None, None] * torch.tensor([-1.0, 0.0, 1.0], dtype=D) + mu[:, None, None]  # [n, 1, 3]
    err_all = (W[:, :, None] - grid).abs()                                                   # [n, k, 3]
    err_T = (W - (alpha[:, None] * T.double() + mu[:, None])).abs()
    assert torch.all(err_T <= err_all.min(dim=2).values + 1e-12)


def test_itf_weight_error_never_increases(gen):
    for _ in range(10):
        W = torch.randn(64, 128, generator=gen, dtype=D) ** 3  # heavy tails: several iterations
        T, alpha, mu = atq.init_grid(W)
        trace = []
        atq.itf(W, T, alpha, mu, trace=trace)
        assert len(trace) >= 3
        diffs = np.diff(trace)
        assert np.all(diffs <= 1e-12 * trace[0]), trace


def test_itf_improves_on_init_and_reaches_low_error(gen):
    W = torch.randn(256, 128, generator=gen, dtype=D)
    T0, a0, m0 = atq.init_grid(W)
    T, a, m = atq.itf(W, T0, a0, m0)
    assert atq.weight_error(W, T, a, m) < atq.weight_error(W, T0, a0, m0)


def test_init_matches_paper_eq_4_5(gen):
    W = torch.randn(16, 100, generator=gen, dtype=D) + 0.3
    T, alpha, mu = atq.init_grid(W)
    Wn = W.numpy()
    mu_ref = Wn.mean(1)
    Wc = Wn - mu_ref[:, None]
    delta = 0.75 * np.abs(Wc).mean(1)
    T_ref = np.where(Wc > delta[:, None], 1, np.where(Wc < -delta[:, None], -1, 0))
    alpha_ref = (T_ref * Wc).sum(1) / np.abs(T_ref).sum(1)
    np.testing.assert_array_equal(T.numpy(), T_ref)
    np.testing.assert_allclose(alpha.numpy(), alpha_ref, rtol=1e-12)
    np.testing.assert_allclose(mu.numpy(), mu_ref, rtol=1e-12)


@pytest.mark.parametrize("k", [7, 128])
def test_aga_is_output_least_squares(k, gen):
    N = 400
    A = torch.randn(k, k, generator=gen, dtype=D)
    X = A @ torch.randn(k, N, generator=gen, dtype=D) + 0.5   # correlated, non-zero mean
    H = X @ X.T
    W = torch.randn(32, k, generator=gen, dtype=D) * 0.05
    T, alpha, mu = atq.quantize_block(W, H, itf=True, aga=True)
    a_ref, m_ref = _rows_lstsq(W, T.double(), X)
    np.testing.assert_allclose(alpha.numpy(), a_ref, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(mu.numpy(), m_ref, rtol=1e-7, atol=1e-12)
    # and AGA lowers the output error against the ITF grid, for the same T
    _, a_itf, m_itf = atq.quantize_block(W, None, itf=True, aga=False)
    def ex(a, m):
        return (((a[:, None] * T.double() + m[:, None]) - W) @ X).pow(2).sum()
    assert ex(alpha, mu) <= ex(a_itf, m_itf) + 1e-9


def test_itf_can_be_switched_off(gen):
    W = torch.randn(8, 128, generator=gen, dtype=D)
    T, alpha, mu = atq.quantize_block(W, None, itf=False, aga=False)
    T0, a0, m0 = atq.init_grid(W)
    assert torch.equal(T, T0.to(torch.int8))
    np.testing.assert_allclose(alpha.numpy(), a0.numpy())


def test_small_block_itf_is_near_the_brute_force_optimum(gen):
    """Over all 3^k codes of a k=6 row (with LS grids) ITF finds a local optimum that is
    never worse than the init and is within a small factor of the global one."""
    k = 6
    codes = torch.tensor(list(itertools.product([-1.0, 0.0, 1.0], repeat=k)), dtype=D)  # [729, k]
    for _ in range(20):
        w = torch.randn(1, k, generator=gen, dtype=D)
        best = min(float(atq.weight_error(w, c[None], *atq.optimal_grid(w, c[None]))) for c in codes)
        T, a, m = atq.quantize_block(w, None, aga=False)
        e = float(atq.weight_error(w, T.double(), a, m))
        assert best - 1e-12 <= e <= 3 * best + 1e-12


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e4])
def test_degenerate_rows_stay_finite(scale, gen):
    W = torch.randn(6, 128, generator=gen, dtype=torch.float32) * scale
    W[0] = 0                       # all-zero row
    W[1] = 0.37 * scale            # constant row
    W[2, :64] = 0                  # half zero
    W[:, 5] = 0                    # zero column
    W[3] = torch.tensor([1.0, -1.0] * 64) * scale  # two values
    H = torch.randn(128, 64, generator=gen) @ torch.randn(64, 128, generator=gen)  # rank deficient
    H = H @ H.T
    H[7, :] = 0
    H[:, 7] = 0                    # dead input
    for itf in (True, False):
        for aga in (True, False):
            T, alpha, mu = atq.quantize_block(W, H, itf=itf, aga=aga)
            assert torch.isfinite(alpha).all() and torch.isfinite(mu).all()
            assert set(T.unique().tolist()) <= {-1, 0, 1}
            Wh = alpha[:, None] * T.float() + mu[:, None]
            assert torch.isfinite(Wh).all()
    T, alpha, mu = atq.quantize_block(W, None)
    assert torch.all(T[0] == 0) and float(mu[0]) == 0.0
    assert torch.allclose(alpha[1] * T[1].float() + mu[1], W[1], rtol=1e-5)  # constant row: exact


def test_flexible_round_with_zero_alpha_gives_zero_codes():
    W = torch.randn(3, 10)
    T = atq.flexible_round(W, torch.zeros(3), W.mean(1))
    assert torch.all(T == 0)
