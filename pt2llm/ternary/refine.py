"""Refinement after GPTQ (beyond the paper): ITF's alternation, done in the layer's own metric.

GPTQ leaves codes C and per-row, per-block grids (alpha, mu) with the loss

    L = tr((Ŵ − W) H (Ŵ − W)ᵀ),   Ŵ[r, j] = alpha[r, b(j)] C[r, j] + mu[r, b(j)],

(H damped as GPTQ used it), but neither half is optimal for the other: each block's grid
was fitted (ITF, AGA) before its columns were rounded under compensation, block by block,
and each code was rounded once, greedily, with the later columns still free. ITF alternates
the optimal grid for fixed codes with the best codes for a fixed grid in the weight metric
(E_w); `refine` alternates the same two steps in L:

- `refit_grid`: for fixed codes, the (alpha, mu) of all blocks of a row at once minimise L,
  a least-squares problem in 2·nb unknowns per row (AGA is its one-block, no-cross-term
  case). Solved in closed form from its normal equations.
- `descend`: for a fixed grid, one sweep of exact coordinate descent on the codes: each
  code in turn moves to the grid point nearest the one-dimensional minimiser of L given
  all the others, v* = v − g_j / H_jj with g = (Ŵ − W) H. The gradient is kept current
  within a block by rank-1 updates and across blocks by one matmul per block.

Each step can only lower L (the grid is rounded to its 16-bit storage after each refit, and
the best state seen is kept), so `refine` never ends worse than GPTQ by L. Works for any
code range [lo, hi]: ternary PT² and the uniform GPTQ baseline alike.
"""
from __future__ import annotations

import torch

from .gptq import QuantResult, damped, drop_dead_inputs, grid_inverse

_RIDGE = 1e-6      # relative pull of alpha towards its previous value (rows whose codes are all 0)
_CHUNK = 1 << 25   # elements of the per-chunk [rows, m, blocks] intermediate in `refit_grid`


def layer_loss(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """L per row: diag((Ŵ − W) H (Ŵ − W)ᵀ)."""
    E = W_hat - W
    return ((E @ H) * E).sum(dim=1)


def expand(grid: torch.Tensor, block_size: int, m: int) -> torch.Tensor:
    """[n, nb] per-block values -> [n, m] per column."""
    return grid.repeat_interleave(block_size, dim=1)[:, :m]


def _blocked(t: torch.Tensor, nb: int, k: int) -> torch.Tensor:
    """[..., m] -> [..., nb, k], zero-padded at the end."""
    pad = nb * k - t.shape[-1]
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], nb, k)


