"""Prototype: lookup-table (T-MAC style) ternary GEMV for decode (M = 1 to 4), in Triton.

    python docs/results/lut-gemv/lut_gemv.py --check                   # CPU: Triton's interpreter, small shapes
    PYTHONPATH=$PWD python docs/results/lut-gemv/lut_gemv.py --bench --out DIR     # one CUDA GPU (H100)

Standalone: nothing under pt2llm/ uses it. The weight is what TernaryLinear holds,
W[n, k] = alpha[n, k // 128] * code[n, k] + mu[n, k // 128], codes in {-1, 0, 1}, and the
layer computes y[m, n] = sum_k W[n, k] x[m, perm[k]] (perm optional, as SSR gives).

Byte layout "row-5" (1.625 bits a weight)
-----------------------------------------
Five trits to a byte ALONG a row, aligned to the 128-column blocks: block b of a row is cut
into 25 groups of 5 consecutive columns (j = 0..24: columns 128 b + 5 j + i, i = 0..4) and
one of 3 (j = 25: columns 128 b + 125..127): 26 bytes a row and block, byte =
sum_i (code[col_i] + 1) 3^i (< 243; < 27 for the 3-column group). Group g = 26 b + j.
Two orders in memory, the same bytes (pack_row5):
  "rows"   packed[n, g], [N, 26 NB]: a row's bytes contiguous (lut_smem, lut_shfl);
  "groups" packed[g, n], [26 NB, N rounded up to 16] (padding rows hold 121, codes 0): a
           group's bytes of consecutive rows contiguous (lut_global, which reads 16 rows
           of a group per load, or 4 rows per int32 word with words=True).
K not a multiple of 128: the last block is padded with code 0 (x is masked there).

The arithmetic
--------------
    y[m, n] = sum_b alpha[n, b] S[m, n, b] + mu[n, b] X[m, b],   X[m, b] = sum of x over block b
    S[m, n, b] = sum over the block's 26 groups g of TABLE[m, g, packed[n, g]]
    TABLE[m, g, v] = sum_i (digit_i(v) - 1) x[m, perm[col_i(g)]]
A byte (5 weights) costs one lookup and one multiply-add (alpha * lookup, accumulated per
table column in fp32 and summed over the columns once, at the end of a program). A table
has 256 entries (243 used); TABLE[., 242] (all codes +1) is the group's sum of x and
TABLE[., 121] (all codes 0) is 0, which padding reads. Every program takes R rows and a
range of blocks; when the row tiles alone are fewer than `programs`, the blocks are split
(split-K) and a second kernel adds the fp32 partial sums. Tables are [256, 32] a block and
m: the 26 groups of a block padded to 32 table columns. For M > 1 the M tables sit side
by side as columns (MP = M rounded up to a power of two) and the bytes are broadcast to
them. The next block's bytes are loaded one block ahead. Output fp16, accumulation fp32.

Variants (how the lookup is done), with what offline sm_90 builds of the M = 1 loop
showed (triton 3.9 on a CPU machine: TTGIR layouts and cuobjdump SASS; instructions a
thread runs in the loop per 128-column block of its rows, divided by its weights, and
barriers in that loop; the current fused kernel, pt2llm.kernels.triton_ternary, measures
3.7 on the same count, with 8 barriers):
- lut_global: a first kernel (_build_tables_kernel, tensor cores) writes TABLE
  [M, 26 NB, 256] (fp16 or fp32: 3 or 6 MB per m at K = 28672, so it stays in L2); the
  main kernel gathers with tl.load (through L1). Tiles are [table columns, rows] with
  rows fastest, so that a warp's lookups of one group land in one 0.5 (fp16) or 1 KiB
  row of TABLE: few cache lines a load. Table loads carry no mask (padding reads entry
  121 of a real table). 2.5 instructions a weight (fp32 tables 2.3: no conversion),
  2 barriers. Per lookup: byte extraction (PRMT + LOP3), 64-bit address (LEA pair), LDG,
  HADD2.F32 (fp16 tables), FFMA. words=True reads 4 rows per int32 word (fewer carried
  registers, a lane per row in the table loads) but Triton then converts the pointer
  tile through shared memory: 2.9.
- lut_smem: one kernel, the block's tables built on chip by one tensor-core product
  T = C @ X ([256, 16] constant codes of every byte value times [16, C] x values) and
  looked up with tl.gather(T, bytes, axis=0) (out[n, c] = T[bytes[n, c], c]). Triton 3.9
  gives every gather a warp-local layout (pass OptimizeThreadLocality): a table column
  spread over one warp's 32 lanes, 8 entries a lane, and 8 shuffles + 8 selects a
  lookup (gather="warp": 11.9 instructions a weight). gather="smem" (default) compiles
  the kernel without that pass (see _compiling), so that the gather goes through shared
  memory: the table stored row-major (T[v, c] at v * C + c), a barrier, one ld.shared a
  lookup; with C a multiple of 32 words a lookup's bank is c mod 32 whatever the byte,
  and the bytes' load layout (2 columns a thread) leaves at most 2-way conflicts. But the
  table is stored from the tensor-core accumulator's layout, 8 rows x 4 column pairs a
  store: by that layout 8-way bank conflicts in fp32, 4-way in fp16 (not profiled),
  hence fp16 tables by default.
  build="dot": 3.7 instructions a weight, 12 barriers a block. build="split" builds
  T[32 h + l] = TH[h] + TL[l] (TL over columns 0-2, TH over 3-4) with one add an entry
  in a layout that stores without conflicts, but 512 rows and an index transform
  (b + 5 (b // 27)) a lookup: 6.5.
- lut_shfl: two-level tables of 32 entries (TL[l] + TH[h], v = 27 h + l), each looked
  up with one warp shuffle (Triton's warp-local gather is cheap when a table column is
  one entry a lane; gathering [R, C] from [32, C] directly still gave 8 rows a thread,
  hence the 32-row slices of _gather32). No shared-memory table, but Triton re-lays
  out the byte tile for each of the two gathers: 5.8 instructions a weight, 48 barriers.
So lut_global is the one expected to win at M = 1; per weight and m, it costs about the
same at M = 2 and 4, while the fused kernel's tensor-core dot costs the same for M up to
16, so at M = 4 the fused kernel should win. Not measured here (no GPU): see --bench.
Also considered and not built: fp16 tables packing two m per 32-bit word (halves the
lookups at M = 2 and 4); a CUDA C++ kernel (PRMT + LDS + FADD a byte, with conflict-free
table stores) would be the real test of the idea, beyond what Triton's generic gather
and layout choices allow.

Tunables are keyword arguments of lut_global, lut_smem and lut_shfl: rows (R), bb (blocks
an iteration, unrolled), warps, stages, programs (split-K target), splits (forced),
table_fp16, and per variant words / build, gather. --bench sweeps a few (SWEEP).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

if "--check" in sys.argv:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 128          # columns a block (alpha, mu)
GROUPS = 26          # bytes a row and block: 25 groups of 5 columns, one of 3
GROUP_PAD = 32       # table columns a block (26 used; the other 6 read 0)
TABLE = 256          # entries a table (243 used)
SUM_ENTRY = 242      # all digits 2 (codes +1): TABLE[g, 242] = sum of the group's x
# the same, for the kernels (a kernel reads only constexpr globals)
_BLOCK, _GROUPS, _GROUP_PAD = tl.constexpr(BLOCK), tl.constexpr(GROUPS), tl.constexpr(GROUP_PAD)
_TABLE, _SUM_ENTRY = tl.constexpr(TABLE), tl.constexpr(SUM_ENTRY)
_ZERO_ENTRY = tl.constexpr(121)  # all digits 1 (codes 0): every table's entry 121 is 0


# ----------------------------------------------------------------------------- packing
def pack_row5(codes: torch.Tensor, group_major: bool = False) -> torch.Tensor:
    """int codes [N, K] in {-1, 0, 1} -> uint8 [N, ceil(K/128) * 26] ("rows") or its
    transpose [ceil(K/128) * 26, ceil(N/16) * 16] ("groups", contiguous; the padding rows
    hold 121, codes 0, so that the rows of a group can be read 16 bytes at a time)."""
    n, k = codes.shape
    nb = -(-k // BLOCK)
    d = codes.to(torch.int64) + 1
    if nb * BLOCK > k:
        d = F.pad(d, (0, nb * BLOCK - k), value=1)  # code 0
    d = d.reshape(n, nb, BLOCK)
    p = 3 ** torch.arange(5, device=d.device, dtype=torch.int64)
    five = (d[:, :, :125].reshape(n, nb, 25, 5) * p).sum(-1)         # [n, nb, 25]
    three = (d[:, :, 125:] * p[:3]).sum(-1, keepdim=True)             # [n, nb, 1]
    b = torch.cat([five, three], dim=2).reshape(n, nb * GROUPS).to(torch.uint8)
    if not group_major:
        return b
    pad = -n % 16
    return F.pad(b.t(), (0, pad), value=121).contiguous()


def unpack_row5(packed: torch.Tensor, n: int, k: int, group_major: bool = False) -> torch.Tensor:
    """The inverse of pack_row5: int8 codes [n, k]."""
    b = (packed[:, :n].t() if group_major else packed).to(torch.int64)
    nb = b.shape[1] // GROUPS
    b = b.reshape(n, nb, GROUPS)
    p = 3 ** torch.arange(5, device=b.device, dtype=torch.int64)
    digits = b[..., None] // p % 3                                    # [n, nb, 26, 5]
    cols = torch.cat([digits[:, :, :25].reshape(n, nb, 125), digits[:, :, 25, :3]], dim=2)
    return (cols.reshape(n, nb * BLOCK)[:, :k] - 1).to(torch.int8)


def reference(x, packed, alpha, mu, perm, n: int, group_major: bool = False) -> torch.Tensor:
    """Pure torch, float32: dequantize and F.linear. x [M, K]; perm None or [K]."""
    k = x.shape[1]
    codes = unpack_row5(packed, n, k, group_major).float()
    rep = lambda t: t.float().repeat_interleave(BLOCK, dim=1)[:, :k]
    w = rep(alpha) * codes + rep(mu)
    xs = x.float() if perm is None else x.float()[:, perm.long()]
    return F.linear(xs, w)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _byte_codes(V: tl.constexpr, I: tl.constexpr):
    """[V, I] fp16: digit i of byte value v, minus 1 (the code of the group's column i);
    0 for i >= 5 and for v >= 243 (no byte takes those values)."""
    v = tl.arange(0, V)[:, None]
    i = tl.arange(0, I)[None, :]
    p = tl.where(i == 0, 1, tl.where(i == 1, 3, tl.where(i == 2, 9, tl.where(i == 3, 27, 81))))
    code = (v // p) % 3 - 1
    return tl.where((i < 5) & (v < 243), code, 0).to(tl.float16)


@triton.jit
def _x_groups(x_ptr, perm_ptr, blk, b_end, M, K, stride_xm, MP: tl.constexpr, HAS_PERM: tl.constexpr):
    """X [16, MP * 32] fp16: X[i, (m, j)] = x[m, perm[128 blk + 5 j + i]], the i-th column of
    group j of block blk; 0 where there is no such column (i >= 5, i >= 3 for j = 25,
    j > 25, blk >= b_end, columns from K, m >= M)."""
    c = tl.arange(0, MP * _GROUP_PAD)[None, :]
    i = tl.arange(0, 16)[:, None]
    m = c // _GROUP_PAD
    j = c % _GROUP_PAD
    col = blk * _BLOCK + 5 * j + i
    k_end = tl.where(blk < b_end, K, 0)  # not "& (blk < b_end)": the interpreter's & fails on scalars
    ok = (i < tl.where(j < 25, 5, tl.where(j == 25, 3, 0))) & (col < k_end) & (m < M)
    if HAS_PERM:
        col = tl.load(perm_ptr + col, mask=ok, other=0)
    return tl.load(x_ptr + m * stride_xm + col, mask=ok, other=0.0).to(tl.float16)


@triton.jit
def _x_column(x_ptr, perm_ptr, blk, b_end, M, K, stride_xm, I: tl.constexpr, MP: tl.constexpr,
              HAS_PERM: tl.constexpr):
    """[MP * 32] fp32: x of column I of each group (m, j) of block blk, as in _x_groups."""
    c = tl.arange(0, MP * _GROUP_PAD)
    m = c // _GROUP_PAD
    j = c % _GROUP_PAD
    col = blk * _BLOCK + 5 * j + I
    groups: tl.constexpr = 26 if I < 3 else 25  # group 25 has columns 0-2 only
    ok = (j < groups) & (col < tl.where(blk < b_end, K, 0)) & (m < M)
    if HAS_PERM:
        col = tl.load(perm_ptr + col, mask=ok, other=0)
    return tl.load(x_ptr + m * stride_xm + col, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _digit(v, I: tl.constexpr):
    """Base-3 digit I of v, minus 1, as fp32."""
    p: tl.constexpr = 3 ** I
    return ((v // p) % 3 - 1).to(tl.float32)


@triton.jit
def _tables_split(x_ptr, perm_ptr, blk, b_end, M, K, stride_xm, MP: tl.constexpr, HAS_PERM: tl.constexpr):
    """The tables of block blk's groups as [512, MP * 32] fp32, entry v' = 32 h + l for the
    byte v = 27 h + l (l < 27): T = TH[h] + TL[l] with TL over the group's columns 0-2 and TH
    over 3-4 (a broadcast add: 1 add an entry, in a plain layout whose stores to shared
    memory do not conflict; rows with l >= 27 or h >= 9 are never read). Also X[m, blk]."""
    x0 = _x_column(x_ptr, perm_ptr, blk, b_end, M, K, stride_xm, 0, MP, HAS_PERM)
    x1 = _x_column(x_ptr, perm_ptr, blk, b_end, M, K, stride_xm, 1, MP, HAS_PERM)
    x2 = _x_column(x_ptr, perm_ptr, blk, b_end, M, K, stride_xm, 2, MP, HAS_PERM)
    x3 = _x_column(x_ptr, perm_ptr, blk, b_end, M, K, stride_xm, 3, MP, HAS_PERM)
    x4 = _x_column(x_ptr, perm_ptr, blk, b_end, M, K, stride_xm, 4, MP, HAS_PERM)
    lo = tl.arange(0, 32)[:, None]
    tl_ = _digit(lo, 0) * x0[None, :] + _digit(lo, 1) * x1[None, :] + _digit(lo, 2) * x2[None, :]  # [32, C]
    hi = tl.arange(0, 16)[:, None]
    th = _digit(hi, 0) * x3[None, :] + _digit(hi, 1) * x4[None, :]  # [16, C]
    table = tl.reshape(th[:, None, :] + tl_[None, :, :], (512, MP * _GROUP_PAD))
    xs = tl.sum(tl.reshape(x0 + x1 + x2 + x3 + x4, (MP, _GROUP_PAD)), axis=1)  # [MP]
    return table, xs


@triton.jit
def _row_bytes(p_ptr, rn, blk, b_end, N, stride_pn, stride_pg, R: tl.constexpr, MP: tl.constexpr):
    """Packed bytes as int32 [R, MP * 32]: rows rn, the 26 groups of block blk (0 for the 6
    padding columns, rows from N, blk >= b_end), repeated MP times along the columns."""
    j = tl.arange(0, _GROUP_PAD)
    ok = (rn[:, None] < N) & (j < tl.where(blk < b_end, _GROUPS, 0))[None, :]
    g = (blk * _GROUPS + j).to(tl.int64)
    b = tl.load(p_ptr + rn[:, None].to(tl.int64) * stride_pn + g[None, :] * stride_pg,
                mask=ok, other=0, eviction_policy="evict_first").to(tl.int32)
    if MP > 1:
        b = tl.reshape(tl.broadcast_to(b[:, None, :], (R, MP, _GROUP_PAD)), (R, MP * _GROUP_PAD))
    return b


@triton.jit
def _block_scales(a_ptr, m_ptr, rn, blk, b_end, N, NB):
    """alpha, mu [R] fp32 of block blk (0 past N or from b_end)."""
    ok = rn < tl.where(blk < b_end, N, 0)
    off = rn.to(tl.int64) * NB + blk
    return (tl.load(a_ptr + off, mask=ok, other=0).to(tl.float32),
            tl.load(m_ptr + off, mask=ok, other=0).to(tl.float32))


@triton.jit
def _store_rows(out_ptr, acc, acc_mu, rn, pid_s, M, N, stride_om, stride_os, R: tl.constexpr, MP: tl.constexpr):
    """Sum a row tile's per-column partials [R, MP * _GROUP_PAD] and store y [R, MP] (split pid_s)."""
    y = tl.sum(tl.reshape(acc, (R, MP, _GROUP_PAD)), axis=2) + acc_mu  # [R, MP]
    rm = tl.arange(0, MP)
    ptr = out_ptr + pid_s.to(tl.int64) * stride_os + rm[None, :] * stride_om + rn[:, None]
    tl.store(ptr, y.to(out_ptr.dtype.element_ty), mask=(rn[:, None] < N) & (rm[None, :] < M))


@triton.jit
def _lut_smem_kernel(x_ptr, p_ptr, a_ptr, m_ptr, perm_ptr, out_ptr,
                     M, N, K, NB, stride_xm, stride_pn, stride_pg, stride_om, stride_os, blocks_per_split,
                     R: tl.constexpr, BB: tl.constexpr, MP: tl.constexpr, HAS_PERM: tl.constexpr,
                     TABLE_FP16: tl.constexpr, BUILD: tl.constexpr, GATHER: tl.constexpr):
    """Program (row tile, split): each block's tables built on chip, looked up by tl.gather.
    BUILD "split" (_tables_split) or "dot" (one tensor-core product); GATHER only names how
    the gather was compiled ("smem" or "warp", see _compiling)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * R + tl.arange(0, R)
    codes = _byte_codes(_TABLE, 16)  # [256, 16], for BUILD "dot"
    acc = tl.zeros((R, MP * _GROUP_PAD), dtype=tl.float32)  # alpha * lookups, summed over blocks
    acc_mu = tl.zeros((R, MP), dtype=tl.float32)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, NB)
    b_next = _row_bytes(p_ptr, rn, first, last, N, stride_pn, stride_pg, R, MP)
    for b0 in range(first, last, BB):
        for u in tl.static_range(BB):  # BB blocks an iteration, unrolled
            blk = b0 + u
            b = b_next  # this block's bytes, loaded one block ahead
            b_next = _row_bytes(p_ptr, rn, blk + 1, last, N, stride_pn, stride_pg, R, MP)
            if BUILD == "dot":
                xg = _x_groups(x_ptr, perm_ptr, blk, last, M, K, stride_xm, MP, HAS_PERM)  # [16, C]
                table = tl.dot(codes, xg)  # [256, C]: T[v, c] = sum_i (digit_i(v) - 1) X[i, c]
                xs = tl.sum(tl.reshape(tl.sum(xg.to(tl.float32), axis=0), (MP, _GROUP_PAD)), axis=1)
                idx = b
            else:
                table, xs = _tables_split(x_ptr, perm_ptr, blk, last, M, K, stride_xm, MP, HAS_PERM)
                idx = b + 5 * (b // 27)  # 32 h + l for b = 27 h + l
            if TABLE_FP16:
                table = table.to(tl.float16)
            s = tl.gather(table, idx, 0).to(tl.float32)  # [R, C]: T[idx[n, c], c], on chip
            alpha, mu = _block_scales(a_ptr, m_ptr, rn, blk, last, N, NB)
            acc += alpha[:, None] * s
            acc_mu += mu[:, None] * xs[None, :]
    _store_rows(out_ptr, acc, acc_mu, rn, pid_s, M, N, stride_om, stride_os, R, MP)


@triton.jit
def _gather32(table, idx3, R: tl.constexpr, MP: tl.constexpr):
    """table [32, C], idx3 [R / 32, 32, C] (rows in 32-row slices) -> table[idx, c], same shape.
    Gathered from a copy of the table per slice: Triton then spreads the gather axis over
    the 32 lanes, one element a lane, and its warp-local lowering emits one shuffle a lookup
    (gathering [R, C] from [32, C] directly gave 8 rows a thread: 8 shuffles and 8 selects)."""
    src = tl.broadcast_to(table[None, :, :], (R // 32, 32, MP * _GROUP_PAD))
    return tl.gather(src, idx3, 1)


@triton.jit
def _lut_shfl_kernel(x_ptr, p_ptr, a_ptr, m_ptr, perm_ptr, out_ptr,
                     M, N, K, NB, stride_xm, stride_pn, stride_pg, stride_om, stride_os, blocks_per_split,
                     R: tl.constexpr, BB: tl.constexpr, MP: tl.constexpr, HAS_PERM: tl.constexpr):
    """Program (row tile, split), two-level tables looked up with warp shuffles: the byte
    v = 27 h + l of a group is looked up as TL[l] + TH[h], TL over the group's columns 0-2
    (27 entries), TH over 3-4 (9 entries), each padded to 32 entries, so that a table column
    fits the 32 lanes of one warp and Triton's warp-local tl.gather lowering costs one shuffle
    a lookup (no table in shared memory; 256 entries would cost 8 shuffles and 8 selects).
    Triton still re-lays out the byte tile (lanes along groups as loaded, along rows for
    the gathers) through shared memory, for each of the two gathers."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * R + tl.arange(0, R)
    e = tl.arange(0, 32)[:, None]  # table entry: l (digits 0-2) or h (digits 3-4)
    i = tl.arange(0, 16)[None, :]  # the group's column
    p = tl.where(i == 0, 1, tl.where(i == 1, 3, tl.where(i == 3, 1, tl.where(i == 4, 3, 9))))
    d = ((e // p) % 3 - 1).to(tl.float16)  # digit of e for column i (3^(i mod 3))
    codes_lo = tl.where(i < 3, d, 0.0).to(tl.float16)  # [32, 16]: TL = codes_lo @ X
    codes_hi = tl.where((i == 3) | (i == 4), d, 0.0).to(tl.float16)  # [32, 16]: TH = codes_hi @ X
    acc = tl.zeros((R, MP * _GROUP_PAD), dtype=tl.float32)
    acc_mu = tl.zeros((R, MP), dtype=tl.float32)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, NB)
    b_next = _row_bytes(p_ptr, rn, first, last, N, stride_pn, stride_pg, R, MP)
    for b0 in range(first, last, BB):
        for u in tl.static_range(BB):
            blk = b0 + u
            b = b_next
            b_next = _row_bytes(p_ptr, rn, blk + 1, last, N, stride_pn, stride_pg, R, MP)
            xg = _x_groups(x_ptr, perm_ptr, blk, last, M, K, stride_xm, MP, HAS_PERM)  # [16, C]
            # (tensor cores: tables built from loaded x with plain multiply-adds were rebuilt by
            # Triton in the gather's layout, reloading x for every table entry)
            t_lo = tl.dot(codes_lo, xg)  # [32, C]: TL[l, c]
            t_hi = tl.dot(codes_hi, xg)  # [32, C]: TH[h, c], entries 9-31 unused
            b3 = tl.reshape(b, (R // 32, 32, MP * _GROUP_PAD))
            h = b3 // 27
            s = _gather32(t_lo, b3 - 27 * h, R, MP) + _gather32(t_hi, h, R, MP)
            s = tl.reshape(s, (R, MP * _GROUP_PAD))
            alpha, mu = _block_scales(a_ptr, m_ptr, rn, blk, last, N, NB)
            acc += alpha[:, None] * s
            xs = tl.sum(tl.reshape(tl.sum(xg.to(tl.float32), axis=0), (MP, _GROUP_PAD)), axis=1)  # X[m, blk]
            acc_mu += mu[:, None] * xs[None, :]
    _store_rows(out_ptr, acc, acc_mu, rn, pid_s, M, N, stride_om, stride_os, R, MP)


@triton.jit
def _build_tables_kernel(x_ptr, perm_ptr, t_ptr, M, K, NG, stride_xm,
                         GB: tl.constexpr, HAS_PERM: tl.constexpr):
    """TABLE[m, g, v] for GB groups g (of all NG = 26 NB) and one m, as [GB, 256]."""
    g = tl.program_id(0) * GB + tl.arange(0, GB)
    m = tl.program_id(1)
    blk = g // _GROUPS
    j = g % _GROUPS
    i = tl.arange(0, 16)[None, :]
    col = blk[:, None] * _BLOCK + 5 * j[:, None] + i
    ok = (i < tl.where(j < 25, 5, 3)[:, None]) & (g < NG)[:, None] & (col < K)
    if HAS_PERM:
        col = tl.load(perm_ptr + col, mask=ok, other=0)
    xg = tl.load(x_ptr + m * stride_xm + col, mask=ok, other=0.0).to(tl.float16)  # [GB, 16]
    table = tl.dot(xg, tl.trans(_byte_codes(_TABLE, 16)))  # [GB, 256]
    v = tl.arange(0, _TABLE)
    tl.store(t_ptr + (m * NG + g[:, None]).to(tl.int64) * _TABLE + v[None, :],
             table.to(t_ptr.dtype.element_ty), mask=(g < NG)[:, None])


@triton.jit
def _col_bytes(p_ptr, rn, blk, b_end, NP, stride_g, R: tl.constexpr, WORDS: tl.constexpr):
    """Group-major packed bytes of block blk's 32 table columns (26 groups) for the program's
    rows, with 121 (codes 0: every table's entry 121 is 0) for the 6 padding columns and
    blk >= b_end. WORDS: read as int32 [32, R / 4], 4 rows to a word (what is carried to the
    next step is then a quarter of the registers); else uint8 [32, R]."""
    j = tl.arange(0, _GROUP_PAD)
    g = (blk * _GROUPS + j).to(tl.int64)
    ok = (j < tl.where(blk < b_end, _GROUPS, 0))[:, None]
    if WORDS:
        rw = tl.program_id(0) * (R // 4) + tl.arange(0, R // 4)
        return tl.load(p_ptr.to(tl.pointer_type(tl.int32)) + g[:, None] * (stride_g // 4) + rw[None, :],
                       mask=ok & (rw[None, :] < NP // 4), other=0x79797979, eviction_policy="evict_first")
    else:
        return tl.load(p_ptr + g[:, None] * stride_g + rn[None, :], mask=ok & (rn[None, :] < NP),
                       other=_ZERO_ENTRY, eviction_policy="evict_first")


@triton.jit
def _bytes_of(w, R: tl.constexpr, MP: tl.constexpr, WORDS: tl.constexpr):
    """_col_bytes' result -> bytes int32 [MP * 32, R], repeated MP times along the columns
    (words: byte k of word i is row 4 i + k)."""
    if WORDS:
        b0 = w & 0xFF
        b1 = (w >> 8) & 0xFF
        b2 = (w >> 16) & 0xFF
        b3 = (w >> 24) & 0xFF
        b = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (_GROUP_PAD, R))  # [.., p, q]: byte 2p + q
    else:
        b = w.to(tl.int32)
    if MP > 1:
        b = tl.reshape(tl.broadcast_to(b[None, :, :], (MP, _GROUP_PAD, R)), (MP * _GROUP_PAD, R))
    return b


@triton.jit
def _lut_global_kernel(t_ptr, p_ptr, a_ptr, m_ptr, out_ptr,
                       M, N, NB, NG, NP, stride_g, stride_om, stride_os, blocks_per_split,
                       R: tl.constexpr, BB: tl.constexpr, MP: tl.constexpr, WORDS: tl.constexpr):
    """Program (row tile, split): lookups TABLE[m, g, byte] loaded from device memory. Tiles
    are [columns, rows], rows fastest, so that the lanes of a warp that load together look
    up the same group's table (one 0.5 or 1 KiB row of TABLE: few cache lines). The table
    loads carry no mask: padding columns, m >= M and blocks past the split read entry 121
    (0) of a table that exists."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * R + tl.arange(0, R)
    c = tl.arange(0, MP * _GROUP_PAD)  # columns (m, j)
    m = tl.minimum(c // _GROUP_PAD, M - 1)
    j = tl.minimum(c % _GROUP_PAD, _GROUPS - 1)
    valid = (c % _GROUP_PAD < _GROUPS) & (c // _GROUP_PAD < M)  # for X[m, blk]
    acc = tl.zeros((MP * _GROUP_PAD, R), dtype=tl.float32)
    acc_mu = tl.zeros((MP, R), dtype=tl.float32)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, NB)
    p_next = _col_bytes(p_ptr, rn, first, last, NP, stride_g, R, WORDS)
    for b0 in range(first, last, BB):
        for u in tl.static_range(BB):
            blk = b0 + u
            b = _bytes_of(p_next, R, MP, WORDS)  # [C, R]
            p_next = _col_bytes(p_ptr, rn, blk + 1, last, NP, stride_g, R, WORDS)  # one block ahead
            tab = t_ptr + (m * NG + tl.minimum(blk, NB - 1) * _GROUPS + j) * _TABLE  # [C]: column c's table
            s = tl.load(tab[:, None] + b).to(tl.float32)  # [C, R], via L1
            alpha, mu = _block_scales(a_ptr, m_ptr, rn, blk, last, N, NB)
            acc += alpha[None, :] * s
            in_split = c < tl.where(blk < last, MP * _GROUP_PAD, 0)
            xs = tl.load(tab + _SUM_ENTRY, mask=valid & in_split, other=0).to(tl.float32)
            xs = tl.sum(tl.reshape(xs, (MP, _GROUP_PAD)), axis=1)  # X[m, blk]
            acc_mu += xs[:, None] * mu[None, :]
    y = tl.sum(tl.reshape(acc, (MP, _GROUP_PAD, R)), axis=1) + acc_mu  # [MP, R]
    rm = tl.arange(0, MP)
    ptr = out_ptr + pid_s.to(tl.int64) * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(ptr, y.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, MN, SPLITS, BLOCK_S: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = offs < MN
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
MAX_M = 4


def _strides(packed, group_major):
    """(byte stride between rows, between groups)."""
    return (1, packed.stride(0)) if group_major else (packed.stride(0), 1)


def _split(n_tiles: int, nb: int, bb: int, programs: int, splits: int | None):
    """(blocks a split, splits): enough splits for ~`programs` programs, each a multiple of bb blocks."""
    steps = triton.cdiv(nb, bb)
    s = splits or max(1, min(steps, programs // max(1, n_tiles)))
    per = triton.cdiv(steps, s) * bb
    return per, triton.cdiv(nb, per)


def _launch_main(kernel, args_before, M, N, nb, dtype, device, rows, bb, programs, splits, **meta):
    """Allocate the output (and the split-K partials) and launch `kernel`, then the sum."""
    n_tiles = triton.cdiv(N, rows)
    per, s = _split(n_tiles, nb, bb, programs, splits)
    out = torch.empty(M, N, device=device, dtype=dtype)
    part = out if s == 1 else torch.empty(s, M, N, device=device, dtype=torch.float32)
    kernel[(n_tiles, s)](*args_before(part, N * M if s > 1 else 0, per), **meta)
    if s > 1:
        _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](part, out, M * N, s, BLOCK_S=1024)
    return out


@contextlib.contextmanager
def _compiling(gather: str):
    """How tl.gather gets compiled. Triton's OptimizeThreadLocality pass (3.x) gives every
    gather a warp-local layout: a table column spread over the 32 lanes of one warp, 8
    entries a lane for 256 entries, and the lowering then emits 8 shuffles and 8 selects
    a lookup (seen in sm_90 SASS from an offline compile). gather="smem" compiles the
    kernel without that pass, so that the gather goes through shared memory: one st.shared
    a table entry, a barrier, one ld.shared a lookup. (The pass also rewrites reductions
    inside loops that add to a constant-initialised accumulator; the kernels have none that
    it would take.) The pass list is patched only while a launch may compile; GATHER is a
    constexpr of the kernel, so the two builds never share a cache entry."""
    if gather == "warp" or os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    from triton._C.libtriton import passes
    orig = passes.ttgpuir.add_optimize_thread_locality
    passes.ttgpuir.add_optimize_thread_locality = lambda pm: None
    try:
        yield
    finally:
        passes.ttgpuir.add_optimize_thread_locality = orig


def lut_smem(x, packed, alpha, mu, perm=None, *, group_major=False, rows=256, bb=1, warps=8, stages=1,
             programs=264, splits=None, table_fp16=True, build="dot", gather="smem"):
    """y [M, N] (x's dtype) = x[:, perm] @ W^T, tables on chip. x [M, K] fp16, M <= 4.
    build: "split" or "dot" (see the kernel); gather: "smem" or "warp" (Triton's default
    lowering), see _compiling."""
    M, K = x.shape
    N, nb = alpha.shape
    assert 1 <= M <= MAX_M and x.stride(1) == 1 and packed.is_contiguous()
    spn, spg = _strides(packed, group_major)
    mp = triton.next_power_of_2(M)
    args = lambda out, stride_os, per: (
        x, packed, alpha, mu, perm if perm is not None else x, out, M, N, K, nb, x.stride(0), spn, spg,
        N, stride_os, per)
    assert gather in ("smem", "warp") and build in ("split", "dot")
    with _compiling(gather):
        return _launch_main(_lut_smem_kernel, args, M, N, nb, x.dtype, x.device, rows, bb, programs, splits,
                            R=rows, BB=bb, MP=mp, HAS_PERM=perm is not None, TABLE_FP16=table_fp16,
                            BUILD=build, GATHER=gather, num_warps=warps, num_stages=stages)


def lut_shfl(x, packed, alpha, mu, perm=None, *, group_major=False, rows=256, bb=1, warps=8, stages=1,
             programs=264, splits=None):
    """y [M, N] = x[:, perm] @ W^T, two-level tables looked up with warp shuffles."""
    M, K = x.shape
    N, nb = alpha.shape
    assert 1 <= M <= MAX_M and x.stride(1) == 1 and packed.is_contiguous()
    spn, spg = _strides(packed, group_major)
    mp = triton.next_power_of_2(M)
    args = lambda out, stride_os, per: (
        x, packed, alpha, mu, perm if perm is not None else x, out, M, N, K, nb, x.stride(0), spn, spg,
        N, stride_os, per)
    return _launch_main(_lut_shfl_kernel, args, M, N, nb, x.dtype, x.device, rows, bb, programs, splits,
                        R=rows, BB=bb, MP=mp, HAS_PERM=perm is not None, num_warps=warps, num_stages=stages)


def build_tables(x, perm, nb, table_fp16=False, gb=64, warps=4):
    """TABLE [M, nb * 26, 256] (fp16 or fp32) for lut_global."""
    M, K = x.shape
    ng = nb * GROUPS
    t = torch.empty(M, ng, TABLE, device=x.device, dtype=torch.float16 if table_fp16 else torch.float32)
    _build_tables_kernel[(triton.cdiv(ng, gb), M)](x, perm if perm is not None else x, t, M, K, ng, x.stride(0),
                                                    GB=gb, HAS_PERM=perm is not None, num_warps=warps)
    return t


def lut_global(x, packed, alpha, mu, perm=None, *, group_major=True, rows=256, bb=1, warps=8, stages=1,
               programs=264, splits=None, table_fp16=True, gb=64, words=False):
    """y [M, N] = x[:, perm] @ W^T, tables built into device memory by a first kernel.
    packed: group-major (pack_row5(..., group_major=True)); words: read it as int32 words."""
    M, K = x.shape
    N, nb = alpha.shape
    assert 1 <= M <= MAX_M and x.stride(1) == 1 and packed.is_contiguous()
    assert group_major and packed.shape[1] % 16 == 0 and rows % 4 == 0, "lut_global reads group-major bytes"
    t = build_tables(x, perm, nb, table_fp16, gb)
    mp = triton.next_power_of_2(M)
    args = lambda out, stride_os, per: (t, packed, alpha, mu, out, M, N, nb, nb * GROUPS, packed.shape[1],
                                        packed.stride(0), N, stride_os, per)
    return _launch_main(_lut_global_kernel, args, M, N, nb, x.dtype, x.device, rows, bb, programs, splits,
                        R=rows, BB=bb, MP=mp, WORDS=words, num_warps=warps, num_stages=stages)


VARIANTS = {"lut_smem": lut_smem, "lut_global": lut_global, "lut_shfl": lut_shfl}


# ----------------------------------------------------------------------------- check (CPU)
def rel_err(y, ref) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def random_layer(n, k, device="cpu", gen=None, group_major=False):
    nb = -(-k // BLOCK)
    codes = torch.randint(-1, 2, (n, k), device=device, generator=gen, dtype=torch.int8)
    alpha = (torch.rand(n, nb, device=device, generator=gen) * 0.02 + 0.005).half()
    mu = (torch.randn(n, nb, device=device, generator=gen) * 0.002).half()
    return codes, pack_row5(codes, group_major), alpha, mu


CHECK_SETTINGS = {  # small tiles, so that the interpreter runs several programs, steps and splits
    "lut_smem": [dict(rows=64, bb=1, programs=8), dict(rows=32, bb=2, table_fp16=True, splits=2),
                 dict(rows=64, bb=1, build="dot", gather="warp")],
    "lut_global": [dict(rows=64, bb=1, programs=8), dict(rows=32, bb=2, table_fp16=False, splits=2, gb=32),
                   dict(rows=64, bb=1, programs=8, words=True)],
    "lut_shfl": [dict(rows=64, bb=1, programs=8), dict(rows=32, bb=2, splits=2)],
}


def check(tol: float = 2e-3) -> bool:
    """Every variant and CHECK_SETTINGS entry against `reference`, N in {5, 64, 300, 70}, K in
    {128, 256, 640, 200}, M in {1, 3}, with and without a column order; lut_smem on both byte
    layouts, lut_global on the group-major one (the only one it reads)."""
    gen = torch.Generator().manual_seed(0)
    ok = True
    for n, k in [(5, 128), (64, 256), (300, 640), (70, 200)]:
        codes, rows_packed, alpha, mu = random_layer(n, k, gen=gen)
        groups_packed = pack_row5(codes, group_major=True)
        assert torch.equal(unpack_row5(rows_packed, n, k), codes), "pack/unpack round trip (rows)"
        assert torch.equal(unpack_row5(groups_packed, n, k, True), codes), "pack/unpack round trip (groups)"
        for use_perm in (False, True):
            perm = torch.randperm(k, generator=gen).to(torch.int32) if use_perm else None
            for m in (1, 3):
                x = torch.randn(m, k, generator=gen).half()
                ref = reference(x, rows_packed, alpha, mu, perm, n)
                runs = [("lut_smem", False, cfg) for cfg in CHECK_SETTINGS["lut_smem"]]
                runs += [("lut_smem", True, CHECK_SETTINGS["lut_smem"][0])]
                runs += [("lut_global", True, cfg) for cfg in CHECK_SETTINGS["lut_global"]]
                runs += [("lut_shfl", False, cfg) for cfg in CHECK_SETTINGS["lut_shfl"]]
                for name, group_major, cfg in runs:
                    packed = groups_packed if group_major else rows_packed
                    y = VARIANTS[name](x, packed, alpha, mu, perm, group_major=group_major, **cfg)
                    e = rel_err(y, ref)
                    good = y.shape == ref.shape and y.dtype == torch.float16 and e < tol
                    ok &= good
                    print(f"{'ok ' if good else 'BAD'} {name:10} N={n:<4} K={k:<4} M={m} "
                          f"{'groups' if group_major else 'rows  '} perm={use_perm!s:5} {cfg}: rel err {e:.2e}",
                          flush=True)
    return ok


# ----------------------------------------------------------------------------- benchmark (GPU)
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]  # out x in
BENCH_MS = (1, 2, 4)
# Settings timed at M = 1 (the first of each variant is its default, and what is left when the
# time budget runs out); at M = 2 and 4 the best TOP_M of each variant at M = 1 on the same
# shape, with the row tile divided by M (rounded up to a power of two): the accumulator
# holds rows x M x 32 fp32 (offline sm_90 builds spilled registers at 256 rows and M = 4).
# All of these compiled offline for sm_90 at M = 1, 2 and 4 (lut_smem at M = 4 spills a few
# registers).
SWEEP = {
    "lut_global": [dict(rows=256, warps=8, table_fp16=True),
                   dict(rows=256, warps=8, table_fp16=False),
                   dict(rows=512, warps=8, table_fp16=True),
                   dict(rows=256, warps=8, table_fp16=True, words=True),
                   dict(rows=256, warps=8, table_fp16=True, programs=528),
                   dict(rows=128, warps=4, table_fp16=True)],
    "lut_smem": [dict(rows=256, warps=8, build="dot", table_fp16=True),
                 dict(rows=256, warps=8, build="split", table_fp16=True),
                 dict(rows=128, warps=4, build="dot", table_fp16=True),
                 dict(rows=256, warps=8, build="dot", table_fp16=True, gather="warp")],
    "lut_shfl": [dict(rows=256, warps=8)],
}
LAYOUT = {"lut_global": True, "lut_smem": False, "lut_shfl": False}  # group_major
TOP_M = 2
BENCH_DEVICE = "cuda"


def _for_m(cfg: dict, m: int) -> dict:
    c = dict(cfg)
    c["rows"] = max(32, cfg.get("rows", 256) // triton.next_power_of_2(m))
    return c


def _dequantized(codes, alpha, mu) -> torch.Tensor:
    k = codes.shape[1]
    rep = lambda t: t.float().repeat_interleave(BLOCK, dim=1)[:, :k]
    return rep(alpha) * codes.float() + rep(mu)


def bench(args):
    import datetime
    import json
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))  # benchmarks/kernels.py
    import kernels as kb  # graph_us (CUDA-graph timing), make_layer (the fused kernel's format-2 layers)
    from pt2llm.kernels import triton_ternary as tt

    assert BENCH_DEVICE != "cuda" or torch.cuda.is_available(), "--bench needs a CUDA GPU"
    t0 = time.time()
    dev = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{dev}, {date}, triton {triton.__version__}, torch {torch.__version__}", flush=True)
    gen = torch.Generator(device=BENCH_DEVICE).manual_seed(0)

    # 1. each variant's default settings against the fp32 reference, one shape, M = 1..4
    n, k = 1000, 1408
    codes, _, alpha, mu = random_layer(n, k, BENCH_DEVICE, gen)
    packs = {False: pack_row5(codes), True: pack_row5(codes, group_major=True)}
    perm = torch.randperm(k, device=BENCH_DEVICE, generator=gen).to(torch.int16)
    w_ref = _dequantized(codes, alpha, mu)
    failed = False
    for m in range(1, MAX_M + 1):
        x = torch.randn(m, k, device=BENCH_DEVICE, generator=gen).half()
        ref = x.float()[:, perm.long()] @ w_ref.T
        for name, fn in VARIANTS.items():
            cfg = _for_m(SWEEP[name][0], m)
            gm = LAYOUT[name]
            try:
                y = fn(x, packs[gm], alpha, mu, perm, group_major=gm, **cfg)
                e, amax = rel_err(y, ref), float((y.float() - ref).abs().max())
            except Exception as ex:  # noqa: BLE001 (a prototype: report and go on)
                print(f"GPU check {name} M={m} {cfg}: FAILED to run: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
                failed = True
                continue
            good = e < 2e-3
            failed |= not good
            print(f"GPU check {name:10} {n}x{k} M={m} {cfg}: max abs err {amax:.3e} (|ref| max "
                  f"{float(ref.abs().max()):.3f}), rel err {e:.2e} {'ok' if good else 'BAD'}", flush=True)
    if failed:
        print("GPU check FAILED for a default setting: its timings below are skipped if they mismatch", flush=True)
    del codes, packs, w_ref

    # 2. timings
    rows_out, swept = [], True
    for n, k in SHAPES:
        L = kb.make_layer(n, k, gen)  # format 2, for the fused kernel; alpha, mu, perm shared with ours
        codes = torch.randint(-1, 2, (n, k), device=BENCH_DEVICE, generator=gen, dtype=torch.int8)
        packs = {False: pack_row5(codes), True: pack_row5(codes, group_major=True)}
        w_ref = _dequantized(codes, L["alpha"], L["mu"])
        del codes
        w16 = torch.randn(n, k, device=BENCH_DEVICE, dtype=torch.float16, generator=gen) * 0.02
        best_at_1 = {}
        for m in BENCH_MS:
            x = torch.randn(m, k, device=BENCH_DEVICE, dtype=torch.float16, generator=gen)
            ref = x.float()[:, L["perm"].long()] @ w_ref.T
            fp16_us = kb.graph_us(lambda w, x=x: F.linear(x, w), {"w": w16})
            fused_us = kb.graph_us(lambda x=x, **c: tt.linear(x, **c, path="fused"), L)
            print(f"{n:>6}x{k:<6} M={m}  fp16 {fp16_us:8.1f} us  fused {fused_us:8.1f} us  "
                  f"[{time.time() - t0:.0f} s]", flush=True)
            if swept and (args.quick or time.time() - t0 > args.budget):
                swept = False
                print(f"time budget ({args.budget} s) reached or --quick: one setting per variant from here "
                      "(its default, or its best at M = 1 on this shape)", flush=True)
            for name, fn in VARIANTS.items():
                if m == 1:
                    cfgs = SWEEP[name] if swept else SWEEP[name][:1]
                else:
                    cfgs = best_at_1.get(name, SWEEP[name][:1])[:TOP_M if swept else 1]
                gm = LAYOUT[name]
                timed = []
                for cfg in cfgs:
                    c = _for_m(cfg, m)
                    tensors = {"packed": packs[gm], "alpha": L["alpha"], "mu": L["mu"], "perm": L["perm"]}
                    call = lambda packed, alpha, mu, perm, x=x, c=c, fn=fn, gm=gm: fn(
                        x, packed, alpha, mu, perm, group_major=gm, **c)
                    try:
                        e = rel_err(call(**tensors), ref)
                        if not e < 2e-3:
                            print(f"   {name:10} {c}: WRONG (rel err {e:.2e}), not timed", flush=True)
                            continue
                        us = kb.graph_us(call, tensors)
                    except Exception as ex:  # noqa: BLE001 (compile / resource errors: skip the setting)
                        print(f"   {name:10} {c}: skipped, {type(ex).__name__}: {str(ex).splitlines()[0][:200]}",
                              flush=True)
                        torch.cuda.synchronize()
                        continue
                    timed.append((us, cfg))
                    row = {"shape": f"{n}x{k}", "M": m, "fp16_us": round(fp16_us, 2), "fused_us": round(fused_us, 2),
                           "variant": name, "settings": {**c, "group_major": gm}, "lut_us": round(us, 2),
                           "speedup_vs_fp16": round(fp16_us / us, 2), "speedup_vs_fused": round(fused_us / us, 2),
                           "rel_error": float(f"{e:.2e}"), "device": dev, "date": date}
                    rows_out.append(row)
                    print(f"   {name:10} {us:8.1f} us  x{fp16_us / us:5.2f} vs fp16  x{fused_us / us:5.2f} vs fused  "
                          f"err {e:.1e}  {c}  [{time.time() - t0:.0f} s]", flush=True)
                if m == 1 and timed:
                    best_at_1[name] = [cfg for _, cfg in sorted(timed, key=lambda t: t[0])]
        del L, packs, w_ref, w16, ref
        torch.cuda.empty_cache()
    table = markdown(rows_out)
    print("\n" + table, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lut_gemv.json").write_text(json.dumps(rows_out, indent=1) + "\n")
        (out / "lut_gemv.md").write_text(f"# LUT GEMV prototype vs fp16 and the fused kernel\n\n{dev}, {date}. "
                                         "`python docs/results/lut-gemv/lut_gemv.py --bench`; every timed setting is in "
                                         "lut_gemv.json. Best setting per variant:\n\n" + table + "\n")
        print(f"wrote {out / 'lut_gemv.json'} and {out / 'lut_gemv.md'} [{time.time() - t0:.0f} s]", flush=True)


def markdown(rows) -> str:
    """One line per shape, M and variant: its fastest setting."""
    best = {}
    for r in rows:
        key = (r["shape"], r["M"], r["variant"])
        if key not in best or r["lut_us"] < best[key]["lut_us"]:
            best[key] = r
    lines = ["| shape | M | fp16 µs | fused µs | variant | LUT µs | vs fp16 | vs fused | settings |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (shape, m, name), r in best.items():
        st = ", ".join(f"{a}={b}" for a, b in r["settings"].items())
        lines.append(f"| {shape} | {m} | {r['fp16_us']:.1f} | {r['fused_us']:.1f} | {name} | {r['lut_us']:.1f} | "
                     f"{r['speedup_vs_fp16']:.2f}x | {r['speedup_vs_fused']:.2f}x | {st} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="CPU check through Triton's interpreter")
    ap.add_argument("--bench", action="store_true", help="GPU check and benchmark")
    ap.add_argument("--out", type=str, help="folder for lut_gemv.json and lut_gemv.md (--bench)")
    ap.add_argument("--quick", action="store_true", help="--bench: each variant's default setting only")
    ap.add_argument("--budget", type=float, default=270, help="--bench: seconds after which only default "
                    "settings are timed (default 270)")
    args = ap.parse_args()
    if args.check and args.bench:
        ap.error("--check runs in Triton's interpreter: run --bench separately")
    if not (args.check or args.bench):
        ap.error("give --check or --bench")
    if args.check:
        ok = check()
        print("check:", "PASSED" if ok else "FAILED")
        if not ok:
            sys.exit(1)
    if args.bench:
        bench(args)


if __name__ == "__main__":
    main()
