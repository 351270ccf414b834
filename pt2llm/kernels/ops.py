"""The GPU forward paths as torch custom ops, for torch.compile.

Under torch.compile, TernaryLinear and the online Hadamard call these ops instead of their
Python launchers (which dynamo cannot trace: NVRTC launches, Python-side caches). The
compiler sees one opaque op with a known output shape and fuses what lies around it (norms,
rotary embedding, the SiLU product, attention glue); eager calls keep the plain launchers.

    torch.ops.pt2llm.ternary_linear(x, packed, alpha, mu, perm, bias, n_out, block_size)
    torch.ops.pt2llm.hadamard_input(x, signs)
"""
from __future__ import annotations

from typing import Optional

import torch


@torch.library.custom_op("pt2llm::ternary_linear", mutates_args=())
def ternary_linear(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                   perm: torch.Tensor, bias: Optional[torch.Tensor], n_out: int, block_size: int) -> torch.Tensor:
    """triton_ternary.linear (its default path for x's rows) as one op."""
    from .triton_ternary import linear
    return linear(x, packed, alpha, mu, perm, bias, n_out, block_size)


@ternary_linear.register_fake
def _(x, packed, alpha, mu, perm, bias, n_out, block_size):
    return x.new_empty(*x.shape[:-1], n_out)


@torch.library.custom_op("pt2llm::hadamard_input", mutates_args=())
def hadamard_input(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """triton_hadamard.transform (x diag(signs) K_n) as one op."""
    from .triton_hadamard import transform
    return transform(x, signs)


@hadamard_input.register_fake
def _(x, signs):
    return torch.empty_like(x)
