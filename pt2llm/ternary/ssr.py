"""Column orders for the blockwise loop (paper section 3.3).

`ssr` is dynamic: the next block is chosen from the remaining, error-updated columns
(paper eq. 16). `hessian` (GPTQ's act-order), `random` and `none` are fixed up front,
for the paper's ablation (Table 2b).
"""
from __future__ import annotations

import torch

ORDERS = ("ssr", "hessian", "random", "none")


def next_block(W_rem: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (into W_rem's columns) of the next block: the top-k columns by cosine
    similarity to the mean of the remaining columns (paper eq. 16), most similar first.

    W_rem: [n, r], the remaining columns after error compensation. Zero columns have
    similarity 0. Ties keep the lower position first (stable sort), so the choice is
    deterministic.
    """
    r = W_rem.shape[1]
    if r <= k:
        return torch.arange(r, device=W_rem.device)
    mean = W_rem.mean(dim=1)
    tiny = torch.finfo(W_rem.dtype).tiny
    denom = (W_rem.norm(dim=0) * mean.norm()).clamp_min(tiny)
    sim = (mean @ W_rem) / denom
    order = torch.sort(sim, descending=True, stable=True).indices
    return order[:k]


def static_order(kind: str, m: int, H: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """A fixed column order: `none` (identity), `hessian` (descending diag H, stable),
    `random` (seeded permutation)."""
    if kind == "none":
        return torch.arange(m)
    if kind == "hessian":
        if H is None:
            raise ValueError("reorder 'hessian' needs calibration data (a Hessian)")
        return torch.sort(torch.diagonal(H).cpu(), descending=True, stable=True).indices
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(m, generator=g)
    raise ValueError(f"unknown static order {kind!r}; expected one of {ORDERS}")
