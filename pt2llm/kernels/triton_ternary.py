"""Triton kernels for TernaryLinear (format 2 packing, see pack.py), fp16 or bf16 activations.

y[m, n] = bias[n] + sum over blocks b of  alpha[n, b] * sum_{k in b} code[n, k] x[m, perm[k]]
                                        +    mu[n, b] * sum_{k in b} x[m, perm[k]]

`matmul` (the fused kernel, M <= 16): each program takes BLOCK_G packed rows (5 BLOCK_G
weight rows) and walks its share of the 128-column blocks (split-K when there are too few
row tiles to fill the GPU; the partial sums meet in a second, deterministic kernel). A
block's bytes are decoded in registers, the bytes of columns 2j and 2j+1 side by side in
the 16-bit halves of an int32, so that one multiply and two masks give each digit's two
weights as an fp16 pair, 1 + d/4 with d = code + 1, the operand a tensor-core dot takes
as is: sum_k code x = 4 dot - 5 sum_k x. The block's alpha and mu are applied once per row
and block. The activations are gathered through `perm` as they are loaded.

The decoding (fp16), per 16-bit half, with q the byte: state S = y + 0x1400 with y = q 3^i
mod 256 (S = q + 0x1400 for digit 0). Z = 3 S = 3y + 0x3C00 holds d_i in bits 8-9 above
the fp16 exponent of 1.0 (0x3C00), so Z & 0x3F00 is the fp16 number 1 + d_i/4, and
Z & 0x14FF = (3y mod 256) + 0x1400 is the next digit's state: an IMAD and two LOP3s for
two weights, each with a single immediate. bf16 (7 mantissa bits) shifts and masks instead.

`dequantize` writes the fp16 weight in stored column order; for large M (prefill) it and
one cuBLAS matmul on the gathered activations beat the fused kernel (docs/results/kernels.md).

All of it also runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1), which
is how CI checks it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FP16_STATE = tl.constexpr(0x14001400)  # 0x3C00 / 3 in each half
FP16_KEEP = tl.constexpr(0x14FF14FF)   # next state: 3y mod 256, and 0x1400 of 0x3C00
FP16_WEIGHT = tl.constexpr(0x3F003F00)  # 1.0's exponent and d: the fp16 number 1 + d/4


@triton.jit
def _state(p_ptr, rg, k, K, G, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
    """Packed bytes [BLOCK_G, BLOCK] -> int32 [BLOCK_G, BLOCK // 2]: columns 2j and 2j+1 in
    the low and high halves, as digit 0's state (times 3: Z)."""
    mask = (rg[:, None] < G) & (k[None, :] < K)
    b = tl.load(p_ptr + rg[:, None].to(tl.int64) * K + k[None, :], mask=mask, other=0)
    even, odd = tl.split(tl.reshape(b, (BLOCK_G, BLOCK // 2, 2)))
    pair = even.to(tl.int32) | (odd.to(tl.int32) << 16)
    if not BF16:
        pair = pair | FP16_STATE
    return pair * 3


@triton.jit
def _weights(z, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
    """Digit i's weights 1 + d/4 [BLOCK_G, BLOCK] from Z, and the next digit's Z."""
    if BF16:
        h = ((z >> 3) & 0x00600060) | 0x3F803F80  # bf16 1.0 is 0x3F80; d to bits 5-6
        z = (z & 0x00FF00FF) * 3
        dt: tl.constexpr = tl.bfloat16
    else:
        h = z & FP16_WEIGHT
        z = (z & FP16_KEEP) * 3
        dt: tl.constexpr = tl.float16
    lo = (h & 0xFFFF).to(tl.uint16).to(dt, bitcast=True)
    hi = (h >> 16).to(tl.uint16).to(dt, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (BLOCK_G, BLOCK)), z


@triton.jit
def _digit(acc, z, xt, s, a_ptr, m_ptr, rg, blk, N, NB, I: tl.constexpr,
           BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
    """acc += alpha * sum_k code x + mu * sum_k x over one block, weight rows 5 rg + I."""
    w, z = _weights(z, BLOCK_G, BLOCK, BF16)
    d = tl.dot(w, xt)  # [BLOCK_G, BLOCK_M] = sum_k (1 + d/4) x
    n = rg * 5 + I
    alpha = tl.load(a_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)
    mu = tl.load(m_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)
    # alpha (4 d - 5 s) + mu s, as two multiply-adds per output
    return acc + (4 * alpha)[:, None] * d + (mu - 5 * alpha)[:, None] * s[None, :], z


@triton.jit
def _store(out_ptr, acc, b_ptr, rg, rm, N, M, stride_om, I: tl.constexpr, HAS_BIAS: tl.constexpr):
    n = rg * 5 + I
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0).to(tl.float32)[:, None]
    mask = (n[:, None] < N) & (rm[None, :] < M)
    tl.store(out_ptr + rm[None, :].to(tl.int64) * stride_om + n[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_kernel(x_ptr, p_ptr, a_ptr, m_ptr, perm_ptr, b_ptr, out_ptr,
                   M, N, K, G, NB, stride_xm, stride_om, stride_os, blocks_per_split,
                   BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BF16: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rg = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK)
    acc0 = tl.zeros((BLOCK_G, BLOCK_M), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_G, BLOCK_M), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_G, BLOCK_M), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_G, BLOCK_M), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_G, BLOCK_M), dtype=tl.float32)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, NB)
    for blk in range(first, last):
        k = blk * BLOCK + kk
        cols = tl.load(perm_ptr + k, mask=k < K, other=0).to(tl.int64)
        xt = tl.load(x_ptr + rm[None, :].to(tl.int64) * stride_xm + cols[:, None],
                     mask=(k[:, None] < K) & (rm[None, :] < M), other=0.0)  # [BLOCK, BLOCK_M]
        s = tl.sum(xt.to(tl.float32), axis=0)
        z = _state(p_ptr, rg, k, K, G, BLOCK_G, BLOCK, BF16)
        acc0, z = _digit(acc0, z, xt, s, a_ptr, m_ptr, rg, blk, N, NB, 0, BLOCK_G, BLOCK, BF16)
        acc1, z = _digit(acc1, z, xt, s, a_ptr, m_ptr, rg, blk, N, NB, 1, BLOCK_G, BLOCK, BF16)
        acc2, z = _digit(acc2, z, xt, s, a_ptr, m_ptr, rg, blk, N, NB, 2, BLOCK_G, BLOCK, BF16)
        acc3, z = _digit(acc3, z, xt, s, a_ptr, m_ptr, rg, blk, N, NB, 3, BLOCK_G, BLOCK, BF16)
        acc4, z = _digit(acc4, z, xt, s, a_ptr, m_ptr, rg, blk, N, NB, 4, BLOCK_G, BLOCK, BF16)
    out_ptr += pid_s.to(tl.int64) * stride_os
    _store(out_ptr, acc0, b_ptr, rg, rm, N, M, stride_om, 0, HAS_BIAS)
    _store(out_ptr, acc1, b_ptr, rg, rm, N, M, stride_om, 1, HAS_BIAS)
    _store(out_ptr, acc2, b_ptr, rg, rm, N, M, stride_om, 2, HAS_BIAS)
    _store(out_ptr, acc3, b_ptr, rg, rm, N, M, stride_om, 3, HAS_BIAS)
    _store(out_ptr, acc4, b_ptr, rg, rm, N, M, stride_om, 4, HAS_BIAS)


@triton.jit
def _sum_splits_kernel(part_ptr, b_ptr, out_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(p_ptr, a_ptr, m_ptr, w_ptr, N, K, G, NB,
                    BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BF16: tl.constexpr):
    rg = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    blk = tl.program_id(1)
    k = blk * BLOCK + tl.arange(0, BLOCK)
    z = _state(p_ptr, rg, k, K, G, BLOCK_G, BLOCK, BF16)
    for i in tl.static_range(5):
        w, z = _weights(z, BLOCK_G, BLOCK, BF16)
        n = rg * 5 + i
        alpha = tl.load(a_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)[:, None]
        mu = tl.load(m_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)[:, None]
        v = alpha * (4 * w.to(tl.float32) - 5) + mu  # 4 (1 + d/4) - 5 = d - 1 = the code
        tl.store(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], v.to(w_ptr.dtype.element_ty),
                 mask=(n[:, None] < N) & (k[None, :] < K))


def supported(x: torch.Tensor, block_size: int) -> bool:
    """Shapes and dtypes these kernels take; anything else goes to the reference path."""
    return (x.dtype in (torch.float16, torch.bfloat16) and block_size in (32, 64, 128, 256)
            and x.shape[-1] > 0)


# Launch settings: the fused kernel's packed rows per program, warps, pipeline stages, and
# the number of programs split-K aims at; the dequantize kernel's rows per program. Found
# on an H100 by benchmarks/kernels.py --sweep, which may override them.
TUNING = {"fused": dict(block_g=64, warps=4, stages=2, programs=264),
          "dequant": dict(block_g=8, warps=4),
          "prefill_from_m": 17}


def matmul(x2: torch.Tensor, packed, alpha, mu, perm, bias, n_out: int, block_size: int, **over) -> torch.Tensor:
    """The fused kernel: x2 [M, K] contiguous rows -> [M, n_out]; `over` overrides TUNING's
    settings (and may fix `splits`)."""
    M, K = x2.shape
    G, NB = packed.shape[0], alpha.shape[1]
    cfg = {**TUNING["fused"], **over}
    bg, bm = cfg["block_g"], 16 if M <= 16 else 64
    grid_g, grid_m = triton.cdiv(G, bg), triton.cdiv(M, bm)
    splits = cfg.get("splits") or max(1, min(NB, cfg["programs"] // max(1, grid_g * grid_m)))
    per_split = triton.cdiv(NB, splits)
    splits = triton.cdiv(NB, per_split)
    out = torch.empty(M, n_out, device=x2.device, dtype=x2.dtype)
    part = out if splits == 1 else torch.empty(splits, M, n_out, device=x2.device, dtype=torch.float32)
    has_bias = bias is not None and splits == 1
    _matmul_kernel[(grid_g, grid_m, splits)](
        x2, packed, alpha, mu, perm, bias if has_bias else alpha, part,
        M, n_out, K, G, NB, x2.stride(0), n_out, M * n_out, per_split,
        BLOCK=block_size, BLOCK_G=bg, BLOCK_M=bm, HAS_BIAS=has_bias, BF16=x2.dtype == torch.bfloat16,
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    if splits > 1:
        MN, B = M * n_out, 1024
        _sum_splits_kernel[(triton.cdiv(MN, B),)](part, bias if bias is not None else alpha, out, MN, n_out,
                                                   splits, HAS_BIAS=bias is not None, BLOCK=B)
    return out


def dequantize(packed, alpha, mu, n_out: int, block_size: int, dtype=torch.float16, **over) -> torch.Tensor:
    """alpha * code + mu as [n_out, K] in `dtype`, columns in stored order."""
    G, K = packed.shape
    NB = alpha.shape[1]
    cfg = {**TUNING["dequant"], **over}
    w = torch.empty(n_out, K, device=packed.device, dtype=dtype)
    _dequant_kernel[(triton.cdiv(G, cfg["block_g"]), NB)](
        packed, alpha, mu, w, n_out, K, G, NB, BLOCK=block_size, BLOCK_G=cfg["block_g"],
        BF16=dtype == torch.bfloat16, num_warps=cfg["warps"])
    return w


def prefill(x2, packed, alpha, mu, perm, bias, n_out: int, block_size: int) -> torch.Tensor:
    """Dequantize to a scratch weight, then one cuBLAS matmul on the gathered activations."""
    w = dequantize(packed, alpha, mu, n_out, block_size, x2.dtype)
    xp = x2.index_select(1, perm.to(torch.long)) if perm.numel() else x2
    return F.linear(xp, w, None if bias is None else bias.to(x2.dtype))


def linear(x: torch.Tensor, packed, alpha, mu, perm, bias, n_out: int, block_size: int,
           path: str | None = None) -> torch.Tensor:
    """y = x[..., perm] @ W_stored^T + bias for TernaryLinear's buffers (format 2).
    path: "fused" or "prefill"; by default fused below TUNING["prefill_from_m"] rows."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if path is None:
        path = "fused" if x2.shape[0] < TUNING["prefill_from_m"] else "prefill"
    bias = None if bias is None else bias.to(x.dtype)
    fn = matmul if path == "fused" else prefill
    return fn(x2, packed, alpha, mu, perm, bias, n_out, block_size).reshape(*lead, n_out)
