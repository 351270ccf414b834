"""CUDA kernels for TernaryLinear, compiled at run time with NVRTC: the product at small M
(decode, `matmul`), and the dequantize that prefill uses on wide layers (`dequantize_original`,
see its comment in the source).

y[m, n] = bias[n] + sum over blocks b of  alpha[n, b] * sum_{k in b} code[n, k] x[m, perm[k]]
                                        +    mu[n, b] * sum_{k in b} x[m, perm[k]]

Why CUDA and not Triton here: the Triton kernel (triton_ternary.matmul) decodes a tile and
hands it to `tl.dot`, which picks its own register layout (wgmma, 250 registers a thread, two
programs an SM) and forces the alpha/mu epilogue into a separate dot per block; it ran at
15-23 % of the copy bandwidth on an H100 (docs/results/fused-kernel-2026-11-23). Here each
thread decodes straight into the operand registers of `mma.sync.m16n8k16` (fp16 in, fp32
accumulate), so nothing moves between decode and multiply (docs/results/mma-kernel).

Layout of the work (format 2 packing, pack.pack_trit_rows; 128-column blocks):
- a warp owns 16 packed rows (80 weight rows); lane (g, t) = (lane // 4, lane % 4) holds
  packed rows g and g + 8 and, in every block, the 32 stored columns 32 t .. 32 t + 31 of
  them (two 16-byte loads a row, the next block's loaded while this one is multiplied). A
  CTA is WARPS warps and one range of blocks (split-K; the CTA that finishes a row range
  last sums the splits in split order, so the result does not depend on timing; on sm_90,
  where the splits fit in one wave of clusters (of up to 16 CTAs), the splits of a row range
  are one thread-block cluster instead, and its CTAs sum each other's partial sums straight
  from shared memory, with no global buffer or counter: `cluster_splits`);
- the mma's reduction index k only has to mean the same column in A and B, so k-step s of a
  block maps the fragment's k = 2t, 2t+1 to columns 32 t + 4 s + {0, 1} and k = 2t+8, 2t+9
  to 32 t + 4 s + {2, 3}: the byte word the lane loaded is used as is;
- digit i of the 16 packed rows is the mma's 16 rows, one mma per digit and k-step, so the
  five weight rows a byte holds go to five accumulators; a sixth mma with A = 1 gives the
  block's sum of x, which mu needs;
- one launch may take up to three layers that read the same x (`matmul_group`: a decoder
  layer's q/k/v, its gate/up): each CTA column tile belongs to one layer, so short layers
  that could not fill the GPU alone share one launch and its split-K buffer;
- before its first block a CTA stages, in shared memory, the activations of all its blocks
  (gathered through perm; rows m < M; the B fragment's column n is row m) and its rows'
  (alpha, mu) pairs, so the loop over blocks has no barrier and no load but the codes'. Given
  a second input u (`Matmul(x2, up2)`: a gated MLP's down projection reading its gate's and
  up's outputs), it stages silu(x) u instead, and no kernel before it has to form the product;
  given an RMS norm's weight (`Matmul(x2, norm=(delta2, weight, eps))`, one row: a decoder
  layer's q/k/v or gate/up after its norm), it first sums the squares of h = x + delta over the
  whole row, then stages the norm of h, and the CTA at grid (0, 0) writes h out: no kernel
  before it forms the residual add or the norm;
- launched as a programmatic dependent launch (kernels/dependent.py: speed.Decoder's compiled
  decode step), a CTA reads only weights before `griddepcontrol.wait`: its first block's codes,
  its (alpha, mu) pairs and, in the build for these launches (DEP) where K < 65535, its blocks'
  column order (kept in the slots its activations will take); so that much overlaps the end of
  the kernel before it, and after the wait only x is gathered. Past the wait it lets the next
  launch start its CTAs.

Decoding: with d_i = code + 1 the digits of byte q, A_i = floor(3^(i+1) q / 256) = 3 A_(i-1)
+ d_i (pack.pack_trit_rows stores q = ceil(256 v / 243)). Multiplying the 16-bit half that
holds q by 3 leaves A_i in its high byte, and one byte permute turns two such bytes into a
pair of fp16 subnormals A 2^-24, exact: an integer multiply and a permute for two weights.
The mma sums D_i = 2^-24 sum_k A_i x, and sum_k d_i x = 2^24 (D_i - 3 D_(i-1)) (A restarts
before digit 3, so the difference cancels little: error as the Triton kernel's).

Requirements (else the Triton kernel runs): a CUDA GPU of compute capability 8.0 or more,
fp16 activations, M <= 16, block size 128, K a multiple of 32, the packed codes contiguous
and 16-byte aligned, perm int16 or int32 with K entries, and NVRTC (torch.cuda's
`_compile_kernel`, which loads the NVRTC that CUDA builds of torch ship). It compiles once
per process and variant (about 2 s). Split-K uses per-stream arrival counters: two launches
of it must not run at the same time on one stream (they cannot: a stream runs in order).
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import struct
from pathlib import Path

import torch

from . import lasting
from .dependent import dependent_launch
from .triton_ternary import split_count

_SRC = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#ifndef WARPS
#define WARPS 4              // warps a CTA, each 16 packed rows (80 weight rows)
#endif
#ifndef MINB
#define MINB 3               // CTAs an SM should hold (caps registers at 65536 / (32 WARPS MINB))
#endif
#ifndef MINB2
#define MINB2 2              // the same for M > 8 (the NT = 2 variant)
#endif
#ifndef CL
#define CL 1                 // > 1: the CL splits of a column tile are one thread-block cluster
#endif                       // (sm_90; launched with cluster dims (1, CL, 1): _launch)
#ifndef DEP
#define DEP 0                // 1: built for dependent launches (kernels/dependent.py): the column
#endif                       // order staged before the wait too (stage_cols)
#define RS 84                // words a block's row of staged activations takes (4 chunks of 16, padded)
#define ROWS (WARPS * 80)    // weight rows a CTA

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

// silu(g) u, rounded to fp16 once (as Inductor's fused kernel computes it): the input of a
// gated MLP's down projection, staged straight from the gate and up outputs when xu is given.
__device__ __forceinline__ u16 glu(u16 g, u16 u) {
  const float gv = h2f(g);  // e^80 < 2^126, where __fdividef stays exact to a few ulp
  return f2h(__fdividef(gv, 1.f + __expf(fminf(-gv, 80.f))) * h2f(u));
}

__device__ __forceinline__ void ld_codes(const u8* p, u32* w) {  // 16 bytes, read once: no L1
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Thread-block clusters (sm_90): a barrier across the cluster's CTAs (their shared-memory
// writes before it visible to all after it), the CTA's rank, and a load from the shared
// memory of the CTA of another rank at the address p has in this CTA's.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The barrier before a CTA exits, so that none leaves while another may still read its shared
// memory. Its arrival is relaxed: the remote loads before it have completed (their values are
// already summed and stored), and nothing this CTA wrote is read by another, so a release
// (which waits for this CTA's global stores of its outputs) buys nothing; relaxed measured 1-6 %
// faster at M = 1-4 on the launches that sum in a cluster (docs/results/mma-kernel, run 22).
__device__ __forceinline__ void cluster_exit_sync() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}
// Programmatic dependent launch (sm_90): `pdl_trigger` lets the next launch on the stream, if
// it was launched as a dependent, start its CTAs (where an SM has room) before this grid ends;
// `pdl_wait` waits until the grid before this one has completed and its writes are visible.
// Without the launch attribute both do nothing.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ u32 cluster_rank() { u32 r; asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r)); return r; }
__device__ __forceinline__ float ld_cluster(const float* p, u32 rank) {
  u32 a = (u32)__cvta_generic_to_shared(p), r;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
  return v;
}

// A CTA's activations for its blocks [b0, b0 + nblk) in shared memory, rows m < XR, zeros past
// K and M: x[m, perm[k]] (MODE 0); silu(x) xu (1: a gated MLP's down projection); or the RMS
// norm, nw (h rn) with h = x + xu (2) or x (3) and rn the row's 1 / rms (M = 1), rounded to
// fp16 where transformers' RMSNorm rounds. One instance each, so that each loop unrolls into
// batched loads.
// Where a staged activation goes: row r, block blk (of the CTA's), column c of the block.
__device__ __forceinline__ int xslot(int r, int blk, int c, int per_split) {
  return (r * per_split + blk) * 2 * RS + (c >> 5) * 40 + (c & 31);
}
// The original column of stored column k (k < K).
__device__ __forceinline__ int column(const void* __restrict__ perm, int perm32, int k) {
  return perm32 ? ((const int*)perm)[k] : (int)((const short*)perm)[k];
}

// With `cols` (K < 65535), `stage_cols` has first left each column's index in its row-0 slot
// (0xFFFF past K), which the same thread reads back here: the column order is a weight, so a
// dependent launch reads it before its wait, and only x's loads come after.
template <int XR, int MODE>
__device__ __forceinline__ void stage(u16* xh, const u16* __restrict__ x, const u16* __restrict__ xu,
                                      const u16* __restrict__ nw, float rn,
                                      const void* __restrict__ perm, int perm32, int K, int M, int stride_xm,
                                      int b0, int nblk, int per_split, bool cols) {
  #pragma unroll 4
  for (int idx = threadIdx.x; idx < nblk * 128; idx += 32 * WARPS) {
    const int k = b0 * 128 + idx, c = idx & 127, blk = idx >> 7;
    int col;
    if (cols) {
      const u16 sc = xh[xslot(0, blk, c, per_split)];
      col = sc == 0xFFFF ? -1 : (int)sc;
    } else {
      col = k < K ? column(perm, perm32, k) : -1;
    }
    #pragma unroll
    for (int r = 0; r < XR; ++r) {
      const long long at = (long long)r * stride_xm + col;
      u16 v = 0;
      if (col >= 0 && r < M) {
        if (MODE == 0) v = x[at];
        else if (MODE == 1) v = glu(x[at], xu[at]);
        else {
          const u16 h = MODE == 2 ? f2h(h2f(x[at]) + h2f(xu[at])) : x[at];
          v = f2h(h2f(nw[col]) * h2f(f2h(h2f(h) * rn)));
        }
      }
      xh[xslot(r, blk, c, per_split)] = v;
    }
  }
}

__device__ __forceinline__ void stage_cols(u16* xh, const void* __restrict__ perm, int perm32, int K, int b0,
                                           int nblk, int per_split) {
  #pragma unroll 4
  for (int idx = threadIdx.x; idx < nblk * 128; idx += 32 * WARPS) {
    const int k = b0 * 128 + idx, c = idx & 127, blk = idx >> 7;
    xh[xslot(0, blk, c, per_split)] = (u16)(k < K ? column(perm, perm32, k) : 0xFFFF);
  }
}

// 1 / rms of h = x + xu (or x) over its K entries (row 0: M = 1), as every thread of the CTA
// gets it; the CTA at grid (0, 0) also stores h to hout when given (the residual stream the
// model goes on with). x, xu and hout 16-byte aligned, K a multiple of 8.
__device__ __forceinline__ float inv_rms(const u16* __restrict__ x, const u16* __restrict__ xu, u16* __restrict__ hout,
                                         int K, float eps) {
  __shared__ float part[WARPS];
  const bool writer = hout != nullptr && blockIdx.x == 0 && blockIdx.y == 0;
  float ss = 0.f;
  for (int k = threadIdx.x * 8; k < K; k += 32 * WARPS * 8) {
    uint4 a = *(const uint4*)(x + k);
    if (xu) {
      const uint4 b = *(const uint4*)(xu + k);
      u32* pa = (u32*)&a;
      const u32* pb = (const u32*)&b;
      #pragma unroll
      for (int q = 0; q < 4; ++q) {
        const u16 lo = f2h(h2f((u16)pa[q]) + h2f((u16)pb[q]));
        const u16 hi = f2h(h2f((u16)(pa[q] >> 16)) + h2f((u16)(pb[q] >> 16)));
        pa[q] = (u32)lo | ((u32)hi << 16);
      }
    }
    const u32* pa = (const u32*)&a;
    #pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float lo = h2f((u16)pa[q]), hi = h2f((u16)(pa[q] >> 16));
      ss += lo * lo + hi * hi;
    }
    if (writer) *(uint4*)(hout + k) = a;
  }
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float tot = 0.f;
  #pragma unroll
  for (int w = 0; w < WARPS; ++w) tot += part[w];
  return rsqrtf(tot / (float)K + eps);
}

// Digit decoding. A packed byte q (format 2) holds d_0..d_4 (d = code + 1) so that
// A_i = floor(3^(i+1) q / 256) = 3 A_(i-1) + d_i: multiplying the 16-bit half holding q by 3
// leaves A_i in its high byte (3^5 q < 2^16: no carry into the next half), and one byte
// permute makes (A_i, A_i') of two bytes an fp16 pair of subnormals A 2^-24, exact. The mma
// sums them: D_i = 2^-24 sum_k A_i x, and sum_k d_i x = 2^24 (D_i - 3 D_(i-1)). A restarts
// (the high byte cleared) before digit 3, so A <= 26 and the difference cancels little.
//
// Shared memory (dynamic): the CTA's activations for all its blocks, xs[row][block][RS words]
// (XR rows: 1 when M = 1, else 8 NT), then its rows' (alpha, mu) pairs, am[block][ROWS].
template <int NT, bool M1>
__global__ void __launch_bounds__(32 * WARPS, NT == 1 ? MINB : MINB2) ternary_mma(
    const u16* __restrict__ x,
    const u8* __restrict__ packed0, const u8* __restrict__ packed1, const u8* __restrict__ packed2,
    const u16* __restrict__ alpha0, const u16* __restrict__ alpha1, const u16* __restrict__ alpha2,
    const u16* __restrict__ mu0, const u16* __restrict__ mu1, const u16* __restrict__ mu2,
    const void* __restrict__ perm0, const void* __restrict__ perm1, const void* __restrict__ perm2,
    const u16* __restrict__ bias0, const u16* __restrict__ bias1, const u16* __restrict__ bias2,
    u16* __restrict__ out0, u16* __restrict__ out1, u16* __restrict__ out2,
    float* __restrict__ part, int* __restrict__ counters,
    int M, int N0, int N1, int N2, int K, int NB, int stride_xm, int per_split, int splits, int perm32,
    int bias_mask, int tiles0, int tiles01, const u16* __restrict__ xu, const u16* __restrict__ nw, float eps,
    u16* __restrict__ hout) {
  constexpr int XR = M1 ? 1 : NT * 8;
  constexpr int THREADS = 32 * WARPS;
  extern __shared__ __align__(16) u32 smem[];
  __shared__ int last;
  // A group of up to three layers that read the same x (q/k/v, gate/up): CTA column tiles
  // [0, tiles0) are layer 0's, [tiles0, tiles01) layer 1's, the rest layer 2's. The split
  // partial sums of all of them share `part` ([splits][M][N0 + N1 + N2], layer l's columns
  // from noff on); counters are per CTA column (blockIdx.x).
  const int layer = blockIdx.x < tiles0 ? 0 : (blockIdx.x < tiles01 ? 1 : 2);
  const int tile = blockIdx.x - (layer == 0 ? 0 : (layer == 1 ? tiles0 : tiles01));
  const u8* __restrict__ packed = layer == 0 ? packed0 : (layer == 1 ? packed1 : packed2);
  const u16* __restrict__ alpha = layer == 0 ? alpha0 : (layer == 1 ? alpha1 : alpha2);
  const u16* __restrict__ mu = layer == 0 ? mu0 : (layer == 1 ? mu1 : mu2);
  const void* __restrict__ perm = layer == 0 ? perm0 : (layer == 1 ? perm1 : perm2);
  const u16* __restrict__ bias = layer == 0 ? bias0 : (layer == 1 ? bias1 : bias2);
  u16* __restrict__ out = layer == 0 ? out0 : (layer == 1 ? out1 : out2);
  const int N = layer == 0 ? N0 : (layer == 1 ? N1 : N2), G = (N + 4) / 5;
  const int noff = layer == 0 ? 0 : (layer == 1 ? N0 : N0 + N1), NALL = N0 + N1 + N2;
  const bool has_bias = (bias_mask >> layer) & 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int pA = (tile * WARPS + warp) * 16 + g, pB = pA + 8;
  const int b0 = blockIdx.y * per_split, b1 = min(b0 + per_split, NB), nblk = b1 - b0;
  const int n0 = tile * ROWS;
  u32* xs = smem;
  u32* am = smem + XR * per_split * RS;

  const u8* rowA = packed + (long long)min(pA, G - 1) * K + 32 * t;
  const u8* rowB = packed + (long long)min(pB, G - 1) * K + 32 * t;
  const bool okA = pA < G, okB = pB < G;
  u32 nxt[16];
  auto fetch = [&](int blk) {  // this lane's 32 bytes of rows pA (nxt[0..7]) and pB (nxt[8..15])
    const int col = blk * 128;
    const bool in = col + 32 * t < K;
    if (in && okA) { ld_codes(rowA + col, nxt); ld_codes(rowA + col + 16, nxt + 4); }
    else {
      #pragma unroll
      for (int q = 0; q < 8; ++q) nxt[q] = 0;
    }
    if (in && okB) { ld_codes(rowB + col, nxt + 8); ld_codes(rowB + col + 16, nxt + 12); }
    else {
      #pragma unroll
      for (int q = 8; q < 16; ++q) nxt[q] = 0;
    }
  };
  fetch(b0);

  // the (alpha, mu) of the CTA's rows at its blocks (rows past N: row N - 1, never stored) ...
  #pragma unroll 4
  for (int idx = threadIdx.x; idx < nblk * ROWS; idx += THREADS) {
    const int row = idx / nblk, blk = idx - row * nblk;
    const long long at = (long long)min(n0 + row, N - 1) * NB + b0 + blk;
    am[blk * ROWS + row] = (u32)alpha[at] | ((u32)mu[at] << 16);
  }
  // ... and the column order of its blocks (for `stage`) ...
  u16* xh = (u16*)xs;
  const bool cols = DEP && K < 0xFFFF;  // (1.3 % slower end to end in plain launches: not there)
  if (cols) stage_cols(xh, perm, perm32, K, b0, nblk, per_split);
  // ... (only weights so far: launched as a dependent, this much runs while the kernel before
  // it ends; the next launch may start its own once this one has waited) ...
  pdl_wait();
  pdl_trigger();
  // ... then the activations of every block: x[m, perm[k]], silu(x) xu where xu is given, or
  // the RMS norm of x (+ xu) where nw is (M = 1)
  if (nw) {
    const float rn = inv_rms(x, xu, hout, K, eps);
    if (xu) stage<XR, 2>(xh, x, xu, nw, rn, perm, perm32, K, M, stride_xm, b0, nblk, per_split, cols);
    else stage<XR, 3>(xh, x, xu, nw, rn, perm, perm32, K, M, stride_xm, b0, nblk, per_split, cols);
  } else if (xu) {
    stage<XR, 1>(xh, x, xu, nw, 0.f, perm, perm32, K, M, stride_xm, b0, nblk, per_split, cols);
  } else {
    stage<XR, 0>(xh, x, xu, nw, 0.f, perm, perm32, K, M, stride_xm, b0, nblk, per_split, cols);
  }
  __syncthreads();

  float acc[5][NT][4];
  #pragma unroll
  for (int i = 0; i < 5; ++i)
    #pragma unroll
    for (int j = 0; j < NT; ++j)
      #pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  const int rA = (warp * 16 + g) * 5, rB = rA + 40;  // the lane's weight rows in the CTA, digit 0

  for (int it = 0; it < nblk; ++it) {
    u32 cur[16];
    #pragma unroll
    for (int q = 0; q < 16; ++q) cur[q] = nxt[q];
    if (it + 1 < nblk) fetch(b0 + it + 1);

    float d[5][NT][4], sx[NT][4];
    #pragma unroll
    for (int j = 0; j < NT; ++j)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        sx[j][e] = 0.f;
        #pragma unroll
        for (int i = 0; i < 5; ++i) d[i][j][e] = 0.f;
      }
    #pragma unroll
    for (int s = 0; s < 8; ++s) {  // k-step s: columns 32 t + 4 s .. 32 t + 4 s + 3
      u32 bx[NT][2];
      #pragma unroll
      for (int j = 0; j < NT; ++j) {
        // B fragment column n = g is activation row m = 8 j + g; rows past M read row 0
        // (their outputs are never stored)
        const int m = M1 ? 0 : ((8 * j + g < M) ? 8 * j + g : 0);
        const u32* xb = xs + (m * per_split + it) * RS + t * 20 + 2 * s;
        bx[j][0] = xb[0];
        bx[j][1] = xb[1];
      }
      // bytes of columns +0, +1 (A-fragment k = 2t, 2t+1) and +2, +3 (k = 2t+8, 2t+9)
      u32 zA0 = __byte_perm(cur[s], 0, 0x4140), zA1 = __byte_perm(cur[s], 0, 0x4342);
      u32 zB0 = __byte_perm(cur[8 + s], 0, 0x4140), zB1 = __byte_perm(cur[8 + s], 0, 0x4342);
      #pragma unroll
      for (int i = 0; i < 5; ++i) {
        if (i == 3) {
          zA0 &= 0x00FF00FFu; zA1 &= 0x00FF00FFu; zB0 &= 0x00FF00FFu; zB1 &= 0x00FF00FFu;
        }
        zA0 *= 3u; zA1 *= 3u; zB0 *= 3u; zB1 *= 3u;
        const u32 a0 = __byte_perm(zA0, 0, 0x4341), a1 = __byte_perm(zB0, 0, 0x4341);
        const u32 a2 = __byte_perm(zA1, 0, 0x4341), a3 = __byte_perm(zB1, 0, 0x4341);
        #pragma unroll
        for (int j = 0; j < NT; ++j) mma(d[i][j], a0, a1, a2, a3, bx[j][0], bx[j][1]);
      }
      #pragma unroll
      for (int j = 0; j < NT; ++j) mma(sx[j], 0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u, bx[j][0], bx[j][1]);
    }
    // sum_k code x = sum_k d x - S:  acc += alpha 2^24 (D_i - 3 D_(i-1)) + (mu - alpha) S
    // (no D_2 term at digit 3: A restarted). With M = 1 only accumulators 0 and 2 of lanes
    // t = 0 are ever stored: the others are skipped.
    const u32* amb = am + it * ROWS;
    #pragma unroll
    for (int i = 4; i >= 0; --i) {
      const u32 pa = amb[rA + i], pb = amb[rB + i];
      const float aA = h2f((u16)pa), aB = h2f((u16)pb);
      const float sA = 16777216.f * aA, cA = h2f((u16)(pa >> 16)) - aA;
      const float sB = 16777216.f * aB, cB = h2f((u16)(pb >> 16)) - aB;
      #pragma unroll
      for (int j = 0; j < NT; ++j)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (M1 && (e & 1)) continue;
          const float di = (i == 0 || i == 3) ? d[i][j][e] : d[i][j][e] - 3.f * d[i - 1][j][e];
          acc[i][j][e] += (e < 2 ? sA : sB) * di + (e < 2 ? cA : cB) * sx[j][e];
        }
    }
  }

  // accumulator e of (digit i, n-tile j): weight row 5 (e < 2 ? pA : pB) + i, activation row
  // 8 j + 2 t + (e & 1)
  if (splits == 1) {
    #pragma unroll
    for (int i = 0; i < 5; ++i)
      #pragma unroll
      for (int j = 0; j < NT; ++j)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = 5 * (e < 2 ? pA : pB) + i, m = 8 * j + 2 * t + (e & 1);
          if (n < N && m < M) {
            float v = acc[i][j][e];
            if (has_bias) v += h2f(bias[n]);
            out[(long long)m * N + n] = f2h(v);
          }
        }
    return;
  }
#if CL > 1
  // The splits of this column tile are one cluster (grid.y == CL, rank == blockIdx.y): each
  // CTA leaves its sums in its own shared memory, red[m][ROWS], and after a cluster barrier
  // CTA r sums the rows of its share over the CL CTAs in split order (as the global fix-up
  // below: the same result, bit for bit), adds the bias and stores them.
  __syncthreads();                 // every warp is past its last read of xs and am
  float* red = (float*)smem;
  #pragma unroll
  for (int i = 0; i < 5; ++i)
    #pragma unroll
    for (int j = 0; j < NT; ++j)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 5 * (warp * 16 + g + (e < 2 ? 0 : 8)) + i, m = 8 * j + 2 * t + (e & 1);
        if (m < M) red[m * ROWS + r] = acc[i][j][e];
      }
  cluster_sync();
  {
    const int share = (ROWS + CL - 1) / CL, lo = (int)cluster_rank() * share, hi = min(lo + share, ROWS);
    for (int idx = threadIdx.x; idx < M * (hi - lo); idx += THREADS) {
      const int m = idx / (hi - lo), r = lo + idx % (hi - lo), n = n0 + r;
      if (n >= N) continue;
      float v = 0.f;
      #pragma unroll
      for (int s = 0; s < CL; ++s) v += ld_cluster(red + m * ROWS + r, s);
      if (has_bias) v += h2f(bias[n]);
      out[(long long)m * N + n] = f2h(v);
    }
  }
  cluster_exit_sync();             // no CTA leaves while another may still read its sums
  return;
#endif
  float* mine = part + (long long)blockIdx.y * M * NALL + noff;
  #pragma unroll
  for (int i = 0; i < 5; ++i)
    #pragma unroll
    for (int j = 0; j < NT; ++j)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = 5 * (e < 2 ? pA : pB) + i, m = 8 * j + 2 * t + (e & 1);
        if (n < N && m < M) __stcg(mine + (long long)m * NALL + n, acc[i][j][e]);
      }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  // the last CTA of this row range: sum the splits in split order, add the bias, store
  for (int idx = threadIdx.x; idx < M * ROWS; idx += 32 * WARPS) {
    const int m = idx / ROWS, n = n0 + idx % ROWS;
    if (n >= N) continue;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += __ldcg(part + ((long long)s * M + m) * NALL + noff + n);
    if (has_bias) v += h2f(bias[n]);
    out[(long long)m * N + n] = f2h(v);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next call
}

// Dequantize in the ORIGINAL column order, for prefill (y = x W^T by cuBLAS on x as it is):
// W[n, c] = alpha[n, b] code[n, s] + mu[n, b] with s = inv[c] the stored column, b = s / 128.
// A CTA takes R packed rows (5 R weight rows) and every column: it stages their bytes and
// their rows' (alpha, mu) pairs in shared memory, then each thread writes two neighbouring
// columns of each row (one 4-byte store), reading bytes and pairs at the stored positions.
// The value is one fp16 fma of exact inputs, so it is bit for bit alpha code + mu rounded
// once, as the Triton kernels and the reference give.
__global__ void __launch_bounds__(256) dequant_original(
    const u8* __restrict__ packed, const u16* __restrict__ alpha, const u16* __restrict__ mu,
    const void* __restrict__ inv, int inv32, u32* __restrict__ w, int N, int K, int G, int NB, int R) {
  extern __shared__ __align__(16) u32 smem[];
  u8* rows = (u8*)smem;                    // [R][K] bytes (K a multiple of 32)
  u32* am = smem + R * K / 4;              // [5 R][NB]: alpha | mu << 16
  const int g0 = blockIdx.x * R;
  for (int idx = threadIdx.x; idx < R * K / 16; idx += 256) {
    const int r = idx / (K / 16), j = idx - r * (K / 16);
    uint4 v = make_uint4(0, 0, 0, 0);
    if (g0 + r < G) v = *(const uint4*)(packed + (long long)(g0 + r) * K + 16 * j);
    *(uint4*)(rows + r * K + 16 * j) = v;
  }
  for (int idx = threadIdx.x; idx < 5 * R * NB; idx += 256) {
    const int i = idx / NB, b = idx - i * NB;
    const long long at = (long long)min(5 * g0 + i, N - 1) * NB + b;
    am[idx] = (u32)alpha[at] | ((u32)mu[at] << 16);
  }
  __syncthreads();
  for (int c = 2 * threadIdx.x; c < K; c += 512) {
    int s0, s1;
    if (inv32) { s0 = ((const int*)inv)[c]; s1 = ((const int*)inv)[c + 1]; }
    else {  // two int16 entries in one load
      const u32 two = *(const u32*)((const short*)inv + c);
      s0 = (int)(short)(two & 0xFFFF);
      s1 = (int)(short)(two >> 16);
    }
    const int bk0 = s0 >> 7, bk1 = s1 >> 7;
    for (int r = 0; r < R; ++r) {
      u32 y = (u32)rows[r * K + s0] | ((u32)rows[r * K + s1] << 16);  // digit 0's state, both columns
      #pragma unroll
      for (int i = 0; i < 5; ++i) {
        const u32 z = y * 3u;
        y = z & 0x00FF00FFu;
        const int n = 5 * (g0 + r) + i;
        if (n >= N) break;
        // code + 1 in each half, as the fp16 number 1024 + d, minus 1025: the code, exact
        const u32 dh = ((z >> 8) & 0x00030003u) | 0x64006400u;
        u32 code;
        asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(code) : "r"(dh), "r"(0x64016401u));
        const u32 p0 = am[(5 * r + i) * NB + bk0], p1 = am[(5 * r + i) * NB + bk1];
        const u32 a2 = __byte_perm(p0, p1, 0x5410), m2 = __byte_perm(p0, p1, 0x7632);
        u32 v;
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(v) : "r"(a2), "r"(code), "r"(m2));
        w[((long long)n * K + c) >> 1] = v;
      }
    }
  }
}
"""


