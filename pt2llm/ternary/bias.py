"""A fitted 16-bit bias per output row (beyond the paper): GPTQ on the centered Hessian.

GPTQ fits Ŵ to a target on the calibration inputs, min ‖Ŵ X − Y‖² (Y = W X; with
`ternary.target`, the float outputs W X̃ plus the residual drift R). Give each output row a
free bias b as well, min over Ŵ and b of ‖Ŵ X + b 1ᵀ − Y‖². For any Ŵ the best b is

    b = ȳ − Ŵ m,   m the mean input row, ȳ the mean target (W m̃ + r̄, plus the old bias),

and what is left is the same problem on centered data, ‖Ŵ (X − m 1ᵀ) − (Y − ȳ 1ᵀ)‖². So the
quantizer runs unchanged on centered statistics: with H = 2/N Σ xᵀx and the cross terms of
`ternary.target` on the same scale,

    Hc = H − 2 m mᵀ,   Dc = D − 2 (m̃ − m) mᵀ,   Pc = P − 2 r̄ mᵀ.

GPTQ on H must spend codes on the inputs' common direction m; on Hc it need not, since b
absorbs it. That matters where inputs share a large mean: o_proj's input carries v_proj's
bias through every attention row (rows of softmax sum to 1), and the inputs of late layers
share a common direction. Cost: 16 bits per output row (0.018 bits a weight at 896 inputs).
"""
from __future__ import annotations

import torch


def center(H: torch.Tensor, mean: torch.Tensor, D: torch.Tensor | None = None,
           mean_float: torch.Tensor | None = None, P: torch.Tensor | None = None,
           mean_drift: torch.Tensor | None = None):
    """(Hc, Dc, Pc): H, D and P about the input mean m (each None stays None), computed in
    float64 and returned in H's dtype. mean_float (m̃) is needed with D, mean_drift (r̄) with P."""
    m = mean.double()
    Hc = (H.double() - 2 * torch.outer(m, m)).to(H.dtype)
    Dc = Pc = None
    if D is not None:
        Dc = (D.double() - 2 * torch.outer(mean_float.double() - m, m)).to(D.dtype)
    if P is not None:
        Pc = (P.double() - 2 * torch.outer(mean_drift.double(), m)).to(P.dtype)
    return Hc, Dc, Pc


def fitted_bias(W: torch.Tensor, W_hat: torch.Tensor, mean: torch.Tensor,
                mean_float: torch.Tensor | None = None, mean_drift: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """b = b0 + W m̃ + r̄ − Ŵ m in float32 [out]: the bias that makes the quantized linear's
    mean output on the calibration inputs equal the target's mean (b0 the linear's own bias,
    m̃ = m without a float stream, r̄ = 0 without drift)."""
    m = mean.double()
    mf = m if mean_float is None else mean_float.double()
    b = W.double() @ mf - W_hat.double() @ m
    if mean_drift is not None:
        b = b + mean_drift.double()
    if bias is not None:
        b = b + bias.double()
    return b.to(torch.float32)
