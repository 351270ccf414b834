"""Fitting the float model's outputs instead of the layer's own (asymmetric calibration).

GPTQ fits each quantized linear to the float weight on the inputs X that the already
quantized part of the model produces: min ‖(Ŵ − W) X‖². Once the earlier layers are ternary,
X has drifted far from the float model's inputs X̃, and the layer's float outputs W X̃ are
what the rest of the model expects. Fitting them instead, min over Ŵ of ‖Ŵ X − W X̃‖²
(GPTAQ's objective), is the same GPTQ problem for another weight:

    ‖Ŵ X − W X̃‖² = ‖(Ŵ − W*) X‖² + const,   W* = W X̃ Xᵀ (X Xᵀ)⁻¹ = W + W D H⁻¹,

with H = X Xᵀ (GPTQ's Hessian, up to its 2/N) and D = (X̃ − X) Xᵀ on the same scale. So
`float_target` gives W*, and the unchanged quantizer (ATQ, ITF, AGA, SSR, compensation) runs
on W* with the same H. With the damped H used everywhere else, W* = W exactly when X̃ = X.
Rows of X are tokens here: H = 2/N Σ xᵀx, D = 2/N Σ (x̃ − x)ᵀ x.

The residual target (beyond GPTAQ) goes one step further for the linears whose output is
added to the residual stream (o_proj, down_proj): their sum with the stream should match the
float model's, h + Ŵx ≈ h̃ + W x̃, so they also cancel what they can of the drift r = h̃ − h
that the quantized layers before them left in the stream:

    ‖Ŵ X − (W X̃ + R)‖² = ‖(Ŵ − W*) X‖² + const,   W* = W + (W D + P) H⁻¹,   P = 2/N Σ rᵀ x.

The same least squares also refits a 16-bit linear that is not quantized at all (--fit-head:
lm_head on the final normed hidden states): W* itself is then the new weight. Its solve is
`float_target_map`, W* = W M with M = I + D (H + λI)⁻¹ [in, in], so a weight with many rows
(a 150k-token vocabulary) is mapped chunk by chunk and never held in float64 at once.
"""
from __future__ import annotations

import torch

from .gptq import HessianAccumulator, damped


class CrossAccumulator(HessianAccumulator):
    """H = 2/N Σ xᵀx (exactly `HessianAccumulator`'s) and D = 2/N Σ (x̃ − x)ᵀ x over all N
    token rows seen (running means, float32)."""

    def __init__(self, columns: int, device=None):
        super().__init__(columns, device)
        self.D = torch.zeros_like(self.H)

    def _sums(self) -> list[torch.Tensor]:
        return [self.H, self.D]

    def add(self, x: torch.Tensor, x_float: torch.Tensor) -> None:
        self._add(self._rows(x), self._rows(x_float))

    def _add(self, x: torch.Tensor, xf: torch.Tensor):
        """Accumulate H and D from token rows; returns (scale s, s·x) for further sums, or None
        when there are no rows."""
        if xf.shape != x.shape:
            raise ValueError(f"quantized-path input {tuple(x.shape)} and float-path input {tuple(xf.shape)} differ")
        if x.shape[0] == 0:
            return None
        s = self._advance(x.shape[0])
        x = x * s
        self.H.addmm_(x.T, x)
        self.D.addmm_((xf * s - x).T, x)
        return s, x


class DriftAccumulator(CrossAccumulator):
    """H and D as `CrossAccumulator`, and P = 2/N Σ rᵀ x [outputs, inputs], r = h̃ − h the
    residual stream's drift at the tokens of x."""

    def __init__(self, columns: int, outputs: int, device=None):
        super().__init__(columns, device)
        self.P = torch.zeros(outputs, columns, dtype=torch.float32, device=self.H.device)

    def _sums(self) -> list[torch.Tensor]:
        return [self.H, self.D, self.P]

    def add(self, x: torch.Tensor, x_float: torch.Tensor, drift: torch.Tensor) -> None:
        x, r = self._rows(x), self._rows(drift)
        if r.shape != (x.shape[0], self.P.shape[0]):
            raise ValueError(f"inputs {tuple(x.shape)} and drift {tuple(r.shape)} do not match")
        scaled = self._add(x, self._rows(x_float))
        if scaled is not None:
            s, xs = scaled
            self.P.addmm_((r * s).T, xs)


def _damped_solve(H: torch.Tensor, rhs: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Y with (H + λI) Y = rhs in float64, λ = percdamp · mean(diag H) (GPTQ's damping): by
    Cholesky, or least squares if the damped H is still not positive definite."""
    Hd = damped(H.double(), percdamp)
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        return torch.linalg.lstsq(Hd, rhs).solution
    return torch.cholesky_solve(rhs, L)


def float_target_map(H: torch.Tensor, D: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """M = I + D (H + λI)⁻¹ in float64 [in, in], λ = percdamp · mean(diag H): `float_target`
    without drift is W ↦ W M, for any W."""
    Y = _damped_solve(H, D.double().T, percdamp)                # H is symmetric: (D Hd⁻¹)ᵀ = Hd⁻¹ Dᵀ
    return torch.eye(H.shape[0], dtype=torch.float64, device=H.device) + Y.T


def logit_error(G: torch.Tensor, M: torch.Tensor, Hq: torch.Tensor, D: torch.Tensor, Hf: torch.Tensor) -> float:
    """Σ‖W M x − W x̃‖² over the rows accumulated in Hq = Σ xᵀx, D = Σ (x̃ − x)ᵀ x and
    Hf = Σ x̃ᵀx̃ (any common scale), from G = WᵀW alone: tr(G S) with
    S = M Hq Mᵀ − M C − Cᵀ Mᵀ + Hf, C = Σ xᵀx̃ = (D + Hq)ᵀ."""
    G, M, Hq, Hf = G.double(), M.double(), Hq.double(), Hf.double()
    C = (D.double() + Hq).T
    S = M @ Hq @ M.T - M @ C - C.T @ M.T + Hf
    return float((G * S).sum())


def float_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, percdamp: float = 0.01,
                 P: torch.Tensor | None = None) -> torch.Tensor:
    """W* = W + (W D + P) (H + λI)⁻¹, λ = percdamp · mean(diag H) (GPTQ's damping), computed in
    float64 and returned in float32: the weight whose GPTQ fit on X fits W on X̃ (plus the
    drift R, when P is given)."""
    W64 = W.double()
    WD = W64 @ D.double()
    if P is not None:
        WD = WD + P.double()
    Y = _damped_solve(H, WD.T, percdamp)                        # Hd Y = (W D + P)ᵀ; Hd is symmetric
    return (W64 + Y.T).to(torch.float32)
