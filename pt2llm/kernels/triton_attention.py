"""Triton kernel for decode attention (one query token a sequence) over a static KV cache,
split along the keys (flash-decoding): the decode step's attention in `pt2llm bench`
(speed.Decoder), and in any transformers model switched to it (pt2llm.attention).

At batch 1 a decode step's attention reads a few MB of cache a layer, which the copy
bandwidth moves in 1-2 µs, yet the SDPA backend torch picks on an H100 (cuDNN's flash
forward, built for many queries) took 10 µs a layer: one CTA a head walks every key
(docs/results/e2e.md, the decode profile). Here the keys of each (sequence, head) are cut
into chunks, one program a chunk (one tile of BLOCK_N keys where the chunk count allows):

  program (b h, s) loads the query (times the softmax scale), walks its chunk in tiles of
  BLOCK_N keys, masks the keys the mask excludes (their K and V rows are not loaded at all,
  so the unused tail of a static cache costs nothing but its mask), and keeps the
  online-softmax state: the running max m, the sum l of exp(score - m), and
  acc = sum exp(score - m) v. It stores (acc, m, l) in fp32 and counts itself in (b h)'s
  arrival counter;
  the program that arrives last for its (b h) merges the chunks, out = sum_s e^(m_s - M) acc_s /
  sum_s e^(m_s - M) l_s with M the largest m_s, stores out in the query's dtype and sets the
  counter back to 0. So one launch does what took a second kernel before (the merge): 1.7 µs
  a layer of a 7B-shape decode step (H100; about 30 µs a token end to end, docs/results/e2e.md).

`decode_append` does a decode step's cache write in the same launch (the compiled step's
`ops.fuse_cache_write`): the new key and value (after the rotary embedding, which the kernel
applies to the query and the key as well) go into the static cache at its length, written by
one program a kv head; the program whose chunk holds that position takes the new row from its
registers rather than the cache. The last program of the launch advances the cache's length
counter (transformers' StaticCache `cumulative_length`), once every program has read it: three
small kernels fewer a layer (rotary + key write, value write, the counter).

It runs on fp32 scores and sums. Grouped-query attention reads kv head h // (H / Hkv). The
mask is what transformers passes to an attention function: None (every key), bool (True:
attend) or additive (0 or -inf, as the eager path adds it), broadcastable to [B, H, 1, L]. A
sequence whose keys are all masked gets zeros (SDPA gives NaN there).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Tile and warps: of 32, 64 or 128 keys and 2, 4 or 8 warps, 32 keys and 2 warps was fastest
# or within 10 % of the fastest in 8 of 9 decode cases on an H100 (Llama-2-7B, -70B and
# Qwen2.5-0.5B heads, 128 to 2048 keys filled; docs/results/decode-attention.md)
BLOCK_N = 32       # keys a tile
WARPS = 2          # warps a program
MAX_SPLITS = 64    # chunks a (sequence, head) at most
MAX_PROGRAMS = 8192  # (sequence, head, chunk) programs at most, bounding the partial sums' buffer


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, m_ptr, part_ptr, cnt_ptr, o_ptr, scale, L, H, G,
                   sqb, sqh, skb, skh, skl, svb, svh, svl, smb, smh, sml, sob, soh,
                   kn_ptr, vn_ptr, cos_ptr, sin_ptr, idx_ptr, sknb, sknh, svnb, svnh, scb, ssb,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   MASK: tl.constexpr, SP: tl.constexpr, APPEND: tl.constexpr, ROPE: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // H
    h = bh - b * H
    hk = h // G
    d = tl.arange(0, DP)
    dm = d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + d, mask=dm, other=0.0).to(tl.float32)
    if ROPE:  # q cos + rotate_half(q) sin, in fp32 and rounded once (as Inductor fuses it)
        q = _rope(q_ptr + b * sqb + h * sqh, q, cos_ptr + b * scb, sin_ptr + b * ssb, d, dm, D)
    q = q * scale
    if APPEND:  # this step's key and value: into the cache at idx, and into this chunk's sums
        idx = tl.load(idx_ptr)
        kn = tl.load(kn_ptr + b * sknb + hk * sknh + d, mask=dm, other=0.0)
        if ROPE:
            kn = _rope(kn_ptr + b * sknb + hk * sknh, kn.to(tl.float32), cos_ptr + b * scb, sin_ptr + b * ssb,
                       d, dm, D)
        kn = kn.to(k_ptr.dtype.element_ty)
        vn = tl.load(vn_ptr + b * svnb + hk * svnh + d, mask=dm, other=0.0).to(v_ptr.dtype.element_ty)
        mine = (idx >= s * CHUNK) & (idx < s * CHUNK + CHUNK) & (idx < L)
        # one query head of the group writes (d < D or nothing: a bool scalar in a mask trips
        # Triton's interpreter)
        write = d < tl.where(mine & (h - hk * G == 0), D, 0)
        row = b.to(tl.int64) * skb + hk.to(tl.int64) * skh + idx * skl
        tl.store(k_ptr + row + d, kn, mask=write)
        tl.store(v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + idx * svl + d, vn, mask=write)
    m_i = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    acc = tl.zeros([DP], tl.float32)
    kb = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    vb = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    for start in range(0, CHUNK, BLOCK):
        n = s * CHUNK + start + tl.arange(0, BLOCK)
        inside = n < L
        if MASK == 1:    # bool: nonzero attends
            keep = tl.load(m_ptr + b * smb + h * smh + n * sml, mask=inside, other=0) != 0
            valid = inside & keep
        elif MASK == 2:  # additive
            add = tl.load(m_ptr + b * smb + h * smh + n * sml, mask=inside, other=float("-inf")).to(tl.float32)
            valid = inside & (add > float("-inf"))
        else:
            valid = inside
        # keys and values in one round trip (both wait only for the mask)
        kt = tl.load(kb + n[:, None].to(tl.int64) * skl + d[None, :], mask=valid[:, None] & dm[None, :], other=0.0)
        vt = tl.load(vb + n[:, None].to(tl.int64) * svl + d[None, :], mask=valid[:, None] & dm[None, :], other=0.0)
        if APPEND:  # the new row from registers (the cache's may not be written yet)
            new = (n == idx)[:, None] & valid[:, None]
            kt = tl.where(new, kn[None, :], kt)
            vt = tl.where(new, vn[None, :], vt)
        sc = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)
        if MASK == 2:
            sc = sc + tl.where(valid, add, 0.0)
        sc = tl.where(valid, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # no key yet: every weight 0
        p = tl.exp(sc - m_safe)
        corr = tl.exp(m_i - m_safe)
        acc = acc * corr + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
        l_i = l_i * corr + tl.sum(p, axis=0)
        m_i = m_new
    row = part_ptr + (bh * splits + s) * (DP + 2)
    tl.store(row + d, acc)
    tl.store(row + DP, m_i)
    tl.store(row + DP + 1, l_i)
    # every thread's stores issued before the count (a release at GPU scope); the program
    # that counts last reads all chunks' (an acquire), from L2
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
    if ticket == splits - 1:
        sp = tl.arange(0, SP)
        live = sp < splits
        base = part_ptr + (bh * splits + sp) * (DP + 2)
        m = tl.load(base + DP, mask=live, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(base + DP + 1, mask=live, other=0.0, cache_modifier=".cg")
        big = tl.max(m, axis=0)
        big = tl.where(big == float("-inf"), 0.0, big)
        w = tl.exp(m - big)                                      # 0 for chunks with no key
        parts = tl.load(base[:, None] + d[None, :], mask=live[:, None], other=0.0, cache_modifier=".cg")
        num = tl.sum(w[:, None] * parts, axis=0)
        den = tl.sum(w * l, axis=0)
        out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
        tl.store(o_ptr + b * sob + h * soh + d, out.to(o_ptr.dtype.element_ty), mask=dm)
        tl.atomic_xchg(cnt_ptr + bh, 0, sem="relaxed", scope="gpu")   # ready for the next launch
        if APPEND == 2:  # advance the cache's length once every program has read it
            bhs = tl.num_programs(0)
            done = tl.atomic_add(cnt_ptr + bhs, 1, sem="acq_rel", scope="gpu")
            if done == bhs - 1:
                tl.store(idx_ptr, idx + 1)
                tl.atomic_xchg(cnt_ptr + bhs, 0, sem="relaxed", scope="gpu")


@triton.jit
def _rope(x_ptr, x, cos_ptr, sin_ptr, d, dm, D: tl.constexpr):
    """transformers' rotary embedding of one head's vector x (fp32, loaded from x_ptr + d):
    x cos + rotate_half(x) sin, rotate_half(x) = (-x[D/2:], x[:D/2]); rounded to fp16 / bf16
    as the tensor it replaces."""
    half = D // 2
    partner = tl.load(x_ptr + tl.where(d < half, d + half, d - half), mask=dm, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + d, mask=dm, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + d, mask=dm, other=0.0).to(tl.float32)
    y = x * c + tl.where(d < half, -partner, partner) * sn
    return y.to(x_ptr.dtype.element_ty).to(tl.float32)


def split_count(bh: int, length: int) -> int:
    """Chunks a (sequence, head) is cut into: one tile each where that stays within
    MAX_SPLITS chunks and MAX_PROGRAMS programs, so that a program's loads (mask, then keys
    and values) are one round trip each rather than a chain over tiles."""
    return max(1, min(-(-length // BLOCK_N), MAX_SPLITS, MAX_PROGRAMS // max(1, bh)))


def supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """One query token, 16-bit, head size up to 256, query heads a multiple of kv heads."""
    return (query.dim() == 4 and query.shape[2] == 1 and query.dtype in (torch.float16, torch.bfloat16)
            and key.dtype == query.dtype and query.shape[-1] <= 256 and key.shape[-1] == query.shape[-1]
            and query.shape[1] % key.shape[1] == 0)


def decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """softmax(q kᵀ scale + mask) v for one query token: query [B, H, 1, D], key and value
    [B, Hkv, L, D] (any strides with a unit last one), mask None, bool or additive,
    broadcastable to [B, H, 1, L]. Returns [B, 1, H, D] (transformers' attention output
    layout), contiguous, in query's dtype."""
    return _launch(query, key, value, mask, scale)


