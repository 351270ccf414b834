"""Triton kernels for TernaryLinear (format 2 packing, see pack.py), fp16 or bf16 activations.

y[m, n] = bias[n] + sum over blocks b of  alpha[n, b] * sum_{k in b} code[n, k] x[m, perm[k]]
                                        +    mu[n, b] * sum_{k in b} x[m, perm[k]]

`matmul` (the fused kernel, M <= 16; linear() takes it from M = 5, `gemv` below): each program takes BLOCK_G packed rows (5 BLOCK_G
weight rows) and walks its share of the 128-column blocks (split-K when there are too few
row tiles to fill the GPU; the partial sums meet in a second, deterministic kernel). A
block's bytes are decoded in registers, the bytes of columns 2j and 2j+1 side by side in
the 16-bit halves of an int32, so that one multiply and two masks give each digit's two
weights as an fp16 pair, 1 + d/4 with d = code + 1, the operand a tensor-core dot takes
as is: sum_k code x = 4 dot - 5 sum_k x. The block's alpha and mu are applied once per row
and block. The activations are gathered through `perm` as they are loaded. (Pairing
columns j and j + 64 instead, which needs no reshape/split/join, was tried and measured
slower on an H100, 2026-11-22: fused 11008x4096 M=1 24.8 vs 20.8 us, 28672x8192 M=1 130.1
vs 104.8 us; dequantize no faster, all within 5%.)

The decoding (fp16), per 16-bit half, with q the byte: state S = y + 0x1400 with y = q 3^i
mod 256 (S = q + 0x1400 for digit 0). Z = 3 S = 3y + 0x3C00 holds d_i in bits 8-9 above
the fp16 exponent of 1.0 (0x3C00), so Z & 0x3F00 is the fp16 number 1 + d_i/4, and
Z & 0x14FF = (3y mod 256) + 0x1400 is the next digit's state: an IMAD and two LOP3s for
two weights, each with a single immediate. bf16 (7 mantissa bits) shifts and masks instead.
Any two bytes can share an int32: the pairing only has to be undone when storing.

`gemv` (the decode kernel, M <= TUNING["gemv_up_to_m"], default 4; NOT YET MEASURED ON A
GPU): no tl.dot, whose M = 1 use wastes 15/16 of the MMA and moves the decoded weights to the
operand layout through shared memory. A program takes BLOCK_G packed rows and all M rows of
x (BLOCK_M = M rounded up to a power of two), walks its share of the blocks (split-K and the
same second kernel as `matmul`), CB blocks a step. Each byte sits in its own int32 lane:
Z = 3 q 2^14 + 0x3F800000 (fp32 1.0) holds d_i's two bits at 22-23, the exponent's lowest
bit and the mantissa's highest, so Z & 0xFFC00000 is the fp32 number 1.0 + d/2 exactly (1,
1.5, 2: 1.0's exponent bit 23 plus d 2^22, carries included), and (Z & 0x003FC000) * 3 + 1.0
is the next digit's Z: an IMAD and two LOP3s a weight (1.0 is a run-time argument so the
compiler keeps it inside the IMAD). Then one FMA a weight and row of x: sum_k code x =
2 sum_k w x - 3 sum_k x, alpha and mu once per row and block after a sum over the block's
columns (the columns split in four, 4j + c, so that a thread's products chain in FMAs;
tl.sum adds as a tree). The tiles keep one 4-D layout throughout (the bytes' load: 16 bytes a
thread). Compiled offline for sm_90 (no GPU at hand), M = 1, BLOCK_G = 64, 4 warps: about 5.4
instructions a weight in the loop (3 decode, 1.2 multiply-add, the rest the reductions over
threads, alpha, mu, layout changes of x); M = 4, BLOCK_G = 16: about 3.2 a weight and row.
Options: `pregather` gathers x[:, perm] by a small kernel first (`gather_columns`) instead of
in the kernel's loads; `prefetch` loads the next step's tiles before the current step's work.

For large M (`prefill`) the weight is dequantized to a scratch tensor and one cuBLAS
matmul follows (docs/results/kernels.md). Two dequantize kernels:
- `dequantize`: columns in stored order; a program takes BLOCK_G packed rows and one block,
  so alpha and mu are one value per weight row.
- `dequantize_original` (what prefill uses): columns in the ORIGINAL order, w[:, c] =
  stored column inv_perm[c], so that prefill needs no gather of the activations (torch's
  x[:, perm] took 31 / 143 / 92 us at M = 2048, K = 4096 / 11008 / 8192: up to 60% of the
  fp16 matmul). A program takes one packed row (5 weight rows) and walks all columns,
  BLOCK_C at a time; its stores are whole rows of the tile, coalesced. The reads are
  gathers: the bytes at the stored columns inv_perm[c] and alpha, mu at their blocks
  inv_perm[c] // BLOCK. Gathered from device memory (through L1) they made the kernel
  1.2x to 1.9x slower than `dequantize` (H100, 2026-11-22, best tiles); so the packed row
  is loaded once, coalesced, 4 bytes a word, and gathered from on chip (tl.gather, through
  shared memory), as are the rows' alpha and mu. Measured then (BLOCK_C 1024, 8 warps)
  against `dequantize`: 47 vs 39 us (11008x4096), 59 vs 41 (4096x11008), 210 vs 213-250
  (28672x8192), 342 vs 241 (8192x28672); prefill at M = 2048, fp16 time over ours, went
  from 0.56-0.79x (docs/results/kernels.md) to 0.70-0.84x.
  The row takes K bytes of shared memory (rounded up to a power of two): wider layers
  (K > MAX_ORIGINAL_K) dequantize in stored order and gather the activations instead.

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
def _state(b, R: tl.constexpr, C: tl.constexpr, BF16: tl.constexpr):
    """Packed bytes [R, C] -> int32 [R, C // 2]: the bytes of tile columns 2j and 2j+1 in the
    low and high halves, as digit 0's state (times 3: Z)."""
    even, odd = tl.split(tl.reshape(b, (R, C // 2, 2)))
    pair = even.to(tl.int32) | (odd.to(tl.int32) << 16)
    if not BF16:
        pair = pair | FP16_STATE
    return pair * 3


@triton.jit
def _weights(z, R: tl.constexpr, C: tl.constexpr, BF16: tl.constexpr):
    """Digit i's weights 1 + d/4 [R, C] (fp16 or bf16) from Z, and the next digit's Z."""
    if BF16:
        h = ((z >> 3) & 0x00600060) | 0x3F803F80  # bf16 1.0 is 0x3F80; d to bits 5-6
        z = (z & 0x00FF00FF) * 3
        dt: tl.constexpr = tl.bfloat16
    else:
        h = z & FP16_WEIGHT
        z = (z & FP16_KEEP) * 3
        dt: tl.constexpr = tl.float16
    lo = (h & 0xFFFF).to(tl.uint16).to(dt, bitcast=True)
    hi = (h >> 16).to(tl.uint16).to(dt, bitcast=True)  # h >= 0: the shift brings in zeros
    return tl.reshape(tl.join(lo, hi), (R, C)), z


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
        b = tl.load(p_ptr + rg[:, None].to(tl.int64) * K + k[None, :],
                    mask=(rg[:, None] < G) & (k[None, :] < K), other=0)
        z = _state(b, BLOCK_G, BLOCK, BF16)
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


FP32_ONE_BITS = 0x3F800000  # fp32 1.0, added to 3 y 2^14: d adds to bits 22-23; a run-time
# argument of the GEMV kernel, so that the compiler cannot see its bits and split the IMAD
FP32_WEIGHT = tl.constexpr(-4194304)    # 0xFFC00000: 1.0 + d 2^22, the fp32 number 1 + d/2
FP32_KEEP = tl.constexpr(0x003FC000)    # y = q 3^i mod 256 in bits 14-21: the next digit's state


@triton.jit
def _gemv_kernel(x_ptr, p_ptr, a_ptr, m_ptr, perm_ptr, b_ptr, out_ptr,
                 M, N, K, G, NB, stride_xm, stride_om, stride_os, steps_per_split, one,
                 BLOCK: tl.constexpr, CB: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                 GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr):
    """Decode GEMV, no tl.dot: BLOCK_G packed rows (5 BLOCK_G weight rows) against all M <=
    BLOCK_M rows of x, CB blocks (CB BLOCK columns) a step, over this split's steps (see the
    module docstring). Every tile is 4-D, [row of x, packed row, block, column in the block],
    loaded so, and sums keep their dimensions, so that all of it stays in the layout of the
    bytes' load (with rank changes Triton moved the decoded weights through shared memory).
    `one` = FP32_ONE_BITS. PREFETCH: load step i + 1's tiles before step i's work (Triton's
    pipelining, num_stages, does nothing for loads that feed no tl.dot)."""
    pid_g = tl.program_id(0)
    pid_s = tl.program_id(1)
    rg = (pid_g * BLOCK_G + tl.arange(0, BLOCK_G))[None, :, None, None]  # [1, BLOCK_G, 1, 1]
    rm = tl.arange(0, BLOCK_M)[:, None, None, None]  # [BLOCK_M, 1, 1, 1]
    cb = tl.arange(0, CB)[None, None, :, None]  # [1, 1, CB, 1]
    kk = tl.arange(0, BLOCK)[None, None, None, :]  # [1, 1, 1, BLOCK]
    acc0 = tl.zeros((BLOCK_M, BLOCK_G, CB, 1), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_G, CB, 1), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_G, CB, 1), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_G, CB, 1), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_M, BLOCK_G, CB, 1), dtype=tl.float32)
    n0 = (rg * 5).to(tl.int64) * NB  # digit 0's rows' offsets in alpha, mu
    row_ok = rg < G
    p_rows = p_ptr + rg.to(tl.int64) * K
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm
    m_ok = rm < M
    first = pid_s * steps_per_split
    last = tl.minimum(first + steps_per_split, tl.cdiv(NB, CB))
    if PREFETCH:  # the first step's tiles; each step then loads the next one's before its work
        x_next, b_next = _gemv_tiles(first, last, x_rows, m_ok, p_rows, row_ok, perm_ptr, K, cb, kk,
                                     BLOCK, CB, GATHER)
    for step in range(first, last):
        if PREFETCH:
            x, b = x_next, b_next
            x_next, b_next = _gemv_tiles(step + 1, last, x_rows, m_ok, p_rows, row_ok, perm_ptr, K, cb, kk,
                                         BLOCK, CB, GATHER)
        else:
            x, b = _gemv_tiles(step, last, x_rows, m_ok, p_rows, row_ok, perm_ptr, K, cb, kk, BLOCK, CB, GATHER)
        blk = step * CB + cb  # [1, 1, CB, 1]
        x = x.to(tl.float32)  # [BLOCK_M, 1, CB, BLOCK]
        s = tl.sum(x, axis=3, keep_dims=True)  # [BLOCK_M, 1, CB, 1]: sum_k x per row and block
        x0, x1, x2, x3 = _quarters(x, BLOCK_M, 1, CB, BLOCK)
        b0, b1, b2, b3 = _quarters(b, 1, BLOCK_G, CB, BLOCK)
        # digit 0's Z: 3 q 2^14 + 1.0, for the columns 4j + c, c = 0..3
        z0 = b0.to(tl.int32) * (3 << 14) + one
        z1 = b1.to(tl.int32) * (3 << 14) + one
        z2 = b2.to(tl.int32) * (3 << 14) + one
        z3 = b3.to(tl.int32) * (3 << 14) + one
        ab = n0 + blk  # [1, BLOCK_G, CB, 1]
        ab_ok = row_ok & (blk < NB)
        acc0, z0, z1, z2, z3 = _gemv_digit(acc0, z0, z1, z2, z3, one, x0, x1, x2, x3, s, a_ptr, m_ptr, ab, ab_ok,
                                           rg, N, NB, 0)
        acc1, z0, z1, z2, z3 = _gemv_digit(acc1, z0, z1, z2, z3, one, x0, x1, x2, x3, s, a_ptr, m_ptr, ab, ab_ok,
                                           rg, N, NB, 1)
        acc2, z0, z1, z2, z3 = _gemv_digit(acc2, z0, z1, z2, z3, one, x0, x1, x2, x3, s, a_ptr, m_ptr, ab, ab_ok,
                                           rg, N, NB, 2)
        acc3, z0, z1, z2, z3 = _gemv_digit(acc3, z0, z1, z2, z3, one, x0, x1, x2, x3, s, a_ptr, m_ptr, ab, ab_ok,
                                           rg, N, NB, 3)
        acc4, z0, z1, z2, z3 = _gemv_digit(acc4, z0, z1, z2, z3, one, x0, x1, x2, x3, s, a_ptr, m_ptr, ab, ab_ok,
                                           rg, N, NB, 4)
    out_ptr += pid_s.to(tl.int64) * stride_os
    _gemv_store(out_ptr, acc0, b_ptr, rg, rm, N, M, stride_om, 0, HAS_BIAS)
    _gemv_store(out_ptr, acc1, b_ptr, rg, rm, N, M, stride_om, 1, HAS_BIAS)
    _gemv_store(out_ptr, acc2, b_ptr, rg, rm, N, M, stride_om, 2, HAS_BIAS)
    _gemv_store(out_ptr, acc3, b_ptr, rg, rm, N, M, stride_om, 3, HAS_BIAS)
    _gemv_store(out_ptr, acc4, b_ptr, rg, rm, N, M, stride_om, 4, HAS_BIAS)