def source() -> str:
    """The kernels' CUDA source (compiled by `_compile`)."""
    return _SRC


# Launch settings, from H100 sweeps (docs/results/mma-kernel): warps a CTA, the CTAs an SM is
# asked to hold (registers: 65536 / (32 warps minb); minb2 for M > 8), the CTAs the GPU runs at
# once, which split-K aims to fill, and the most CTAs a cluster fix-up takes (above 8, sm_90's portable
# limit, the driver is asked for non-portable sizes: 16 measured faster than 8 with 4 warps,
# slower with 8); layers of `large_from` weights or more take the "large" set.
TUNING = {"small": dict(warps=4, minb=3, minb2=2, slots=396, max_cluster=16),
          "large": dict(warps=8, minb=2, minb2=2, slots=264, max_cluster=8), "large_from": 1 << 26}
# Per layer shape, the settings that measured fastest on a GPU (benchmarks/tune_cuda.py writes
# them; PT2LLM_CUDA_TUNED=0 ignores them): {GPU name: {rows ("1": M = 1, "8": M = 2..8, "16": 9..16):
# {shape_key: settings}}}, each overriding TUNING's for launches of exactly those layers.
TUNED_FILE = Path(__file__).with_name("cuda_tuned.json")
GPC_SMS = 16         # SMs a cluster's CTAs must share (an H100 GPC has 16 or 18; the smaller)
RS = 84              # the kernel's words a staged row of activations takes per block
SMEM = 48 * 1024     # dynamic shared memory a CTA may take (no opt-in needed up to here)


