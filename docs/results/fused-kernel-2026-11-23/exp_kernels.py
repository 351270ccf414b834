"""Fused-kernel variants measured on 2026-11-23 (docs/results/fused-kernel-2026-11-23/README.md): a
standalone prototype; nothing in pt2llm/ uses it. `matmul` takes the variant as keywords."""
import torch, triton, triton.language as tl
from pt2llm.kernels.triton_ternary import _state, _weights, _store, _sum_splits_kernel

@triton.jit
def _epi(acc, d, s, a_ptr, m_ptr, rg, blk, N, NB, I: tl.constexpr):
    n = rg * 5 + I
    alpha = tl.load(a_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)
    mu = tl.load(m_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)
    return acc + (4 * alpha)[:, None] * d + (mu - 5 * alpha)[:, None] * s[None, :]

@triton.jit
def _fold(w, a_ptr, m_ptr, rg, blk, N, NB, I: tl.constexpr, APPROX: tl.constexpr):
    """The weights alpha * code + mu in w's dtype, from w = 1 + d/4: w (4 alpha) + (mu - 5 alpha)."""
    n = rg * 5 + I
    alpha = tl.load(a_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)
    mu = tl.load(m_ptr + n.to(tl.int64) * NB + blk, mask=n < N, other=0).to(tl.float32)
    if APPROX:
        return w * (4 * alpha).to(w.dtype)[:, None] + (mu - 5 * alpha).to(w.dtype)[:, None]
    t = w * 4 - 5  # the code, exactly
    return t * alpha.to(w.dtype)[:, None] + mu.to(w.dtype)[:, None]


@triton.jit
def _mm(x_ptr, p_ptr, pdesc, xdesc, a_ptr, m_ptr, perm_ptr, b_ptr, out_ptr,
        M, N, K, G, NB, stride_xm, stride_om, stride_os, blocks_per_split,
        BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
        GATHER: tl.constexpr, TMA: tl.constexpr, XTMA: tl.constexpr, EPI: tl.constexpr, CHEAP: tl.constexpr, FOLD: tl.constexpr, APPROX: tl.constexpr):
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
        if XTMA:
            xt = tl.trans(xdesc.load([pid_m * BLOCK_M, blk * BLOCK]))
        else:
            if GATHER:
                cols = tl.load(perm_ptr + k, mask=k < K, other=0).to(tl.int64)
            else:
                cols = k.to(tl.int64)
            xt = tl.load(x_ptr + rm[None, :].to(tl.int64) * stride_xm + cols[:, None],
                         mask=(k[:, None] < K) & (rm[None, :] < M), other=0.0)
        s = tl.sum(xt.to(tl.float32), axis=0)
        if TMA:
            b = pdesc.load([pid_g * BLOCK_G, blk * BLOCK])
        else:
            b = tl.load(p_ptr + rg[:, None].to(tl.int64) * K + k[None, :], mask=(rg[:, None] < G), other=0)
        z = _state(b, BLOCK_G, BLOCK, False)
        if FOLD:
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc0 = tl.dot(_fold(w, a_ptr, m_ptr, rg, blk, N, NB, 0, APPROX), xt, acc0)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc1 = tl.dot(_fold(w, a_ptr, m_ptr, rg, blk, N, NB, 1, APPROX), xt, acc1)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc2 = tl.dot(_fold(w, a_ptr, m_ptr, rg, blk, N, NB, 2, APPROX), xt, acc2)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc3 = tl.dot(_fold(w, a_ptr, m_ptr, rg, blk, N, NB, 3, APPROX), xt, acc3)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc4 = tl.dot(_fold(w, a_ptr, m_ptr, rg, blk, N, NB, 4, APPROX), xt, acc4)
        elif CHEAP:
            w, z2 = _weights(z, BLOCK_G, BLOCK, False)
            acc0 = tl.dot(w, xt, acc0)
            acc1 = tl.dot(w, xt, acc1)
            acc2 = tl.dot(w, xt, acc2)
            acc3 = tl.dot(w, xt, acc3)
            acc4 = tl.dot(w, xt, acc4)
        elif EPI:
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc0 = _epi(acc0, tl.dot(w, xt), s, a_ptr, m_ptr, rg, blk, N, NB, 0)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc1 = _epi(acc1, tl.dot(w, xt), s, a_ptr, m_ptr, rg, blk, N, NB, 1)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc2 = _epi(acc2, tl.dot(w, xt), s, a_ptr, m_ptr, rg, blk, N, NB, 2)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc3 = _epi(acc3, tl.dot(w, xt), s, a_ptr, m_ptr, rg, blk, N, NB, 3)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc4 = _epi(acc4, tl.dot(w, xt), s, a_ptr, m_ptr, rg, blk, N, NB, 4)
        else:
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc0 = tl.dot(w, xt, acc0)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc1 = tl.dot(w, xt, acc1)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc2 = tl.dot(w, xt, acc2)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc3 = tl.dot(w, xt, acc3)
            w, z = _weights(z, BLOCK_G, BLOCK, False)
            acc4 = tl.dot(w, xt, acc4)
    out_ptr += pid_s.to(tl.int64) * stride_os
    _store(out_ptr, acc0, b_ptr, rg, rm, N, M, stride_om, 0, False)
    _store(out_ptr, acc1, b_ptr, rg, rm, N, M, stride_om, 1, False)
    _store(out_ptr, acc2, b_ptr, rg, rm, N, M, stride_om, 2, False)
    _store(out_ptr, acc3, b_ptr, rg, rm, N, M, stride_om, 3, False)
    _store(out_ptr, acc4, b_ptr, rg, rm, N, M, stride_om, 4, False)


def matmul(x2, packed, alpha, mu, perm, n_out, block_g=64, warps=4, stages=2, programs=264, gather=True,
           tma=False, xtma=False, pre=False, epi=True, cheap=False, fold=False, approx=False, maxnreg=None):
    """pre: gather x by perm with index_select first (then no in-kernel gather)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    M, K = x2.shape
    G, NB = packed.shape[0], alpha.shape[1]
    if pre:
        x2 = x2.index_select(1, perm.long()) if perm.numel() else x2
        gather = False
    bm = 16
    grid_g, grid_m = triton.cdiv(G, block_g), triton.cdiv(M, bm)
    splits = max(1, min(NB, programs // max(1, grid_g * grid_m)))
    per_split = triton.cdiv(NB, splits)
    splits = triton.cdiv(NB, per_split)
    out = torch.empty(M, n_out, device=x2.device, dtype=x2.dtype)
    part = out if splits == 1 else torch.empty(splits, M, n_out, device=x2.device, dtype=torch.float32)
    pdesc = TensorDescriptor.from_tensor(packed, [block_g, 128]) if tma else None
    xdesc = TensorDescriptor.from_tensor(x2, [bm, 128]) if xtma else None
    _mm[(grid_g, grid_m, splits)](x2, packed, pdesc, xdesc, alpha, mu, perm, alpha, part,
        M, n_out, K, G, NB, x2.stride(0), n_out, M * n_out, per_split,
        BLOCK=128, BLOCK_G=block_g, BLOCK_M=bm, GATHER=gather, TMA=tma, XTMA=xtma, EPI=epi, CHEAP=cheap, FOLD=fold, APPROX=approx, **({'maxnreg': maxnreg} if maxnreg else {}),
        num_warps=warps, num_stages=stages)
    if splits > 1:
        MN, B = M * n_out, 1024
        _sum_splits_kernel[(triton.cdiv(MN, B),)](part, alpha, out, MN, n_out, splits, HAS_BIAS=False, BLOCK=B)
    return out
