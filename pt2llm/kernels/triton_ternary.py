"""Triton kernels for TernaryLinear (format 2 packing, see pack.py), fp16 or bf16 activations.

y[m, n] = bias[n] + sum over blocks b of  alpha[n, b] * sum_{k in b} code[n, k] x[m, perm[k]]
                                        +    mu[n, b] * sum_{k in b} x[m, perm[k]]

`matmul` (the fused kernel, M <= 16): each program takes BLOCK_G packed rows (5 BLOCK_G
weight rows) and walks its share of the 128-column blocks (split-K when there are too few
row tiles to fill the GPU, `split_count`; the partial sums meet in a second, deterministic
kernel). A block's bytes are decoded in registers, the bytes of columns 2j and 2j+1 side by
side in the 16-bit halves of an int32, so that one multiply and two masks give each digit's
two weights as an fp16 pair, 1 + d/4 with d = code + 1, the operand a tensor-core dot takes
as is: sum_k code x = 4 dot - 5 sum_k x. The block's alpha and mu are applied once per row
and block. The activations are gathered through `perm` as they are loaded; from M = 2 on
layers of 2^25 weights or more, once before the kernel instead (every row tile would gather
them again: 28672x8192 at M = 16 took 156 us in one H100 run, 100-102 us so in two later ones;
docs/results/fused-kernel-2026-11-23). Where the time goes at M = 1 (decode, the alpha/mu
epilogue, occupancy) is measured there too. (Pairing columns j and j + 64 instead, which
needs no reshape/split/join, was tried and measured slower on an H100, 2026-11-22: fused
11008x4096 M=1 24.8 vs 20.8 us, 28672x8192 M=1 130.1 vs 104.8 us; dequantize no faster, all
within 5%.)

The decoding (fp16), per 16-bit half, with q the byte: state S = y + 0x1400 with y = q 3^i
mod 256 (S = q + 0x1400 for digit 0). Z = 3 S = 3y + 0x3C00 holds d_i in bits 8-9 above
the fp16 exponent of 1.0 (0x3C00), so Z & 0x3F00 is the fp16 number 1 + d_i/4, and
Z & 0x14FF = (3y mod 256) + 0x1400 is the next digit's state: an IMAD and two LOP3s for
two weights, each with a single immediate. bf16 (7 mantissa bits) shifts and masks instead.
Any two bytes can share an int32: the pairing only has to be undone when storing.

For large M (`prefill`) the weight is dequantized to a scratch tensor and one cuBLAS
matmul follows (docs/results/kernels.md). Two dequantize kernels:
- `dequantize`: columns in stored order; a program takes BLOCK_G packed rows and one block,
  so alpha and mu are one value per weight row.
- `dequantize_original` (what prefill uses up to 8192 columns; wider, the CUDA kernel
  cuda_ternary.dequantize_original where it runs): columns in the ORIGINAL order, w[:, c] =
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

import functools
import os
import threading

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dependent import dependent_launch

FP16_STATE = tl.constexpr(0x14001400)  # 0x3C00 / 3 in each half
FP16_KEEP = tl.constexpr(0x14FF14FF)   # next state: 3y mod 256, and 0x1400 of 0x3C00
FP16_WEIGHT = tl.constexpr(0x3F003F00)  # 1.0's exponent and d: the fp16 number 1 + d/4


@triton.jit
def _packed_tile(p_ptr, rg, k, K, G):
    """Packed bytes [len(rg), len(k)]: packed rows rg, stored columns k (0 outside)."""
    return tl.load(p_ptr + rg[:, None].to(tl.int64) * K + k[None, :], mask=(rg[:, None] < G) & (k[None, :] < K),
                   other=0)


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
                   HAS_BIAS: tl.constexpr, BF16: tl.constexpr, GATHER: tl.constexpr):
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
        if GATHER:
            cols = tl.load(perm_ptr + k, mask=k < K, other=0).to(tl.int64)
        else:  # x is gathered already (x[:, perm])
            cols = k.to(tl.int64)
        xt = tl.load(x_ptr + rm[None, :].to(tl.int64) * stride_xm + cols[:, None],
                     mask=(k[:, None] < K) & (rm[None, :] < M), other=0.0)  # [BLOCK, BLOCK_M]
        s = tl.sum(xt.to(tl.float32), axis=0)
        z = _state(_packed_tile(p_ptr, rg, k, K, G), BLOCK_G, BLOCK, BF16)
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
    """W[n, k] = alpha * code + mu, stored column order: BLOCK_G packed rows (5 BLOCK_G weight
    rows) and block blk's columns."""
    rg = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    blk = tl.program_id(1)
    k = blk * BLOCK + tl.arange(0, BLOCK)
    z = _state(_packed_tile(p_ptr, rg, k, K, G), BLOCK_G, BLOCK, BF16)
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
# program, warps, pipeline stages and the number of programs the GPU runs at once (split-K
# fills them, see split_count); from `gather_from_m` rows and `gather_from_weights` weights
# on, the activations are gathered (x[:, perm]) before the fused kernel instead of inside
# it, which then runs `gathered_stages` stages; the stored-order dequantize kernel's packed
# rows per program and warps; the original-order one's columns per step and warps. Keys
# these functions do not read (an older file's "variant", "blocks") are ignored; a file
# without a key leaves its default.
TUNING = {"fused": dict(block_g=64, warps=4, stages=2, programs=264, gather_from_m=2,
                        gather_from_weights=1 << 25, gathered_stages=3),
          "dequant": dict(block_g=8, warps=2),
          "dequant_original": dict(block_c=1024, warps=8),
          "prefill_from_m": 17, "mma_max_m": 8, "cuda_dequant_from_k": 8193}


