"""Reference forward: correct on any device, not fast."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight_permuted: torch.Tensor, perm: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """y = x[..., perm] @ weight_permuted^T + bias, weight_permuted [out, in] with its
    columns in the stored order."""
    xp = x.index_select(-1, perm.to(device=x.device, dtype=torch.long))
    w = weight_permuted.to(x.dtype)
    return F.linear(xp, w, None if bias is None else bias.to(x.dtype))