def decode_append(query: torch.Tensor, key_new: torch.Tensor, value_new: torch.Tensor, cos: torch.Tensor | None,
                  sin: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor, index: torch.Tensor,
                  mask: torch.Tensor | None, scale: float, advance: bool) -> torch.Tensor:
    """A decode step's cache write and attention in one launch: with cos and sin given, the
    rotary embedding of query and key_new first (transformers' x cos + rotate_half(x) sin,
    cos and sin [B, 1, 1, D]); then key_new and value_new [B, Hkv, 1, D] go into key and
    value [B, Hkv, L, D] at position index[0] (StaticCache.update's index_copy_), and the
    query attends over the cache as `decode` does. With `advance`, index (the cache's length
    counter) goes up by one after every program has read it. Returns [B, 1, H, D]."""
    B, Hkv, _, D = key.shape
    if key_new.shape != (B, Hkv, 1, D) or value_new.shape != (B, Hkv, 1, D):
        raise ValueError(f"decode_append: new key {tuple(key_new.shape)} / value {tuple(value_new.shape)} "
                         f"for a cache of {tuple(key.shape)}")
    if index.numel() != 1 or index.dtype != torch.int64:
        raise ValueError("decode_append: index must hold one int64 position")
    if (cos is None) != (sin is None) or (cos is not None and D % 2):
        raise ValueError("decode_append: the rotary embedding takes cos and sin, and an even head size")
    if key_new.stride(-1) != 1:
        key_new = key_new.contiguous()
    if value_new.stride(-1) != 1:
        value_new = value_new.contiguous()
    rope = ()
    if cos is not None:
        cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
        for t in (cos, sin):
            if t.shape[-1] != D or t.numel() not in (D, B * D):
                raise ValueError(f"decode_append: cos / sin of shape {tuple(t.shape)} for {B} rows of {D}")
        rope = (cos, sin, cos.stride(0) if cos.numel() > D else 0, sin.stride(0) if sin.numel() > D else 0)
    new = (key_new, value_new, index, key_new.stride(0), key_new.stride(1), value_new.stride(0), value_new.stride(1))
    return _launch(query, key, value, mask, scale, new, rope, 2 if advance else 1)