def update_tuning(settings: dict) -> None:
    """Merge launch settings (a saved tuning.json, or a sweep's best) into TUNING, one level
    down: a kernel's settings that `settings` does not name keep their values."""
    for key, value in settings.items():
        nested = isinstance(value, dict) and isinstance(TUNING.get(key), dict)
        TUNING[key] = {**TUNING[key], **value} if nested else value
    forget_launches()


MAX_ORIGINAL_K = 65536  # widest layer dequantize_original takes: 64 KiB of shared memory


@functools.lru_cache(maxsize=4096)
def split_count(tiles: int, blocks: int, slots: int) -> int:
    """How many parts split-K cuts each tile's `blocks` column blocks into, when `tiles`
    output tiles run on a GPU that holds `slots` programs at once: the count that minimises
    waves x (blocks per program + 1), the fewest parts among equals. A second, nearly empty
    wave costs as much as a full one; the + 1 is a program's own cost (start, partial sums
    out), which keeps the parts from getting very short. (Before, the count was slots //
    tiles, rounded down: on 28672x8192, 90 tiles, that ran 180 programs on 264 places, each
    64/2 = 32 blocks long; 8 parts, 720 programs of 8 blocks in 3 waves, took 82 against
    104 us on an H100 in one run, docs/results/fused-kernel-2026-11-23.)"""
    best, best_cost = 1, None
    for s in range(1, max(1, blocks) + 1):
        per = triton.cdiv(blocks, s)
        if triton.cdiv(blocks, per) != s:  # the same programs as a smaller s
            continue
        cost = triton.cdiv(tiles * s, slots) * (per + 1)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def matmul(x2: torch.Tensor, packed, alpha, mu, perm, bias, n_out: int, block_size: int, **over) -> torch.Tensor:
    """The fused kernel: x2 [M, K] contiguous rows -> [M, n_out]; `over` overrides
    TUNING["fused"]'s settings and may fix `splits`."""
    M, K = x2.shape
    G, NB = packed.shape[0], alpha.shape[1]
    cfg = {**TUNING["fused"], **over}
    gather = not (M >= cfg["gather_from_m"] and n_out * K >= cfg["gather_from_weights"])
    if not gather:  # every row tile would gather the same activations again: once here instead
        x2 = x2.index_select(1, perm.to(torch.int32))
    bg, bm = cfg["block_g"], 16 if M <= 16 else 64
    grid_g, grid_m = triton.cdiv(G, bg), triton.cdiv(M, bm)
    splits = cfg.get("splits") or split_count(grid_g * grid_m, NB, cfg["programs"])
    per_split = triton.cdiv(NB, splits)
    splits = triton.cdiv(NB, per_split)
    out = torch.empty(M, n_out, device=x2.device, dtype=x2.dtype)
    part = out if splits == 1 else torch.empty(splits, M, n_out, device=x2.device, dtype=torch.float32)
    has_bias = bias is not None and splits == 1
    _matmul_kernel[(grid_g, grid_m, splits)](
        x2, packed, alpha, mu, perm, bias if has_bias else alpha, part,
        M, n_out, K, G, NB, x2.stride(0), n_out, M * n_out, per_split,
        BLOCK=block_size, BLOCK_G=bg, BLOCK_M=bm, HAS_BIAS=has_bias, BF16=x2.dtype == torch.bfloat16,
        GATHER=gather, num_warps=cfg["warps"],
        num_stages=cfg["stages"] if gather else cfg["gathered_stages"])
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
    """inv_perm with inv_perm[perm[k]] = k (int32), what prefill and linear take."""
    return torch.argsort(perm).to(torch.int32)