@triton.jit
def _gemv_tiles(step, last, x_rows, m_ok, p_rows, row_ok, perm_ptr, K, cb, kk,
                BLOCK: tl.constexpr, CB: tl.constexpr, GATHER: tl.constexpr):
    """Step `step`'s activations [BLOCK_M, 1, CB, BLOCK] (as stored) and packed bytes
    [1, BLOCK_G, CB, BLOCK]; nothing is read from step `last` on (zeros)."""
    k = (step * CB + cb) * BLOCK + kk  # [1, 1, CB, BLOCK]: stored columns
    k_ok = k < tl.where(step < last, K, 0)  # not (k < K) & (step < last): the interpreter fails
    if GATHER:
        cols = tl.load(perm_ptr + k, mask=k_ok, other=0)
    else:
        cols = k
    x = tl.load(x_rows + cols, mask=m_ok & k_ok, other=0.0)
    b = tl.load(p_rows + k, mask=row_ok & k_ok, other=0)
    return x, b


@triton.jit
def _quarters(t, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    """t [A, B, C, BLOCK] -> its columns 4j, 4j + 1, 4j + 2, 4j + 3: four [A, B, C, BLOCK // 4]."""
    even, odd = tl.split(tl.reshape(t, (A, B, C, BLOCK // 4, 2, 2)))
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _weight(z, one):
    """Digit i's fp32 weights 1 + d/2 = (code + 3) / 2 from Z, and the next digit's Z."""
    return (z & FP32_WEIGHT).to(tl.float32, bitcast=True), (z & FP32_KEEP) * 3 + one


@triton.jit
def _gemv_digit(acc, z0, z1, z2, z3, one, x0, x1, x2, x3, s, a_ptr, m_ptr, ab, ab_ok, rg, N, NB, I: tl.constexpr):
    """acc [BLOCK_M, BLOCK_G, CB, 1] += alpha (2 sum_k w x - 3 sum_k x) + mu sum_k x for weight
    rows 5 rg + I (w = 1 + d/2), the block's columns in four quarters (z0..z3, x0..x3: columns
    4j + c) so that the products of a thread's columns chain in FMAs (tl.sum adds as a tree,
    a multiply and an add more per two weights); returns it and the next digit's Zs."""
    w0, z0 = _weight(z0, one)  # [1, BLOCK_G, CB, BLOCK // 4]
    w1, z1 = _weight(z1, one)
    w2, z2 = _weight(z2, one)
    w3, z3 = _weight(z3, one)
    d = tl.fma(w3, x3, tl.fma(w2, x2, tl.fma(w1, x1, w0 * x0)))  # [BLOCK_M, BLOCK_G, CB, BLOCK // 4]
    d = tl.sum(d, axis=3, keep_dims=True)  # [BLOCK_M, BLOCK_G, CB, 1]
    ok = ab_ok & (rg * 5 + I < N)
    alpha = tl.load(a_ptr + ab + I * NB, mask=ok, other=0).to(tl.float32)
    mu = tl.load(m_ptr + ab + I * NB, mask=ok, other=0).to(tl.float32)
    return acc + alpha * (2 * d - 3 * s) + mu * s, z0, z1, z2, z3


@triton.jit
def _gemv_store(out_ptr, acc, b_ptr, rg, rm, N, M, stride_om, I: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = tl.sum(acc, axis=2, keep_dims=True)  # [BLOCK_M, BLOCK_G, 1, 1]
    n = rg * 5 + I
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n < N, other=0).to(tl.float32)
    tl.store(out_ptr + rm.to(tl.int64) * stride_om + n, y.to(out_ptr.dtype.element_ty), mask=(rm < M) & (n < N))


@triton.jit
def _gather_kernel(x_ptr, perm_ptr, out_ptr, K, stride_xm, BLOCK: tl.constexpr):
    """out[m, k] = x[m, perm[k]]: the activations in stored column order, once per call."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.program_id(1).to(tl.int64)
    cols = tl.load(perm_ptr + k, mask=k < K, other=0)
    tl.store(out_ptr + m * K + k, tl.load(x_ptr + m * stride_xm + cols, mask=k < K), mask=k < K)


@triton.jit
def _dequant_kernel(p_ptr, a_ptr, m_ptr, w_ptr, N, K, G, NB,
                    BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BF16: tl.constexpr):
    """W[n, k] = alpha * code + mu, stored column order: BLOCK_G packed rows (5 BLOCK_G weight
    rows) and block blk's columns."""
    rg = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    blk = tl.program_id(1)
    k = blk * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(p_ptr + rg[:, None].to(tl.int64) * K + k[None, :], mask=(rg[:, None] < G) & (k[None, :] < K), other=0)
    z = _state(b, BLOCK_G, BLOCK, BF16)
    for i in tl.static_range(5):
        w, z = _weights(z, BLOCK_G, BLOCK, BF16)
        n = rg * 5 + i
        alpha = tl.load(a_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)[:, None]
        mu = tl.load(m_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)[:, None]
        v = alpha * (4 * w.to(tl.float32) - 5) + mu  # 4 (1 + d/4) - 5 = d - 1 = the code
        tl.store(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], v.to(w_ptr.dtype.element_ty),
                 mask=(n[:, None] < N) & (k[None, :] < K))


@triton.jit
def _dequant_original_kernel(p_ptr, a_ptr, m_ptr, inv_ptr, w_ptr, N, K, NB,
                             BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr,
                             NBP: tl.constexpr, BF16: tl.constexpr):
    """W[n, c] = alpha * code + mu, original column order, for packed row g (weight rows 5g to
    5g + 4) and all columns, BLOCK_C at a time: column c is stored column s = inv_perm[c].
    The packed row (K bytes, KP = K rounded up to a power of two) is loaded once, coalesced,
    and the bytes at s taken from it in the chip (tl.gather: through shared memory), as are
    each row's alpha and mu at block s // BLOCK (NBP >= NB)."""
    g = tl.program_id(0)
    kk = tl.arange(0, KP)
    row = tl.load(p_ptr + g.to(tl.int64) * K + kk, mask=kk < K, other=0).to(tl.int32)
    # 4 bytes a word (bytes in registers take a register each): word j holds bytes 4j to 4j + 3
    even, odd = tl.split(tl.reshape(row, (KP // 4, 2, 2)))  # [j, a]: bytes 4j + 2a, 4j + 2a + 1
    b0, b2 = tl.split(even)
    b1, b3 = tl.split(odd)
    words = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)
    nb = tl.arange(0, NBP)
    for c0 in range(0, K, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        s = tl.load(inv_ptr + c, mask=c < K, other=0).to(tl.int32)
        blk = s // BLOCK
        b = (tl.gather(words, s >> 2, 0) >> ((s & 3) * 8)) & 0xFF
        z = _state(tl.reshape(b, (1, BLOCK_C)), 1, BLOCK_C, BF16)
        for i in tl.static_range(5):
            w, z = _weights(z, 1, BLOCK_C, BF16)
            n = g * 5 + i
            na = tl.minimum(n, N - 1).to(tl.int64)  # rows past N (the last byte's): not stored
            arow = tl.load(a_ptr + na * NB + nb, mask=nb < NB, other=0)
            mrow = tl.load(m_ptr + na * NB + nb, mask=nb < NB, other=0)
            alpha = tl.gather(arow, blk, 0).to(tl.float32)[None, :]
            mu = tl.gather(mrow, blk, 0).to(tl.float32)[None, :]
            v = alpha * (4 * w.to(tl.float32) - 5) + mu
            tl.store(w_ptr + n.to(tl.int64) * K + c[None, :], v.to(w_ptr.dtype.element_ty),
                     mask=c[None, :] < tl.where(n < N, K, 0))  # not (n < N) & ...: the interpreter fails


def supported(x: torch.Tensor, block_size: int) -> bool:
    """Shapes and dtypes these kernels take; anything else goes to the reference path."""
    return (x.dtype in (torch.float16, torch.bfloat16) and block_size in (32, 64, 128, 256)
            and x.shape[-1] > 0)


# Launch settings, found on an H100 by benchmarks/kernels.py --sweep (which may override
# them; benchmarks/e2e.py --tuning reads a saved set): the fused kernel's packed rows per
# program, warps, pipeline stages and the number of programs split-K aims at; the stored-
# order dequantize kernel's packed rows per program and warps; the original-order one's
# columns per step and warps. The GEMV kernel's ("gemv", NOT YET TUNED on a GPU): packed
# rows per program, columns per step (a multiple of the block size, rounded up to one
# block), warps, stages, programs for split-K, and pregather (gather x[:, perm] by a small
# kernel first instead of in the kernel's loads), prefetch (load a step ahead); "gemv_by_m"
# (optional) overrides them per BLOCK_M ("2", "4"). linear() takes gemv up to
# "gemv_up_to_m" rows, fused below "prefill_from_m", prefill from there. Keys these
# functions do not read (an older file's "variant", "blocks") are ignored; a file without
# "dequant_original", "gemv", "gemv_by_m" or "gemv_up_to_m" leaves those defaults.
TUNING = {"fused": dict(block_g=64, warps=4, stages=2, programs=264),
          "gemv": dict(block_g=64, cols=128, warps=4, stages=1, programs=264, pregather=False, prefetch=True),
          "gemv_by_m": {"2": dict(block_g=16), "4": dict(block_g=16)},  # fewer registers a thread
          "dequant": dict(block_g=8, warps=2),
          "dequant_original": dict(block_c=1024, warps=8),
          "gemv_up_to_m": 4,
          "prefill_from_m": 17}
MAX_ORIGINAL_K = 65536  # widest layer dequantize_original takes: 64 KiB of shared memory


def matmul(x2: torch.Tensor, packed, alpha, mu, perm, bias, n_out: int, block_size: int, **over) -> torch.Tensor:
    """The fused kernel: x2 [M, K] contiguous rows -> [M, n_out]; `over` overrides
    TUNING["fused"]'s settings (block_g, warps, stages, programs) and may fix `splits`."""
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


def gather_columns(x2: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x2[:, perm] (x2 [M, K], unit column stride) as a new contiguous tensor, one small kernel;
    perm of any integer dtype."""
    M, K = x2.shape
    out = torch.empty(M, K, device=x2.device, dtype=x2.dtype)
    B = 1024
    _gather_kernel[(triton.cdiv(K, B), M)](x2, perm, out, K, x2.stride(0), BLOCK=B)
    return out


def gemv(x2: torch.Tensor, packed, alpha, mu, perm, bias, n_out: int, block_size: int, **over) -> torch.Tensor:
    """The decode kernel for a few rows (M <= TUNING["gemv_up_to_m"]; any M works, all rows
    in one program, BLOCK_M = M rounded up to a power of two): x2 [M, K] contiguous rows ->
    [M, n_out], no tl.dot. Settings: TUNING["gemv"], then TUNING["gemv_by_m"][str(BLOCK_M)]
    where given, then `over` (block_g, cols, warps, stages, programs, pregather, prefetch;
    `splits` fixes split-K)."""
    M, K = x2.shape
    G, NB = packed.shape[0], alpha.shape[1]
    bm = triton.next_power_of_2(max(1, M))
    cfg = {**TUNING["gemv"], **TUNING.get("gemv_by_m", {}).get(str(bm), {}), **over}
    bg = cfg["block_g"]
    cb = max(1, cfg.get("cols", block_size) // block_size)  # blocks a step, a power of two
    cb = triton.next_power_of_2(cb)
    steps = triton.cdiv(NB, cb)
    grid_g = triton.cdiv(G, bg)
    splits = cfg.get("splits") or max(1, min(steps, cfg["programs"] // max(1, grid_g)))
    per_split = triton.cdiv(steps, splits)
    splits = triton.cdiv(steps, per_split)
    gather = perm.numel() > 0
    if gather and cfg.get("pregather"):
        x2, gather = gather_columns(x2, perm), False
    out = torch.empty(M, n_out, device=x2.device, dtype=x2.dtype)
    part = out if splits == 1 else torch.empty(splits, M, n_out, device=x2.device, dtype=torch.float32)
    has_bias = bias is not None and splits == 1
    _gemv_kernel[(grid_g, splits)](
        x2, packed, alpha, mu, perm if gather else alpha, bias if has_bias else alpha, part,
        M, n_out, K, G, NB, x2.stride(0), n_out, M * n_out, per_split, FP32_ONE_BITS,
        BLOCK=block_size, CB=cb, BLOCK_G=bg, BLOCK_M=bm, GATHER=gather, HAS_BIAS=has_bias,
        PREFETCH=bool(cfg.get("prefetch", False)),
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    if splits > 1:
        MN, B = M * n_out, 1024
        _sum_splits_kernel[(triton.cdiv(MN, B),)](part, bias if bias is not None else alpha, out, MN, n_out,
                                                   splits, HAS_BIAS=bias is not None, BLOCK=B)
    return out


def dequantize(packed, alpha, mu, n_out: int, block_size: int, dtype=torch.float16, **over) -> torch.Tensor:
    """alpha * code + mu as [n_out, K] in `dtype`, columns in stored order; `over` overrides
    TUNING["dequant"]'s settings (block_g, warps)."""
    G, K = packed.shape
    NB = alpha.shape[1]
    cfg = {**TUNING["dequant"], **over}
    w = torch.empty(n_out, K, device=packed.device, dtype=dtype)
    _dequant_kernel[(triton.cdiv(G, cfg["block_g"]), NB)](
        packed, alpha, mu, w, n_out, K, G, NB, BLOCK=block_size, BLOCK_G=cfg["block_g"],
        BF16=dtype == torch.bfloat16, num_warps=cfg["warps"])
    return w


def dequantize_original(packed, alpha, mu, inv_perm, n_out: int, block_size: int, dtype=torch.float16,
                        **over) -> torch.Tensor:
    """alpha * code + mu as [n_out, K] in `dtype`, columns in the ORIGINAL order: column c is
    stored column inv_perm[c] (inv_perm [K] int32/int64, inv_perm[perm[k]] = k), so that
    x @ W^T = x[:, perm] @ W_stored^T; K <= MAX_ORIGINAL_K. `over` overrides
    TUNING["dequant_original"]'s settings (block_c: a power of two >= 2, warps)."""
    G, K = packed.shape
    NB = alpha.shape[1]
    cfg = {**TUNING["dequant_original"], **over}
    w = torch.empty(n_out, K, device=packed.device, dtype=dtype)
    _dequant_original_kernel[(G,)](
        packed, alpha, mu, inv_perm, w, n_out, K, NB, BLOCK=block_size, BLOCK_C=cfg["block_c"],
        KP=max(4, triton.next_power_of_2(K)), NBP=triton.next_power_of_2(NB), BF16=dtype == torch.bfloat16,
        num_warps=cfg["warps"])
    return w


def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    """inv_perm with inv_perm[perm[k]] = k (int64), what prefill and linear take."""
    return torch.argsort(perm)


def prefill(x2, packed, alpha, mu, perm, bias, n_out: int, block_size: int, inv_perm=None) -> torch.Tensor:
    """Dequantize to a scratch weight in the original column order, then one cuBLAS matmul on
    x2 as it is. inv_perm: the inverse of perm (see inverse_perm), computed here if None."""
    if perm.numel() and x2.shape[1] <= MAX_ORIGINAL_K:
        inv = inverse_perm(perm) if inv_perm is None else inv_perm
        w = dequantize_original(packed, alpha, mu, inv, n_out, block_size, x2.dtype)
    else:  # stored order, and the activations gathered to match (no perm: nothing to gather)
        w = dequantize(packed, alpha, mu, n_out, block_size, x2.dtype)
        if perm.numel():
            x2 = x2.index_select(1, perm.to(torch.long))
    return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))


def choose_path(m: int) -> str:
    """The path linear() takes for m rows of activations (see TUNING)."""
    if m <= TUNING.get("gemv_up_to_m", 0):
        return "gemv"
    return "fused" if m < TUNING["prefill_from_m"] else "prefill"


def linear(x: torch.Tensor, packed, alpha, mu, perm, bias, n_out: int, block_size: int,
           path: str | None = None, inv_perm: torch.Tensor | None = None) -> torch.Tensor:
    """y = x[..., perm] @ W_stored^T + bias for TernaryLinear's buffers (format 2).
    path: "gemv", "fused" or "prefill"; by default gemv up to TUNING["gemv_up_to_m"] rows,
    fused below TUNING["prefill_from_m"], prefill from there.
    inv_perm: perm's inverse (inverse_perm(perm)), for prefill; computed there when None."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if path is None:
        path = choose_path(x2.shape[0])
    bias = None if bias is None else bias.to(x.dtype)
    if path == "gemv":
        y = gemv(x2, packed, alpha, mu, perm, bias, n_out, block_size)
    elif path == "fused":
        y = matmul(x2, packed, alpha, mu, perm, bias, n_out, block_size)
    else:
        y = prefill(x2, packed, alpha, mu, perm, bias, n_out, block_size, inv_perm)
    return y.reshape(*lead, n_out)