def _variant(m: int) -> tuple[int, bool]:
    """(n-tiles of 8 rows, M == 1) of the compiled kernel that takes M rows."""
    return (1 if m <= 8 else 2), m == 1


def options(warps: int, minb: int, cluster: int = 1, minb2: int = 2, dependent: bool = False) -> list[str]:
    return (["-std=c++17", f"-DWARPS={warps}", f"-DMINB={minb}"] + ([f"-DCL={cluster}"] if cluster > 1 else [])
            + ([f"-DMINB2={minb2}"] if minb2 != 2 else []) + (["-DDEP=1"] if dependent else []))


def _device(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def _compile(name: str, capability: tuple[int, int], opts: tuple[str, ...]):
    """Kernel `name` of the source (a template instance or dequant_original), compiled once."""
    compile_kernel = getattr(torch.cuda, "_compile_kernel", None)
    if compile_kernel is None:
        raise RuntimeError("this torch has no torch.cuda._compile_kernel (NVRTC)")
    return compile_kernel(_SRC, name, compute_capability=f"{capability[0]}{capability[1]}",
                          nvcc_options=list(opts))


def _kernel(m: int, capability: tuple[int, int], warps: int, minb: int, cluster: int = 1, minb2: int = 2,
            dependent: bool = False):
    """The mma kernel that takes M = m rows, with these launch settings (cluster > 1: its
    splits are one cluster of that many CTAs; minb2: CTAs an SM of the M > 8 variant;
    dependent: built for dependent launches)."""
    nt, m1 = _variant(m)
    return _compile(f"ternary_mma<{nt}, {'true' if m1 else 'false'}>", capability,
                    tuple(options(warps, minb, cluster, minb2 if nt == 2 else 2, dependent)))


def _final_splits(blocks: int, splits: int) -> int:
    """The split count that cutting `blocks` into `splits` parts of equal length gives."""
    per = -(-blocks // splits)
    return -(-blocks // per)


def cluster_splits(m: int, tiles: int, blocks: int, splits: int, slots: int, capability, per_cap: int,
                   sms: int = 132, largest: int = 16) -> int:
    """The split count of the cluster fix-up for a launch of `tiles` column tiles whose global
    fix-up would take `splits` parts, or 0 to keep the global one. Measured on an H100
    (docs/results/mma-kernel, runs 12 and 13): the cluster's sum through shared memory beat
    the global partial sums by 4-12 % at M = 1 and 9-39 % at M = 4 when its clusters all ran
    at once; it lost where a cap cut a long split by more than half (M = 1, 4096x11008: 29
    parts to 8) or the clusters took two waves (the 7B gate/up group: 36 clusters of 7 CTAs,
    2 an SM). A cluster's CTAs share one GPC, so the clusters that run at once are counted per
    GPC of GPC_SMS SMs, holding slots / sms CTAs an SM. The split count is capped at `largest`
    (TUNING's "max_cluster"), and at 8 where that cap takes two waves."""
    if capability < (9, 0):
        return 0
    for limit in sorted({largest, min(largest, 8)}, reverse=True):
        s = _final_splits(blocks, min(limit, splits))
        if s < 2 or -(-blocks // s) > per_cap or (m == 1 and splits > 2 * s):
            continue
        if tiles <= (sms // GPC_SMS) * (GPC_SMS * max(1, slots // sms) // s):
            return s
    return 0


def _dequant_kernel(capability: tuple[int, int]):
    return _compile("dequant_original", capability, ("-std=c++17",))


def shape_key(n_outs, K: int) -> str:
    """The tuned table's key of a launch for layers of these output sizes reading K inputs."""
    return "+".join(str(n) for n in n_outs) + f"x{K}"


def rows_key(m: int) -> str | None:
    """The tuned table's row bucket of an M-row launch (the compiled variant it takes)."""
    return "1" if m == 1 else ("8" if m <= 8 else ("16" if m <= 16 else None))


@functools.cache
def tuned_table() -> dict:
    """The shipped per-shape settings (TUNED_FILE), {} where there is none."""
    try:
        return json.loads(TUNED_FILE.read_text())
    except FileNotFoundError:
        return {}


@functools.cache
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _settings(n_outs, K: int, m: int, device_name: str | None, over: dict) -> dict:
    """The launch settings for M = m rows of layers with these output sizes reading K inputs:
    TUNING's by size, the tuned table's for this GPU and shape where it has some (unless
    PT2LLM_CUDA_TUNED=0), `over` overriding both."""
    settings = TUNING["large" if sum(n_outs) * K >= TUNING["large_from"] else "small"]
    tuned, bucket = {}, rows_key(m)
    if device_name is not None and bucket and os.environ.get("PT2LLM_CUDA_TUNED", "1") != "0":
        tuned = tuned_table().get(device_name, {}).get(bucket, {}).get(shape_key(n_outs, K), {})
    return {**settings, **tuned, **over}


@functools.cache
def _available(device_index: int, dequant: bool = False) -> bool:
    """Whether the mma kernel (or the dequantize kernel) compiles and loads on this device
    (once per device)."""
    cap = torch.cuda.get_device_capability(device_index)
    if cap < (8, 0):
        return False
    try:
        with torch.cuda.device(device_index):
            if dequant:
                _dequant_kernel(cap)
            else:
                _kernel(1, cap, TUNING["small"]["warps"], TUNING["small"]["minb"])
    except Exception:  # no NVRTC, or it failed: the Triton kernel runs instead
        return False
    return True


def supported(x: torch.Tensor, packed: torch.Tensor, perm: torch.Tensor, block_size: int) -> bool:
    """Inputs this kernel takes (see the module docstring)."""
    K = x.shape[-1]
    if not (x.is_cuda and x.dtype == torch.float16 and block_size == 128 and K > 0 and K % 32 == 0):
        return False
    if x.numel() // K > 16 or not packed.is_contiguous() or packed.data_ptr() % 16:
        return False
    if perm.dtype not in (torch.int16, torch.int32) or perm.numel() != K or not perm.is_contiguous():
        return False
    return _available(_device(x))


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


_CLUSTER_DIMENSION = 4          # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
_PROGRAMMATIC = 6               # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_NON_PORTABLE_CLUSTERS = 14     # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED


@functools.cache
def _cluster_launch() -> bool:
    """Whether the driver has cuLaunchKernelEx (CUDA 12), which cluster launches take."""
    try:
        from torch.cuda._utils import _get_gpu_runtime_library
        return hasattr(_get_gpu_runtime_library(), "cuLaunchKernelEx")
    except Exception:
        return False


@functools.cache
def _driver():
    """The CUDA driver library (ctypes), loaded once."""
    from torch.cuda._utils import _get_gpu_runtime_library
    return _get_gpu_runtime_library()


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _stream(device_index: int) -> int:
    """The handle of the device's current stream."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device_index) if raw is not None else torch.cuda.current_stream(device_index).cuda_stream


def _arg_value(a) -> int:
    """A kernel argument's 8-byte slot as torch's launcher fills it: a tensor's device
    pointer, a Python int as a C int and a float as a C float (the low 4 bytes of a
    little-endian slot)."""
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    if isinstance(a, float):
        return struct.unpack("<I", struct.pack("<f", a))[0]
    return a & 0xFFFFFFFF


def norm_supported(x2: torch.Tensor, delta2, weight) -> bool:
    """Whether Matmul's RMS norm takes this row: one contiguous fp16 row x2 [1, K] (and delta2
    alike), 16-byte aligned, and a contiguous fp16 weight of K entries."""
    K = x2.shape[-1]
    rows = [x2] + ([] if delta2 is None else [delta2])
    return (x2.shape[0] == 1 and K % 8 == 0 and weight.dtype == torch.float16 and weight.is_contiguous()
            and weight.numel() == K and weight.device == x2.device
            and all(r.dtype == torch.float16 and r.shape == x2.shape and r.is_contiguous() and r.data_ptr() % 16 == 0
                    for r in rows))


class Launcher:
    """One kernel launch (a kernel from torch.cuda._compile_kernel, its grid, block, shared
    memory, stream, cluster size and whether it is a programmatic dependent launch) with its
    arguments written once into ctypes slots.
    Calling it launches; between calls `values[i] = ...` refills the slots that change (the
    driver copies the values when the launch is made). Cluster dims are (1, cluster, 1) when
    cluster > 1 (sizes above 8 are allowed on the function first). This is a fraction of
    torch's launcher's host time: eager decoding launches one kernel a layer and token."""

    def __init__(self, kern, grid, block, shared_mem: int, args, stream: int, cluster: int = 1,
                 dependent: bool = False):
        lib = _driver()
        if cluster > 8 and not getattr(kern, "_pt2llm_large_clusters", False):
            rc = lib.cuFuncSetAttribute(kern.func, _NON_PORTABLE_CLUSTERS, 1)
            if rc != 0:
                raise RuntimeError(f"cuFuncSetAttribute(non-portable cluster size) failed with CUDA error {rc}")
            kern._pt2llm_large_clusters = True
        self.dependent = dependent
        n = len(args)
        self.values = (ctypes.c_uint64 * n)(*[_arg_value(a) for a in args])
        base = ctypes.addressof(self.values)
        self._pointers = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        if cluster > 1 or dependent:
            attrs = []
            if cluster > 1:
                attrs.append(_LaunchAttribute(id=_CLUSTER_DIMENSION))
                attrs[-1].value[0], attrs[-1].value[1], attrs[-1].value[2] = 1, cluster, 1
            if dependent:
                attrs.append(_LaunchAttribute(id=_PROGRAMMATIC))
                attrs[-1].value[0] = 1
            self._attrs = (_LaunchAttribute * len(attrs))(*attrs)
            self._config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                                         ctypes.c_void_p(stream), self._attrs, len(attrs))
            self._call = lib.cuLaunchKernelEx, (ctypes.byref(self._config), kern.func, self._pointers, None)
            what = ([f"a cluster of {cluster}"] if cluster > 1 else []) + (["dependent"] if dependent else [])
            self._what = f"cuLaunchKernelEx ({', '.join(what)})"
        else:
            self._call = lib.cuLaunchKernel, (kern.func, *grid, *block, shared_mem, ctypes.c_void_p(stream),
                                              self._pointers, None)
            self._what = "cuLaunchKernel"

    def __call__(self) -> None:
        fn, args = self._call
        rc = fn(*args)
        if rc != 0:
            raise RuntimeError(f"{self._what} failed with CUDA error {rc}")


def _launch(kern, grid, block, shared_mem: int, args, stream: int, cluster: int = 1) -> None:
    """Launch `kern` once (see Launcher)."""
    Launcher(kern, grid, block, shared_mem, args, stream, cluster)()


@functools.cache
def _sms(device_index: int) -> int:
    """The device's SM count."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _counters(device_index: int, stream: int) -> torch.Tensor:
    """Per-row-range arrival counters of the split-K fix-up, one set per device and stream
    (kernels on one stream run one after the other); each call leaves them at 0. Made outside
    torch.compile's CUDA-graph pools (`lasting`); when the first use is inside a plain
    CUDA-graph capture they come from that graph's pool, and the captured memset zeroes them
    again at every replay."""
    dev = torch.device("cuda", device_index)
    return lasting.make(lambda: torch.zeros(1 << 16, dtype=torch.int32, device=dev), dev)


def matmul(x2: torch.Tensor, packed, alpha, mu, perm, bias, n_out: int, splits: int | None = None,
           **over) -> torch.Tensor:
    """x2 [M, K] fp16 (rows contiguous, M <= 16) -> [M, n_out] fp16; `supported` must hold.
    `over` overrides TUNING's settings; `splits` fixes the split-K count."""
    return matmul_group(x2, [(packed, alpha, mu, perm, bias, n_out)], splits, **over)[0]


MAX_GROUP = 3  # layers one launch takes (the kernel's packed0..packed2)


def _plan(M: int, K: int, NB: int, packed_rows: list[int], n_outs: list[int], dev: int, splits: int | None = None,
          cluster: bool | None = None, over: dict | None = None):
    """(settings, tiles per layer, split count, cluster size or 0, dynamic shared memory) of a
    launch for M rows of layers with these packed row counts and output sizes (see
    matmul_group)."""
    cap = _capability(dev)
    settings = _settings(n_outs, K, M, _device_name(dev), over or {})
    per_tile = 16 * settings["warps"]
    tiles = [-(-g // per_tile) for g in packed_rows]
    if sum(tiles) > (1 << 16):
        raise ValueError(f"layers too tall for the CUDA kernel: {sum(n_outs)} rows")
    # shared memory: the activations (XR rows) and the (alpha, mu) pairs of every block the CTA
    # takes; at most SMEM bytes, which bounds the blocks a CTA takes
    nt, m1 = _variant(M)
    xr, rows = (1 if m1 else 8 * nt), 80 * settings["warps"]
    per_cap = max(1, SMEM // (4 * (xr * RS + rows)))
    given = splits is not None
    splits = _final_splits(NB, max(splits or split_count(sum(tiles), NB, settings["slots"]), -(-NB // per_cap)))
    cl = 0
    if cluster is None and not given and _cluster_launch():
        slots = settings["slots"] if M <= 8 else settings["slots"] * settings["minb2"] // settings["minb"]
        cl = cluster_splits(M, sum(tiles), NB, splits, slots, cap, per_cap, _sms(dev), settings["max_cluster"])
    elif cluster and splits > 1:
        if not (cap >= (9, 0) and _cluster_launch() and splits <= settings["max_cluster"]):
            raise ValueError(f"a cluster fix-up needs sm_90, CUDA 12 and at most {settings['max_cluster']} "
                             f"splits, not {splits}")
        cl = splits
    splits = cl or splits
    smem = 4 * -(-NB // splits) * (xr * RS + rows)
    if cl:
        smem = max(smem, 4 * M * rows)  # the cluster fix-up's sums reuse the CTA's shared memory
    return settings, tiles, splits, cl, smem


def dependent_possible(x: torch.Tensor) -> bool:
    """Whether the kernel's launches on x's GPU can be programmatic dependent launches (sm_90
    and the driver's cuLaunchKernelEx); inside kernels.dependent.dependent_launches they are."""
    return _capability(_device(x)) >= (9, 0) and _cluster_launch()


def clustered(x2: torch.Tensor, layers) -> bool:
    """Whether matmul_group's default launch for these layers ([(packed, n_out), ...]) sums
    its splits in a cluster: where it does, the kernel is faster than the Triton one at 9-16
    rows too (docs/results/kernels.md, M = 16)."""
    M, K = x2.shape
    return _plan(M, K, -(-K // 128), [p.shape[0] for p, _ in layers], [n for _, n in layers], _device(x2))[3] > 0


def matmul_group(x2: torch.Tensor, layers, splits: int | None = None, cluster: bool | None = None,
                 **over) -> list[torch.Tensor]:
    """One launch for up to MAX_GROUP layers that read the same x2 [M, K] (q/k/v, gate/up):
    layers = [(packed, alpha, mu, perm, bias, n_out), ...] with the same K and perm dtype,
    `supported` holding for each -> their outputs [M, n_out] fp16, in order. Each layer's
    output is what `matmul` gives it alone, bit for bit when the split count is the same.
    cluster: how the splits are summed; None picks by `cluster_splits` when `splits` is not
    given (then the split count may be lower than split_count's), True takes a cluster of the
    split count (2 to the settings' "max_cluster", on sm_90), False (or None with `splits`) the
    global fix-up.
    Both sum in split order: at one split count, the same output bit for bit."""
    return prepare(x2, layers, splits, cluster, **over)(x2)


# argument slots of the kernel that change from call to call (see prepare's args)
_X_SLOT = 0
_OUT_SLOT = 1 + 5 * MAX_GROUP   # out0..out2
_PART_SLOT = _OUT_SLOT + MAX_GROUP
# and the last four: xu (the up projection's output where x is a gate's; where nw is given, the
# residual's new part), nw (an RMS norm's weight), eps (its epsilon, a C float) and hout (where
# the norm's input x + xu goes)
_XU_SLOT, _NW_SLOT, _EPS_SLOT, _HOUT_SLOT = -4, -3, -2, -1


class Matmul:
    """matmul_group's launch, prepared (`prepare`) for its layers, its x's row count, width,
    row stride and device, and the stream it was made on. Calling it with such an x2
    allocates the outputs (and the split-K partial sums), writes their addresses and x2's
    into the launch's argument slots, and launches on that stream. The layers' tensors are
    not kept: their addresses are written in, so whoever keeps a Matmul keys it on them."""

    def __init__(self, launcher: Launcher, m: int, n_outs: list[int], part_shape, device: torch.device):
        self.launcher, self.m, self.n_outs, self.part_shape, self.device = launcher, m, n_outs, part_shape, device

    def __call__(self, x2: torch.Tensor, up2: torch.Tensor | None = None, norm=None) -> list[torch.Tensor]:
        """up2: when given (of x2's shape and strides), the layers read silu(x2) up2 instead of
        x2 (a gated MLP's down projection, x2 the gate's output), computed as the kernel stages
        its activations.
        norm = (delta2 or None, weight, eps), one row (M = 1): the layers read transformers'
        RMSNorm of h = x2 + delta2 (or x2), weight * fp16(h / rms(h)), with rms over the row
        and eps added to the mean square; with delta2, h is returned after the outputs. x2,
        delta2 contiguous and 16-byte aligned, weight [K] fp16 contiguous (`norm_supported`)."""
        outs = [torch.empty((self.m, n), device=self.device, dtype=torch.float16) for n in self.n_outs]
        values = self.launcher.values
        values[_X_SLOT] = x2.data_ptr()
        if norm is None:
            values[_XU_SLOT] = 0 if up2 is None else up2.data_ptr()
            values[_NW_SLOT] = values[_EPS_SLOT] = values[_HOUT_SLOT] = 0
        else:
            if self.m != 1 or up2 is not None:
                raise ValueError("the CUDA kernel's RMS norm takes one row and no up projection")
            delta2, weight, eps = norm
            values[_XU_SLOT] = 0 if delta2 is None else delta2.data_ptr()
            values[_NW_SLOT] = weight.data_ptr()
            values[_EPS_SLOT] = _arg_value(float(eps))
            if delta2 is not None:
                outs.append(torch.empty_like(x2))
            values[_HOUT_SLOT] = 0 if delta2 is None else outs[-1].data_ptr()
        last = len(self.n_outs) - 1
        for i in range(MAX_GROUP):  # unused slots repeat the last layer's (never written: no tiles)
            values[_OUT_SLOT + i] = outs[min(i, last)].data_ptr()
        if self.part_shape is not None:
            part = torch.empty(self.part_shape, device=self.device, dtype=torch.float32)
            values[_PART_SLOT] = part.data_ptr()
        else:
            values[_PART_SLOT] = values[_OUT_SLOT]
        self.launcher()
        return outs


def prepare(x2: torch.Tensor, layers, splits: int | None = None, cluster: bool | None = None,
            **over) -> Matmul:
    """The launch that matmul_group(x2, layers, splits, cluster, **over) makes, prepared on
    the current stream (see Matmul): checks the layers, plans the launch and writes every
    argument that does not change from call to call."""
    if not 1 <= len(layers) <= MAX_GROUP:
        raise ValueError(f"the CUDA kernel takes 1 to {MAX_GROUP} layers a launch, not {len(layers)}")
    M, K = x2.shape
    NB = layers[0][1].shape[1]
    perm32 = layers[0][3].dtype == torch.int32
    for packed, alpha, mu, perm, _, n_out in layers:
        if alpha.dtype != torch.float16 or mu.dtype != torch.float16 or not (alpha.is_contiguous() and mu.is_contiguous()):
            raise ValueError("the CUDA kernel takes contiguous fp16 alpha and mu")
        if packed.shape[1] != K or alpha.shape[1] != NB or (perm.dtype == torch.int32) != perm32:
            raise ValueError("a group's layers must share K, the block count and the column order's dtype")
    dev = _device(x2)
    cap = _capability(dev)
    n_outs = [layer[5] for layer in layers]
    settings, tiles, splits, cl, smem = _plan(M, K, NB, [layer[0].shape[0] for layer in layers],
                                              n_outs, dev, splits, cluster, over)
    per = -(-NB // splits)
    dependent = dependent_launch() and dependent_possible(x2)
    kern = _kernel(M, cap, settings["warps"], settings["minb"], cl or 1, settings["minb2"], dependent)
    stream = _stream(dev)
    counters = _counters(dev, stream)
    # the kernel's MAX_GROUP slots: unused ones repeat the last layer (never read: no tiles)
    spare = MAX_GROUP - len(layers)
    slots = layers + layers[-1:] * spare
    tensors = [slot[i] for i in range(4) for slot in slots]  # packed0..2, alpha0..2, mu0..2, perm0..2
    tensors += [slot[4] if slot[4] is not None else slot[1] for slot in slots]  # bias0..2
    n = n_outs + [0] * spare
    bias_mask = sum(1 << i for i, layer in enumerate(layers) if layer[4] is not None)
    ends = [sum(tiles[:1]), sum(tiles[:2])]
    grid, block = (sum(tiles), splits, 1), (32 * settings["warps"], 1, 1)
    outs_part = [0] * (MAX_GROUP + 1)  # out0..2 and the partial sums: written at each call
    args = [0, *tensors, *outs_part, counters, M, *n, K, NB, x2.stride(0), per, splits, int(perm32), bias_mask, *ends,
            0, 0, 0, 0]  # xu, nw, eps, hout: written at each call
    part_shape = (splits, M, sum(n_outs)) if splits > 1 and not cl else None
    return Matmul(Launcher(kern, grid, block, smem, args, stream, cl or 1, dependent), M, n_outs, part_shape,
                  x2.device)


def dequant_supported(packed: torch.Tensor, alpha: torch.Tensor, inv_perm: torch.Tensor, block_size: int,
                      dtype: torch.dtype) -> bool:
    """Whether `dequantize_original` takes these buffers: fp16 out, block size 128, K a multiple
    of 32 with at least one packed row's bytes and (alpha, mu) pairs fitting in SMEM, int16 or
    int32 inv_perm, on a GPU where the kernel compiles."""
    G, K = packed.shape
    NB = alpha.shape[1]
    if not (packed.is_cuda and dtype == torch.float16 and block_size == 128 and K > 0 and K % 32 == 0):
        return False
    if K + 20 * NB > SMEM or not packed.is_contiguous() or packed.data_ptr() % 16:
        return False
    if (inv_perm.dtype not in (torch.int16, torch.int32) or inv_perm.numel() != K or not inv_perm.is_contiguous()
            or inv_perm.data_ptr() % 4):
        return False
    if alpha.dtype != torch.float16 or not alpha.is_contiguous():
        return False
    return _available(_device(packed), dequant=True)


def dequantize_original(packed, alpha, mu, inv_perm, n_out: int) -> torch.Tensor:
    """alpha * code + mu as fp16 [n_out, K], columns in the ORIGINAL order (column c is stored
    column inv_perm[c]); `dequant_supported` must hold."""
    G, K = packed.shape
    NB = alpha.shape[1]
    R = 1
    while R < 8 and 2 * R * (K + 20 * NB) <= SMEM and 2 * R <= G:
        R *= 2
    w = torch.empty(n_out, K, device=packed.device, dtype=torch.float16)
    dev = _device(packed)
    _launch(_dequant_kernel(_capability(dev)), (-(-G // R), 1, 1), (256, 1, 1), R * (K + 20 * NB),
            [packed, alpha, mu, inv_perm, int(inv_perm.dtype == torch.int32), w, n_out, K, G, NB, R], _stream(dev))
    return w