def prefill(x2, packed, alpha, mu, perm, bias, n_out: int, block_size: int, inv_perm=None) -> torch.Tensor:
    """Dequantize to a scratch weight in the original column order, then one cuBLAS matmul on
    x2 as it is. inv_perm: the inverse of perm (see inverse_perm), computed here if None."""
    if perm.numel() and x2.shape[1] <= MAX_ORIGINAL_K:
        inv = inverse_perm(perm) if inv_perm is None else inv_perm
        if use_cuda_dequant(packed, alpha, inv, block_size, x2.dtype):
            from . import cuda_ternary
            w = cuda_ternary.dequantize_original(packed, alpha, mu, inv, n_out)
        else:
            w = dequantize_original(packed, alpha, mu, inv, n_out, block_size, x2.dtype)
    else:  # stored order, and the activations gathered to match (no perm: nothing to gather)
        w = dequantize(packed, alpha, mu, n_out, block_size, x2.dtype)
        if perm.numel():
            x2 = x2.index_select(1, perm.to(torch.long))
    return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))


def use_cuda_dequant(packed, alpha, inv_perm, block_size: int, dtype) -> bool:
    """Whether prefill dequantizes with the CUDA kernel (cuda_ternary.dequantize_original),
    unless PT2LLM_CUDA_KERNEL=0: from TUNING["cuda_dequant_from_k"] columns on, where it
    measured faster than the Triton kernel, which holds a whole packed row in registers (H100,
    2026-11-23, M = 128: 4096x11008 90 against 100 us, 8192x28672 412 against 508; at K = 4096
    and 8192 it was 0-10 % slower; docs/results/mma-kernel)."""
    if packed.shape[1] < TUNING["cuda_dequant_from_k"] or os.environ.get("PT2LLM_CUDA_KERNEL", "1") == "0":
        return False
    from . import cuda_ternary
    return cuda_ternary.dequant_supported(packed, alpha, inv_perm, block_size, dtype)


def use_mma(x2: torch.Tensor, packed, perm, block_size: int, n_out: int | None = None) -> bool:
    """Whether the CUDA mma kernel (cuda_ternary) takes these rows by default: up to
    TUNING["mma_max_m"] rows, where it measured faster than the fused kernel, and up to 16 for
    a layer of n_out outputs whose launch sums its splits in a thread-block cluster
    (cuda_ternary.clustered: faster there too), when it compiles here and takes the shapes
    (cuda_ternary.supported), unless PT2LLM_CUDA_KERNEL=0."""
    m = x2.shape[0]
    if m > 16 or os.environ.get("PT2LLM_CUDA_KERNEL", "1") == "0":
        return False
    if m > TUNING["mma_max_m"] and n_out is None:
        return False
    from . import cuda_ternary
    if not cuda_ternary.supported(x2, packed, perm, block_size):
        return False
    return m <= TUNING["mma_max_m"] or cuda_ternary.clustered(x2, [(packed, n_out)])


