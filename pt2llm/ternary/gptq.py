"""GPTQ's blockwise loop with exact inverse-Hessian error compensation under any
column order, fixed or chosen block by block (SSR).

The loop knows nothing of what a block's grid is: a `BlockQuantizer` fits a per-row
(scale, offset) to a block, and every column of the block is then rounded, one after
the other, to the nearest code in [lo, hi] of that grid (value = scale * code + offset),
its error spread over the not yet quantized columns through the inverse Hessian.

Exactness under a dynamic order: we keep M = inverse of H restricted to the remaining
columns, in the order of the remaining columns. For the next block B (moved to the
front), the rows of the upper Cholesky factor of M that GPTQ needs are
U_BB = chol(M_BB) and U_BR = U_BB^-T M_BR; after the block, the remaining inverse is
the Schur complement M_RR - U_BR^T U_BR, which equals inv(H_RR). With a fixed order this
is exactly GPTQ's single Cholesky of H^-1.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..timing import stage
from . import ssr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockQuantizer:
    """fit(W_block [n, k], H_block [k, k] or None) -> (scale [n], offset [n]);
    codes are integers in [lo, hi]."""
    fit: Callable
    lo: int
    hi: int
    name: str = ""


@dataclass
class QuantResult:
    codes: torch.Tensor    # int8 [n, m] (int16 for codes above 127), columns in quantization order
    scale: torch.Tensor    # [n, ceil(m / block_size)]
    offset: torch.Tensor   # [n, ceil(m / block_size)]
    perm: torch.Tensor     # int64 [m]: position j holds original column perm[j]
    block_size: int
    damp: float            # damping actually used (relative to mean diag H)
    recomputed: int = 0    # times the remaining inverse had to be rebuilt

    def dequantize(self) -> torch.Tensor:
        """W_hat [n, m] in the ORIGINAL column order (float32)."""
        s = self.scale.repeat_interleave(self.block_size, dim=1)[:, : self.codes.shape[1]]
        o = self.offset.repeat_interleave(self.block_size, dim=1)[:, : self.codes.shape[1]]
        Wp = s.float() * self.codes.float() + o.float()
        W = torch.empty_like(Wp)
        W[:, self.perm] = Wp
        return W


class HessianAccumulator:
    """H = 2 X X^T / N over all N rows of X seen so far, in float32 (running mean)."""

    def __init__(self, columns: int, device=None):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = self._rows(x)
        if x.shape[0] == 0:
            return
        x = x * self._advance(x.shape[0])
        self.H.addmm_(x.T, x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)

    def _advance(self, b: int) -> float:
        """Rescale the sums kept so far to a mean over n + b rows; returns the factor
        sqrt(2 / (n + b)) for the b new rows."""
        keep = self.n / (self.n + b)
        for t in self._sums():
            t.mul_(keep)
        self.n += b
        return math.sqrt(2.0 / self.n)

    def _sums(self) -> list[torch.Tensor]:
        return [self.H]


def grid_inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, with 0 where scale is 0 (a single-point grid rounds to code 0)."""
    zero = scale == 0
    return torch.where(zero, torch.zeros_like(scale), 1.0 / torch.where(zero, torch.ones_like(scale), scale))


def round_to_grid(w, scale, offset, lo: int, hi: int, inv=None):
    """Nearest code in [lo, hi] for w on per-row grids (value = scale * code + offset)."""
    inv = grid_inverse(scale) if inv is None else inv
    return torch.clamp_(torch.round_((w - offset) * inv), lo, hi)


