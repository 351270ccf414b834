"""The quantization math: pure tensor functions, no models, no files."""
from __future__ import annotations

from functools import partial

from . import atq, baselines, gptq, refine, ssr, target
from .gptq import BlockQuantizer, HessianAccumulator, QuantResult, quantize_weight

METHODS = ("pt2", "rtn", "gptq")


def _pt2_fit(W, H, *, itf, aga, max_iters):
    _, alpha, mu = atq.quantize_block(W, H, itf=itf, aga=aga, max_iters=max_iters)
    return alpha, mu


def make_quantizer(method: str = "pt2", *, bits: int = 2, itf: bool = True, aga: bool = True,
                   max_iters: int = 50) -> BlockQuantizer:
    """The block grid for a method: `pt2` (ATQ: init, ITF, AGA), `rtn` (TWN ternary),
    `gptq` (uniform asymmetric int-`bits`)."""
    if method == "pt2":
        return BlockQuantizer(partial(_pt2_fit, itf=itf, aga=aga, max_iters=max_iters), -1, 1, "pt2")
    if method == "rtn":
        return BlockQuantizer(lambda W, H: baselines.twn_grid(W), -1, 1, "rtn")
    if method == "gptq":
        if not 2 <= bits <= 8:
            raise ValueError(f"--bits must be in 2..8 for gptq, got {bits}")
        return BlockQuantizer(lambda W, H: baselines.uniform_grid(W, bits), 0, 2 ** bits - 1, f"gptq{bits}")
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


__all__ = ["atq", "baselines", "gptq", "refine", "ssr", "target", "BlockQuantizer", "HessianAccumulator",
           "QuantResult", "quantize_weight", "make_quantizer", "METHODS"]