def default_path(x2: torch.Tensor, packed, perm, block_size: int, n_out: int | None = None) -> str:
    """The path `linear` takes for rows x2 [M, K]: "mma" where use_mma says so, else "fused"
    below TUNING["prefill_from_m"] rows, else "prefill"."""
    if use_mma(x2, packed, perm, block_size, n_out):
        return "mma"
    return "fused" if x2.shape[0] < TUNING["prefill_from_m"] else "prefill"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as rows [M, K] with unit stride along K (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


_CHOSEN = threading.local()  # per thread: {key: a prepared cuda_ternary.Matmul, or None} (_mma_launch)
MAX_CHOSEN = 4096            # entries a thread keeps before starting afresh


def forget_launches() -> None:
    """Drop this thread's remembered launches (_mma_launch). update_tuning calls it; call it
    after changing TUNING or cuda_ternary.TUNING in place."""
    _CHOSEN.__dict__.pop("memo", None)


def _layer_key(packed, alpha, mu, perm, bias, n_out) -> tuple:
    return (packed.data_ptr(), packed.shape, packed.stride(), alpha.data_ptr(), alpha.shape, alpha.dtype,
            alpha.stride(), mu.data_ptr(), mu.dtype, mu.stride(), perm.data_ptr(), perm.dtype, perm.shape,
            perm.stride(), None if bias is None else (bias.data_ptr(), bias.dtype, bias.shape, bias.stride()),
            n_out)


def _mma_launch(x2: torch.Tensor, layers, block_size: int):
    """The CUDA kernel's launch (cuda_ternary.prepare) that linear (one layer) or linear_group
    (several) takes by default for rows x2 [M, K] on the current stream, or None where they
    take another path. Eager decoding calls each layer once a token with the same shapes, so
    the choice and the prepared launch are remembered, per thread, under everything they
    depend on: the rows' count, width, stride, dtype and device, the stream, the layers'
    tensors (addresses, shapes, strides, dtypes), the block size, the PT2LLM_CUDA_KERNEL /
    PT2LLM_CUDA_TUNED settings and whether launches are dependent (kernels/dependent.py). A
    launch is reused only for tensors at the same addresses and of the same layout, so it
    writes the same pointers it would write anew."""
    if x2.shape[0] > 16 or not x2.is_cuda:
        return None
    from . import cuda_ternary
    dev = x2.get_device()
    key = (x2.shape, x2.stride(0), x2.dtype, dev, cuda_ternary._stream(dev), block_size,
           os.environ.get("PT2LLM_CUDA_KERNEL"), os.environ.get("PT2LLM_CUDA_TUNED"), dependent_launch(),
           *[_layer_key(*layer) for layer in layers])
    memo = _CHOSEN.__dict__.setdefault("memo", {})
    try:
        return memo[key]
    except KeyError:
        pass
    launch = None
    if all(layer[4] is None or layer[4].dtype == x2.dtype for layer in layers) and _takes_mma(x2, layers, block_size):
        launch = cuda_ternary.prepare(x2, layers)
    if len(memo) >= MAX_CHOSEN:
        memo.clear()
    memo[key] = launch
    return launch


def _takes_mma(x2: torch.Tensor, layers, block_size: int) -> bool:
    """Whether linear (one layer) or linear_group (several) launches the CUDA kernel for
    these layers by default."""
    if len(layers) == 1:
        packed, _, _, perm, _, n_out = layers[0]
        return use_mma(x2, packed, perm, block_size, n_out)
    from . import cuda_ternary
    return (len(layers) <= cuda_ternary.MAX_GROUP
            and len({(layer[1].shape[1], layer[3].dtype) for layer in layers}) == 1
            and all(use_mma(x2, layer[0], layer[3], block_size, layer[5]) for layer in layers)
            and (x2.shape[0] <= TUNING["mma_max_m"] or cuda_ternary.clustered(x2, [(p[0], p[5]) for p in layers])))


def linear_group(x: torch.Tensor, layers, block_size: int) -> list[torch.Tensor]:
    """[linear(x, *layer, block_size) for layer in layers], layers = [(packed, alpha, mu, perm,
    bias, n_out), ...] that read the same x (q/k/v, gate/up): one launch of the CUDA kernel
    for all of them where it takes each (use_mma) and they share the block count and the
    column order's dtype (cuda_ternary.matmul_group); else one call each."""
    x2 = _rows(x)
    if len(layers) > 1:
        launch = _mma_launch(x2, layers, block_size)
        if launch is None and _takes_mma(x2, layers, block_size):  # a bias of another dtype
            from . import cuda_ternary
            launch = cuda_ternary.prepare(x2, [(p, a, m, pm, None if b is None else b.to(x.dtype), n)
                                               for p, a, m, pm, b, n in layers])
        if launch is not None:
            return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in launch(x2)]
    return [linear(x, *layer, block_size) for layer in layers]


