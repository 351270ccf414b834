"""Asymmetric Ternary Quantizer (paper section 3.2): W_hat = alpha * T + mu, row-wise.

Pure tensor functions. W is [n, k] (n rows, k columns of one block); every row has its
own grid {mu - alpha, mu, mu + alpha}. Math runs in W's dtype (float32 in the driver,
float64 in the tests).
"""
from __future__ import annotations

import torch

from ..timing import stage

# A row's 2x2 normal equations are treated as singular when det <= _SINGULAR * a * d
# (Cauchy-Schwarz gives 0 <= det <= a * d). For the unweighted system with integer T the
# determinant is 0 or at least a*d/k, so this only catches exact degeneracy there.
_SINGULAR = 1e-6


def init_grid(W: torch.Tensor):
    """Asymmetric ternary initialisation (paper eq. 4-5).

    mu = row mean, Delta = 0.75 * mean |W - mu|, T by threshold on W - mu,
    alpha = sum(T * (W - mu)) / sum |T|. Returns (T, alpha, mu), T in W's dtype.
    """
    mu = W.mean(dim=1)
    Wc = W - mu[:, None]
    delta = 0.75 * Wc.abs().mean(dim=1)
    T = torch.sign(Wc) * (Wc.abs() > delta[:, None])
    alpha = (T * Wc).sum(dim=1) / T.abs().sum(dim=1).clamp_min(1)
    return T, alpha, mu


def optimal_grid(W: torch.Tensor, T: torch.Tensor, C: torch.Tensor | None = None,
                 alpha_fallback: torch.Tensor | None = None):
    """Closed-form (alpha, mu) for fixed T, row by row.

    C is None: minimise ||alpha T + mu - W||^2 (paper eq. 8-9, ITF).
    C given:   minimise ||(alpha T + mu - W) X||^2 with C = X X^T (paper eq. 12, AGA).

    Each row solves [[a, b], [b, d]] [alpha, mu] = [y1, y2] with
    a = t C t^T, b = t C 1, d = 1^T C 1, y1 = w C t^T, y2 = w C 1 (C = I for ITF).
    Note: the paper's vectorised eq. 13 writes (W o T) S 1 for y1, which equals
    w C t^T only when C is diagonal; we solve eq. 12, the actual least-squares problem.

    Rows whose system is singular (T all zero, or T a multiple of 1) keep
    alpha = alpha_fallback (0 if None) and take the least-squares mu for that alpha,
    which is still a minimiser, so nothing becomes NaN or inf.
    """
    k = W.shape[1]
    if C is None:
        a = (T * T).sum(dim=1)
        b = T.sum(dim=1)
        d = torch.full_like(a, float(k))
        y1 = (W * T).sum(dim=1)
        y2 = W.sum(dim=1)
    else:
        TC = T @ C
        WC = W @ C
        a = (TC * T).sum(dim=1)
        b = TC.sum(dim=1)
        d = C.sum().expand_as(a)
        y1 = (WC * T).sum(dim=1)
        y2 = WC.sum(dim=1)
        if not bool(d.max() > 0):  # no activation energy at all: fall back to E_w
            return optimal_grid(W, T, None, alpha_fallback)
    det = a * d - b * b
    ok = det > _SINGULAR * a * d
    safe_det = torch.where(ok, det, torch.ones_like(det))
    alpha = torch.where(ok, (d * y1 - b * y2) / safe_det, torch.zeros_like(det))
    mu = (a * y2 - b * y1) / safe_det
    if not bool(ok.all()):
        fb = torch.zeros_like(a) if alpha_fallback is None else alpha_fallback.to(a.dtype)
        alpha = torch.where(ok, alpha, fb)
        mu_fb = (y2 - b * fb) / d.clamp_min(torch.finfo(d.dtype).tiny)
        mu = torch.where(ok, mu, mu_fb)
    return alpha, mu


def flexible_round(W: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Nearest grid point for every element (paper eq. 10): argmin_t |(W - mu)/alpha - t|.

    A row with alpha == 0 has a single grid point: T = 0 there.
    """
    tiny = alpha.abs() <= torch.finfo(W.dtype).tiny
    inv = torch.where(tiny, torch.zeros_like(alpha), 1.0 / torch.where(tiny, torch.ones_like(alpha), alpha))
    Z = (W - mu[:, None]) * inv[:, None]
    return Z.round().clamp_(-1, 1)


def weight_error(W, T, alpha, mu) -> torch.Tensor:
    """E_w = ||W - (alpha T + mu)||_F^2 (paper eq. 6)."""
    return ((alpha[:, None] * T + mu[:, None] - W) ** 2).sum()


def itf(W, T, alpha, mu, *, max_iters: int = 50, trace: list | None = None):
    """Iterative Ternary Fitting: alternate eq. 9 and eq. 10 until T stops changing.

    On return (alpha, mu) is the least-squares grid for the returned T. If T converged
    within max_iters, T is also the nearest-grid rounding of W for that grid.
    trace, when given, receives E_w after the start and after every grid or T update.
    """
    if trace is not None:
        trace.append(float(weight_error(W, T, alpha, mu)))
    for _ in range(max_iters):
        alpha, mu = optimal_grid(W, T, None, alpha)
        if trace is not None:
            trace.append(float(weight_error(W, T, alpha, mu)))
        T_new = flexible_round(W, alpha, mu)
        if torch.equal(T_new, T):
            return T, alpha, mu
        T = T_new
        if trace is not None:
            trace.append(float(weight_error(W, T, alpha, mu)))
    alpha, mu = optimal_grid(W, T, None, alpha)  # not converged: keep the LS property
    if trace is not None:
        trace.append(float(weight_error(W, T, alpha, mu)))
    return T, alpha, mu


def quantize_block(W: torch.Tensor, H: torch.Tensor | None = None, *, itf: bool = True,
                   aga: bool = True, max_iters: int = 50):
    """ATQ on one block: init, ITF (optional), AGA with C = H (optional, needs H).

    W: [n, k]; H: [k, k] or None. Returns (T int8 [n, k] in {-1, 0, 1}, alpha [n], mu [n]),
    alpha >= 0 (a negative alpha is folded into the sign of T).
    """
    with stage("itf"):
        T, alpha, mu = init_grid(W)
        if itf:
            T, alpha, mu = _itf(W, T, alpha, mu, max_iters=max_iters)
    if aga and H is not None:
        with stage("aga"):
            alpha, mu = optimal_grid(W, T, H.to(W.dtype), alpha)
    neg = alpha < 0
    T = torch.where(neg[:, None], -T, T)
    alpha = alpha.abs()
    return T.to(torch.int8), alpha, mu


_itf = itf