def _launch(query, key, value, mask, scale, new=None, rope=(), append=0):
    B, H, _, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        if append:
            raise ValueError("decode_append: the cache must have a unit last stride (it is written in place)")
        key, value = key.contiguous(), value.contiguous()
    DP = triton.next_power_of_2(D)
    splits = split_count(B * H, L)
    chunk = -(-L // splits)
    chunk = -(-chunk // BLOCK_N) * BLOCK_N
    splits = -(-L // chunk)
    if mask is None:
        kind, mptr, ms = 0, query, (0, 0, 0)
    else:
        if mask.dim() != 4 or mask.shape[2] != 1 or mask.shape[-1] != L:
            raise ValueError(f"decode attention: mask of shape {tuple(mask.shape)} for {L} keys")
        kind = 1 if mask.dtype == torch.bool else 2
        if kind == 1:
            mask = mask.view(torch.uint8)
        mb = mask.stride(0) if mask.shape[0] > 1 else 0
        mh = mask.stride(1) if mask.shape[1] > 1 else 0
        mptr, ms = mask, (mb, mh, mask.stride(3))
    if new is None:
        new = (query, query, query, 0, 0, 0, 0)
    cos, sin, scb, ssb = rope if rope else (query, query, 0, 0)
    part = torch.empty(B * H * splits * (DP + 2), dtype=torch.float32, device=query.device)
    out = torch.empty(B, 1, H, D, dtype=query.dtype, device=query.device)
    _decode_kernel[(B * H, splits)](
        query, key, value, mptr, part, _counters(query.device, B * H + 1), out, float(scale), L, H, H // Hkv,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), *ms, out.stride(0), out.stride(2),
        new[0], new[1], cos, sin, new[2], *new[3:], scb, ssb,
        CHUNK=chunk, BLOCK=BLOCK_N, D=D, DP=DP, MASK=kind, SP=triton.next_power_of_2(splits),
        APPEND=append, ROPE=bool(rope), num_warps=WARPS)
    return out


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n arrival counters (one a (sequence, head), and one for the launch where it
    advances a cache's length) for the device's current stream (decode launches on one stream
    run one after another; each leaves them at 0). Made once per
    device, stream and size, outside any CUDA-graph pool (kernels.lasting)."""
    size = max(MAX_PROGRAMS, triton.next_power_of_2(n))
    if device.type != "cuda":
        return _counters_on("cpu", 0, 0, size)
    dev = device.index if device.index is not None else torch.cuda.current_device()
    return _counters_on("cuda", dev, torch.cuda.current_stream(dev).cuda_stream, size)


@functools.cache
def _counters_on(kind: str, index: int, stream: int, size: int) -> torch.Tensor:
    from . import lasting
    dev = torch.device(kind, index) if kind == "cuda" else torch.device(kind)
    return lasting.make(lambda: torch.zeros(size, dtype=torch.int32, device=dev), dev)