def linear_glu(gate: torch.Tensor, up: torch.Tensor, packed, alpha, mu, perm, bias, n_out: int,
               block_size: int) -> torch.Tensor:
    """linear(silu(gate) * up, ...): a gated MLP's down projection on its gate and up outputs.
    Where the CUDA kernel takes the rows (as `linear` would for the product), it computes the
    product as it stages its activations, so no kernel writes it first (silu(g) u in float32,
    rounded to the activations' fp16 once, as Inductor's fused SiLU product does); else the
    product, then `linear`."""
    g2, u2 = _rows(gate), _rows(up)
    if g2.shape == u2.shape and g2.stride() == u2.stride() and g2.dtype == u2.dtype:
        launch = _mma_launch(g2, [(packed, alpha, mu, perm, bias, n_out)], block_size)
        if launch is not None:
            return launch(g2, u2)[0].reshape(*gate.shape[:-1], n_out)
    return linear(torch.nn.functional.silu(gate) * up, packed, alpha, mu, perm, bias, n_out, block_size)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (Llama, Qwen2): weight * (h / sqrt(mean(h^2) + eps)), the mean
    and the scaling in float32, rounded to h's dtype before the weight."""
    f = h.float()
    return weight * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def linear_norm(res: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, layers,
                block_size: int) -> list[torch.Tensor]:
    """The layers (as linear_group takes them) on rms_norm(h, weight, eps), h = res + delta (or
    res): a decoder layer's residual add and norm before its q/k/v or gate/up. Returns their
    outputs, then h where delta is given. For one row, where the CUDA kernel takes the layers
    and the rows (cuda_ternary.norm_supported), each CTA forms the norm as it stages its
    activations, and no kernel runs before it; else the norm, then linear_group."""
    h2 = _rows(res)
    d2 = None if delta is None else _rows(delta)
    if h2.shape[0] == 1 and res.is_cuda and res.dtype == torch.float16:
        from . import cuda_ternary
        launch = _mma_launch(h2, layers, block_size)
        if launch is not None and cuda_ternary.norm_supported(h2, d2, weight):
            outs = launch(h2, None, (d2, weight, float(eps)))
            lead = res.shape[:-1]
            return [y.reshape(*lead, y.shape[-1]) for y in outs]
    h = res if delta is None else res + delta
    x = rms_norm(h, weight, eps)
    return linear_group(x, layers, block_size) + ([] if delta is None else [h])


def linear(x: torch.Tensor, packed, alpha, mu, perm, bias, n_out: int, block_size: int,
           path: str | None = None, inv_perm=None) -> torch.Tensor:
    """y = x[..., perm] @ W_stored^T + bias for TernaryLinear's buffers (format 2).
    path: "mma" (the CUDA kernel, cuda_ternary), "fused" or "prefill"; by default_path (the
    CUDA kernel's launch remembered, _mma_launch).
    inv_perm: perm's inverse (inverse_perm(perm)), or a function that gives it, for prefill;
    computed there when None."""
    lead = x.shape[:-1]
    x2 = _rows(x)
    if path is None:
        launch = _mma_launch(x2, [(packed, alpha, mu, perm, bias, n_out)], block_size)
        if launch is not None:
            return launch(x2)[0].reshape(*lead, n_out)
        path = default_path(x2, packed, perm, block_size, n_out)
    bias = None if bias is None else bias.to(x.dtype)
    if path == "mma":
        from . import cuda_ternary
        y = cuda_ternary.matmul(x2, packed, alpha, mu, perm, bias, n_out)
    elif path == "fused":
        y = matmul(x2, packed, alpha, mu, perm, bias, n_out, block_size)
    else:
        y = prefill(x2, packed, alpha, mu, perm, bias, n_out, block_size, inv_perm() if callable(inv_perm) else inv_perm)
    return y.reshape(*lead, n_out)
