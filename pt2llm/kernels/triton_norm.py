"""Triton kernel for transformers' RMSNorm (Llama, Qwen2, Mistral) in one launch: the
uncompiled decode step's norms (pt2llm.nn.fused_norms, which speed.Decoder enters without
torch.compile).

transformers computes weight * (h / sqrt(mean(h^2) + eps)) as eight eager kernels (the
float32 cast, pow, mean, add, rsqrt, mul, the cast back, the weight's mul): 12 µs a norm of a
7B-shape decode step replayed as a CUDA graph on an H100, more than this kernel takes
(docs/results/e2e.md). Here one program a row does the same
arithmetic: h in float32, its mean square and rsqrt in float32, the scaled row rounded to h's
dtype, then times the weight, rounded to the output dtype (h's and the weight's promotion).
Under torch.compile Inductor fuses the norm itself (and ops.backend folds it into the ternary
linears that read it), so this is for eager calls only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WIDTH = 32768  # widest row one program takes in registers


@triton.jit
def _rms_norm_kernel(h_ptr, w_ptr, o_ptr, K, stride_h, stride_o, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    inside = k < K
    h = tl.load(h_ptr + row.to(tl.int64) * stride_h + k, mask=inside, other=0.0)
    f = h.to(tl.float32)
    rn = tl.math.rsqrt(tl.sum(f * f, axis=0) / K + eps)
    normed = (f * rn).to(h_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    w = tl.load(w_ptr + k, mask=inside, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(o_ptr + row.to(tl.int64) * stride_o + k, y.to(o_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
             mask=inside)


def supported(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """16-bit rows with a unit last stride, a contiguous weight of the row's width and dtype."""
    return (h.dtype in (torch.float16, torch.bfloat16) and weight.dtype == h.dtype and h.dim() >= 1
            and 0 < h.shape[-1] <= MAX_WIDTH and weight.shape == (h.shape[-1],) and weight.is_contiguous()
            and h.stride(-1) == 1 and h.device == weight.device)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (h / sqrt(mean(h^2, -1) + eps)) as transformers' RMSNorm computes it
    (`supported` must hold); a new contiguous tensor of h's shape."""
    K = h.shape[-1]
    h2 = h.reshape(-1, K)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    out = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
    if h2.shape[0]:
        block = triton.next_power_of_2(K)
        _rms_norm_kernel[(h2.shape[0],)](h2, weight, out, K, h2.stride(0), out.stride(0), float(eps),
                                         BLOCK=block, num_warps=4 if block <= 4096 else 8)
    return out.reshape(h.shape)