def drop_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    """In place: inputs that never fire (zero diagonal of H) weigh 1 in H and target 0 in W,
    so H is invertible and nothing is fitted to them."""
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I: GPTQ's damping, relative to the mean diagonal."""
    mean_diag = torch.diagonal(H).abs().mean().clamp_min(torch.finfo(H.dtype).tiny)
    return H + damp * mean_diag * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def _damped_inverse(H: torch.Tensor, percdamp: float, max_tries: int = 8):
    """inv(`damped`(H, damp)) via Cholesky, raising damp tenfold on failure.
    Returns (inverse, damp used, damped H)."""
    damp = percdamp
    for attempt in range(max_tries):
        Hd = damped(H, damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            M = torch.cholesky_inverse(L)
            if bool(torch.isfinite(M).all()):
                if attempt:
                    log.warning("Cholesky of H failed at damping %g; used %g", percdamp, damp)
                return M, damp, Hd
        damp = damp * 10 if damp > 0 else 1e-6
    raise RuntimeError(f"Hessian is not positive definite even with damping {damp:g}")


def quantize_weight(W: torch.Tensor, H: torch.Tensor | None, quantizer: BlockQuantizer, *,
                    block_size: int = 128, reorder: str | torch.Tensor = "none", percdamp: float = 0.01,
                    seed: int = 0, grid_dtype: torch.dtype | None = torch.float16) -> QuantResult:
    """Quantize W [n, m] block by block.

    H None: no data, no compensation (round-to-nearest on each block's grid, no AGA).
    reorder: one of ssr.ORDERS, or an explicit permutation (LongTensor [m]). grid_dtype: (scale, offset) are rounded to it before the
    columns are rounded, so compensation sees exactly the values that are stored.
    """
    if block_size <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    explicit = isinstance(reorder, torch.Tensor)
    if not explicit and reorder not in ssr.ORDERS:
        raise ValueError(f"unknown reorder {reorder!r}; expected one of {ssr.ORDERS}")
    n, m = W.shape
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wr = W.detach().to(dtype).clone()
    dev = Wr.device
    compensate = H is not None
    damp = 0.0
    if compensate:
        H = H.detach().to(dev, dtype).clone()
        drop_dead_inputs(Wr, H)
        M, damp, Hd = _damped_inverse(H, percdamp)
    rem = torch.arange(m, device=dev)
    dynamic = not explicit and reorder == "ssr"
    if not dynamic:
        order = reorder.to(dev) if explicit else ssr.static_order(reorder, m, H, seed).to(dev)
        rem = rem[order]
        Wr = Wr[:, order]
        if compensate:
            M = M[order][:, order]

    nb = -(-m // block_size)
    code_dtype = torch.int8 if -128 <= quantizer.lo and quantizer.hi <= 127 else torch.int16
    codes = torch.empty(n, m, dtype=code_dtype, device=dev)
    scales = torch.empty(n, nb, dtype=dtype, device=dev)
    offsets = torch.empty(n, nb, dtype=dtype, device=dev)
    perm = torch.empty(m, dtype=torch.long, device=dev)
    recomputed = 0
    for b in range(nb):
        start = b * block_size
        k = min(block_size, m - start)
        if dynamic:
            with stage("ssr"):
                pos = ssr.next_block(Wr, k)
                rest = torch.ones(Wr.shape[1], dtype=torch.bool, device=dev)
                rest[pos] = False
                idx = torch.cat([pos, rest.nonzero().flatten()])
                Wr, rem = Wr[:, idx], rem[idx]
                if compensate:
                    M = M[idx][:, idx]
        cols = rem[:k]
        perm[start:start + k] = cols
        Wb = Wr[:, :k].clone()
        Hb = H[cols][:, cols] if compensate else None
        scale, offset = quantizer.fit(Wb, Hb)
        if grid_dtype is not None:
            scale, offset = scale.to(grid_dtype).to(dtype), offset.to(grid_dtype).to(dtype)
            if not bool(torch.isfinite(scale).all() and torch.isfinite(offset).all()):
                raise ValueError(f"weights up to {float(Wb.abs().max()):.3g} overflow the {grid_dtype} grid "
                                 f"(alpha/mu are stored in 16 bits)")
        scales[:, b], offsets[:, b] = scale, offset
        with stage("compensation"):
            if compensate:
                U, info = torch.linalg.cholesky_ex(M[:k, :k], upper=True)
                if int(info) != 0:  # round-off has eroded the Schur complement: rebuild it
                    recomputed += 1
                    M = torch.cholesky_inverse(torch.linalg.cholesky(Hd[rem][:, rem]))
                    U = torch.linalg.cholesky(M[:k, :k], upper=True)
                Err = torch.empty(n, k, dtype=dtype, device=dev)
            inv = grid_inverse(scale)
            C = torch.empty(n, k, dtype=dtype, device=dev)
            if compensate:
                inv_diag = 1.0 / torch.diagonal(U)
            for j in range(k):  # few launches per column: this loop is the hot path
                w = Wb[:, j]
                c = round_to_grid(w, scale, offset, quantizer.lo, quantizer.hi, inv)
                C[:, j] = c
                if compensate:
                    err = torch.addcmul(w, scale, c, value=-1).sub_(offset).mul_(inv_diag[j])
                    Wb[:, j + 1:].addr_(err, U[j, j + 1:], alpha=-1)
                    Err[:, j] = err
            codes[:, start:start + k] = C.to(code_dtype)
            if compensate and k < Wr.shape[1]:
                U_BR = torch.linalg.solve_triangular(U.T, M[:k, k:], upper=False)
                Wr = Wr[:, k:] - Err @ U_BR
                M = M[k:, k:] - U_BR.T @ U_BR
            else:
                Wr = Wr[:, k:]
                if compensate:
                    M = M[k:, k:]
        rem = rem[k:]
    return QuantResult(codes, scales, offsets, perm, block_size, damp, recomputed)
