"""Baseline block grids, run through the same blockwise loop as PT² (the paper's rows).

- `twn_grid`: symmetric ternary, TWN rule (Delta = 0.75 mean|W|, closed-form alpha),
  mu = 0. With no data and no compensation this is the `rtn` ternary baseline.
- `uniform_grid`: asymmetric uniform int-k min/max grid (GPTQ's), the `gptq` rows.
Each returns (scale, offset) per row; a value is scale * code + offset.
"""
from __future__ import annotations

import torch


def twn_grid(W: torch.Tensor):
    delta = 0.75 * W.abs().mean(dim=1)
    T = torch.sign(W) * (W.abs() > delta[:, None])
    alpha = (T * W).sum(dim=1) / T.abs().sum(dim=1).clamp_min(1)
    return alpha, torch.zeros_like(alpha)


def uniform_grid(W: torch.Tensor, bits: int):
    """GPTQ's asymmetric min/max grid: the range always contains 0, codes 0..2^bits-1,
    integer zero point. Returns (scale, offset = -scale * zero)."""
    maxq = 2 ** bits - 1
    zero = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    xmin = torch.minimum(W.min(dim=1).values, zero)
    xmax = torch.maximum(W.max(dim=1).values, zero)
    same = xmax == xmin
    xmin = torch.where(same, -torch.ones_like(xmin), xmin)
    xmax = torch.where(same, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zp = torch.round(-xmin / scale)
    return scale, -scale * zp