def refit_grid(W: torch.Tensor, C: torch.Tensor, H: torch.Tensor, block_size: int,
               alpha_prev: torch.Tensor | None = None):
    """argmin over (alpha, mu) [n, nb] of L for fixed codes C [n, m] (columns in stored
    order, blocks contiguous), with a tiny ridge towards alpha_prev so that a block whose
    codes cannot tell alpha from mu (all equal, e.g. all 0) stays well posed."""
    n, m = W.shape
    k = block_size
    nb = -(-m // k)
    dt = W.dtype
    T = _blocked(C.to(dt), nb, k)                                   # [n, nb, k]
    one = _blocked(torch.ones(m, dtype=dt, device=W.device), nb, k)  # [nb, k]
    Hb = _blocked(H, nb, k)                                         # [m, nb, k]: H[i, block c, κ]
    S = (Hb * one).sum(dim=-1)                                      # [m, nb]: Σ_{j in c} H[i, j]
    Sb = _blocked(S.T, nb, k).permute(1, 2, 0)                      # [nb, k, nb]: S[i in b, c]
    A11 = (Sb * one[:, :, None]).sum(dim=1)                         # [nb, nb]
    At1 = torch.einsum("rbk,bkc->rbc", T, Sb)                       # [n, nb, nb]
    WH = _blocked(W @ H, nb, k)                                     # [n, nb, k]
    y_t = (WH * T).sum(dim=-1)
    y_1 = (WH * one).sum(dim=-1)
    Att = torch.empty(n, nb, nb, dtype=dt, device=W.device)
    step = max(1, _CHUNK // max(1, m * nb))
    for r0 in range(0, n, step):
        Tr = T[r0:r0 + step]
        Q = torch.einsum("ick,rck->ric", Hb, Tr)                    # [r, m, nb]: Σ_{j in c} H[i, j] T[r, j]
        Att[r0:r0 + step] = torch.einsum("rbk,rbkc->rbc", Tr, _blocked(Q.transpose(1, 2), nb, k).permute(0, 2, 3, 1))
    A = torch.cat([torch.cat([Att, At1], dim=2),
                   torch.cat([At1.transpose(1, 2), A11.expand(n, nb, nb)], dim=2)], dim=1)
    rhs = torch.cat([y_t, y_1], dim=1)
    eps = _RIDGE * A11.diagonal().mean().clamp_min(torch.finfo(dt).tiny)
    ridge = torch.zeros(n, 2 * nb, dtype=dt, device=W.device)
    ridge[:, :nb] = eps
    prev = torch.zeros(n, nb, dtype=dt, device=W.device) if alpha_prev is None else alpha_prev.to(dt)
    rhs[:, :nb] += eps * prev
    A = A + torch.diag_embed(ridge)
    L, info = torch.linalg.cholesky_ex(A)
    theta = torch.cholesky_solve(rhs[:, :, None], L)[:, :, 0]
    bad = info != 0
    if bool(bad.any()):
        theta[bad] = torch.linalg.lstsq(A[bad], rhs[bad][:, :, None]).solution[:, :, 0]
    return theta[:, :nb], theta[:, nb:]


def descend(W: torch.Tensor, C: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, H: torch.Tensor,
            block_size: int, lo: int, hi: int) -> torch.Tensor:
    """One sweep of coordinate descent on the codes C [n, m] (float, stored order) for a
    fixed grid; returns the new codes. Never raises L."""
    n, m = W.shape
    k = block_size
    C = C.clone()
    inv = grid_inverse(alpha)
    G = (expand(alpha, k, m) * C + expand(mu, k, m) - W) @ H        # g = (Ŵ − W) H
    hd = H.diagonal()
    for s in range(0, m, k):
        e = min(s + k, m)
        b = s // k
        a, o, ia = alpha[:, b], mu[:, b], inv[:, b]
        Gb = G[:, s:e].clone()
        D = torch.zeros(n, e - s, dtype=W.dtype, device=W.device)
        for j in range(s, e):  # few launches per column: this loop is the hot path
            t = C[:, j]
            v = torch.addcmul(o, a, t).sub_(Gb[:, j - s] / hd[j])    # 1-D minimiser of L in Ŵ[:, j]
            t_new = torch.clamp_(torch.round_((v - o) * ia), lo, hi)
            d = a * (t_new - t)
            C[:, j] = t_new
            D[:, j - s] = d
            if j + 1 < e:
                Gb[:, j + 1 - s:].addr_(d, H[j, j + 1:e])
        G.addmm_(D, H[s:e])
    return C


def refine(result: QuantResult, W: torch.Tensor, H: torch.Tensor, lo: int, hi: int, sweeps: int = 1,
           grid_dtype: torch.dtype | None = torch.float16) -> QuantResult:
    """Alternate `refit_grid` and `descend` on a GPTQ result: refit, then `sweeps` times
    (descend, refit). W [n, m] and H [m, m] in the original column order, as given to
    `quantize_weight` (H undamped: the damping GPTQ used, result.damp, is added here).
    Returns a QuantResult with the same column order and the lowest L seen."""
    if sweeps < 0:
        raise ValueError(f"refine sweeps must be >= 0, got {sweeps}")
    n, m = W.shape
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    dev = result.codes.device
    perm = result.perm.to(dev)
    H = H.detach().to(dev, dt).clone()
    Wp = W.detach().to(dev, dt).clone()
    drop_dead_inputs(Wp, H)                                         # H and W exactly as GPTQ used them
    H = damped(H[perm][:, perm], result.damp)
    Wp = Wp[:, perm]
    k = result.block_size

    def store(alpha, mu):
        if grid_dtype is not None:
            alpha, mu = alpha.to(grid_dtype).to(dt), mu.to(grid_dtype).to(dt)
        return alpha, mu

    def loss(C, alpha, mu):
        return layer_loss(expand(alpha, k, m) * C + expand(mu, k, m), Wp, H)

    C = result.codes.to(dt)
    alpha, mu = result.scale.to(dt), result.offset.to(dt)
    best = loss(C, alpha, mu)
    C_best, a_best, m_best = C.clone(), alpha.clone(), mu.clone()

    def keep(C, alpha, mu):
        nonlocal best
        cur = loss(C, alpha, mu)
        better = cur < best
        if bool(better.any()):
            best = torch.where(better, cur, best)
            C_best[better], a_best[better], m_best[better] = C[better], alpha[better], mu[better]

    for it in range(sweeps + 1):
        if it:
            C = descend(Wp, C, alpha, mu, H, k, lo, hi)
            keep(C, alpha, mu)
        a_new, m_new = refit_grid(Wp, C, H, k, alpha)
        neg = a_new < 0   # a negative scale: mirror the codes (value = (−a)(lo + hi − c) + mu + a(lo + hi))
        if bool(neg.any()):
            negc = expand(neg, k, m)
            C = torch.where(negc, lo + hi - C, C)
            m_new = torch.where(neg, m_new + a_new * (lo + hi), m_new)
            a_new = a_new.abs()
        a_new, m_new = store(a_new, m_new)
        if not bool(torch.isfinite(a_new).all() and torch.isfinite(m_new).all()):
            break  # the refitted grid overflows its 16-bit storage: keep the best so far
        alpha, mu = a_new, m_new
        keep(C, alpha, mu)
    return QuantResult(C_best.to(result.codes.dtype), a_best.to(result.scale.dtype), m_best.to(result.offset.dtype),
                       result.perm, k, result.damp, result.recomputed)
