"""Triton kernel for the online Hadamard transform of rotated models (rotate/online.py):
y = x diag(s) K_n with K_n = A ⊗ H_p / sqrt(p) (rotate/hadamard.py), one kernel for all of it.

The torch path (`hadamard.transform`) runs the signs, each group of five radix-2 stages and the
small factor A as separate kernels (with transposes between them): on an H100 it took 19-28 µs
a transform at M = 1 and 0.05-8.5 ms at M = 2048; this kernel 2.4-12 µs and 0.01-0.22 ms, 2x
to 77x faster at every width and M measured (docs/results/online-hadamard-kernel.md). Here one
program takes one row, at any M:
  - x is loaded as a tile X [HP, p] (row r of X is x[r p : (r + 1) p]; HP = h rounded up to a
    power of two, padding rows 0), times the signs;
  - X H_p as one or two tensor-core products: H_p = H_q1 ⊗ H_q2 in Sylvester order, so with X
    as [HP, q1, q2], a product with H_q2 on the last axis, the axes turned, a product with H_q1,
    and turned back; H_q (q <= 128) is built in registers, H[i, j] = (-1)^popcount(i & j);
  - Aᵀ X as one more product (skipped when h = 1), A zero-padded to [HP, HP];
  - times 1 / sqrt(p), stored in x's dtype.
The products take fp32 operands (TF32 on the GPU: the ±1 entries are exact, the operands keep
10 mantissa bits, like fp16), accumulating in fp32: a relative error of about 1e-3, so it takes
16-bit inputs only. Widths it takes (`supported_width`): p a power of two from 16 to 128 * 128
(above 128 when h = 1), h <= 128 and (h rounded up) x p <= 32768: the tiles then fit in an
H100's 227 KiB of shared memory. (Beyond that the kernel does not build: h = 200, as in width
3200, asked for 272 KiB and failed with OutOfResources on an H100, 2026-11-23; sm_90 builds
of HP x P = 128 x 512 or 16 x 4096 fail in ptxas.) Others (and the CPU) keep the torch path. It
also runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1), how CI checks it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rotate import hadamard

MAX_Q = 128  # largest Sylvester factor built in registers
MAX_H = 128  # largest small factor (rounded up to a power of two): A is an [HP, HP] tile
MAX_TILE = 32768  # largest HP x p tile (x in fp32, with A and the products' operands)


@triton.jit
def _sylvester(Q: tl.constexpr):
    """H_Q (entries ±1, fp32), Sylvester order: (-1)^popcount(i & j)."""
    i = tl.arange(0, Q)
    b = i[:, None] & i[None, :]
    b = b ^ (b >> 4)
    b = b ^ (b >> 2)
    b = b ^ (b >> 1)
    return tl.where((b & 1) == 0, 1.0, -1.0)


@triton.jit
def _hadamard_kernel(x_ptr, s_ptr, a_ptr, y_ptr, n, h, stride_x, stride_y, scale,
                     HP: tl.constexpr, P: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr,
                     HAS_A: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, HP)
    c = tl.arange(0, P)
    idx = r[:, None] * P + c[None, :]
    mask = r[:, None] < h
    x = tl.load(x_ptr + row * stride_x + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + idx, mask=mask, other=0).to(tl.float32)
    x = x * s
    # X H_p, H_p = H_Q1 ⊗ H_Q2: the last axis first, then the middle one
    x = tl.reshape(tl.dot(tl.reshape(x, (HP * Q1, Q2)), _sylvester(Q2)), (HP, Q1, Q2))
    if Q1 > 1:
        x = tl.reshape(tl.permute(x, (0, 2, 1)), (HP * Q2, Q1))
        x = tl.permute(tl.reshape(tl.dot(x, _sylvester(Q1)), (HP, Q2, Q1)), (0, 2, 1))
    x = tl.reshape(x, (HP, P))
    if HAS_A:  # Aᵀ X: at[i, j] = A[j, i], zero outside h x h
        at = tl.load(a_ptr + r[None, :] * h + r[:, None], mask=(r[:, None] < h) & (r[None, :] < h), other=0.0)
        x = tl.dot(at, x)
    tl.store(y_ptr + row * stride_y + idx, (x * scale).to(y_ptr.dtype.element_ty), mask=mask)


def split(n: int) -> tuple[int, int, int, int] | None:
    """(h, HP, q1, q2) for width n (p = n / h = q1 q2), or None when the kernel does not take it."""
    _, h = hadamard.plan(n)
    p = n // h
    if p < 16 or p > MAX_Q * MAX_Q or (h == 1 and p <= MAX_Q):
        return None  # (a power of two up to 128 wide would be a one-row product)
    if p <= MAX_Q:
        q1, q2 = 1, p
    else:
        q2 = MAX_Q
        while p // q2 < 16:  # both factors >= 16: tensor-core products need K, N >= 16
            q2 //= 2
        q1 = p // q2
    hp = max(16, triton.next_power_of_2(h)) if h > 1 else 1
    if hp > MAX_H or hp * p > MAX_TILE:
        return None  # more shared memory than the GPU has (see the module docstring)
    return h, hp, q1, q2


def supported_width(n: int) -> bool:
    return split(n) is not None


def supported(x: torch.Tensor) -> bool:
    """Inputs this kernel takes (else the torch path runs): 16-bit ones, whose own rounding the
    TF32 products stay under (float32 keeps the exact torch path: a rotated float32 model
    computes what the original does to float32 rounding, tests/test_rotate.py)."""
    return x.dtype in (torch.float16, torch.bfloat16) and x.numel() > 0 and supported_width(x.shape[-1])


def transform(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x diag(signs) K_n along the last dimension, in x's dtype (see the module docstring)."""
    n = x.shape[-1]
    h, hp, q1, q2 = split(n)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    signs = signs.to(x.device)  # signs on any device, as hadamard.transform takes them
    a = hadamard.factor(n, x.device, torch.float32) if h > 1 else x2
    warps = 4 if n <= 4096 else 8 if n <= 16384 else 16
    _hadamard_kernel[(x2.shape[0],)](x2, signs, a, y, n, h, x2.stride(0), y.stride(0), (n // h) ** -0.5,
                                     HP=hp, P=n // h, Q1=q1, Q2=q2, HAS_A=h > 1,
                                     num_warps=warps)
    return y.reshape(x.shape)
