"""Codes <-> bytes. Trits: 5 to a byte in base 3 (3^5 = 243 <= 256), digit i of byte b is
the trit at position 5*b + i, stored as trit + 1 (format 1, along the last dimension).
Unsigned k-bit codes: a little-endian bit stream along the last dimension.

Format 2 (`pack_trit_rows`): five ROWS to a byte, so that every stored column, and so every
128-column block, starts on a byte: byte [g, k] holds the trits of rows 5g..5g+4 at column
k, as q = ceil(256 v / 243) with v = sum_i (trit_i + 1) 3^(4-i). Digit i then comes back
by multiplications alone, d_i = (3 * (q * 3^i mod 256)) >> 8, which a GPU does on two
bytes at once in the 16-bit halves of a 32-bit word (see kernels/triton_ternary.py).

Format 3 also stores a layer's column order and its online-transform signs in a saved
folder as bit streams (`pack_perm`, `pack_signs`); at run time they are plain integer
tensors again (`unpack_perm`, `unpack_signs`).
"""
from __future__ import annotations

import torch

TRITS_PER_BYTE = 5
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
_TRIT_LUT = (torch.arange(256)[:, None] // _POW3.long()[None, :] % 3 - 1).to(torch.int8)  # [256, 5]


def packed_trit_width(length: int) -> int:
    return -(-length // TRITS_PER_BYTE)


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """int tensor [..., L] with values in {-1, 0, 1} -> uint8 [..., ceil(L / 5)]."""
    L = t.shape[-1]
    pad = packed_trit_width(L) * TRITS_PER_BYTE - L
    d = (t.to(torch.int16) + 1)
    if pad:
        d = torch.nn.functional.pad(d, (0, pad), value=1)
    d = d.reshape(*t.shape[:-1], packed_trit_width(L), TRITS_PER_BYTE)
    return (d * _POW3.to(d.device)).sum(dim=-1).to(torch.uint8)


def unpack_trits(b: torch.Tensor, length: int) -> torch.Tensor:
    """uint8 [..., B] -> int8 [..., length] in {-1, 0, 1}."""
    lut = _TRIT_LUT.to(b.device)
    t = lut[b.long()].reshape(*b.shape[:-1], b.shape[-1] * TRITS_PER_BYTE)
    return t[..., :length]


def packed_bits_width(length: int, bits: int) -> int:
    return -(-length * bits // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """unsigned codes [..., L] in [0, 2^bits) -> uint8 [..., ceil(L * bits / 8)], a
    little-endian bit stream (`pack_uints`)."""
    return pack_uints(codes, bits)


def unpack_bits(b: torch.Tensor, length: int, bits: int) -> torch.Tensor:
    """uint8 [..., B] -> uint8 codes [..., length]."""
    return unpack_uints(b, length, bits).to(torch.uint8)


def _rows_lut() -> torch.Tensor:
    """[256, 5] int8: the five trits a format-2 byte holds (every byte value decodes)."""
    q = torch.arange(256, dtype=torch.int64)[:, None]
    p = 3 ** torch.arange(5, dtype=torch.int64)[None, :]
    return ((q * p % 256) * 3 // 256 - 1).to(torch.int8)


_ROWS_LUT = _rows_lut()


def pack_trit_rows(t: torch.Tensor) -> torch.Tensor:
    """int tensor [N, K] in {-1, 0, 1} -> uint8 [ceil(N / 5), K] (format 2; missing rows are 0)."""
    n, k = t.shape
    g = packed_trit_width(n)
    d = t.to(torch.int64) + 1
    if g * TRITS_PER_BYTE > n:
        d = torch.cat([d, d.new_ones(g * TRITS_PER_BYTE - n, k)])
    p = 3 ** torch.arange(4, -1, -1, device=d.device, dtype=torch.int64)
    v = (d.reshape(g, TRITS_PER_BYTE, k) * p[None, :, None]).sum(dim=1)
    return ((v * 256 + 242) // 243).to(torch.uint8)


def unpack_trit_rows(b: torch.Tensor, rows: int) -> torch.Tensor:
    """uint8 [G, K] (format 2) -> int8 [rows, K] in {-1, 0, 1}."""
    g, k = b.shape
    t = _ROWS_LUT.to(b.device)[b.long()]  # [G, K, 5]
    return t.permute(0, 2, 1).reshape(g * TRITS_PER_BYTE, k)[:rows]


def _work_dtype(bits: int) -> torch.dtype:
    """The narrowest signed integer type that holds values of `bits` bits (int16 up to 15)."""
    return torch.int16 if bits <= 15 else torch.int64


def pack_uints(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers [..., L] below 2^bits (any bits up to 62) -> uint8
    [..., ceil(L * bits / 8)], a little-endian bit stream (codes and column indices alike),
    computed in int16 up to 15 bits, else int64."""
    if not 1 <= bits <= 62:
        raise ValueError(f"bits must be in 1..62, got {bits}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >> bits):
        raise ValueError(f"values outside [0, 2^{bits}) cannot be packed at {bits} bits each")
    v = values.to(_work_dtype(bits))
    lead, n = v.shape[:-1], v.shape[-1]
    nbytes = packed_bits_width(n, bits)
    shifts = torch.arange(bits, device=v.device, dtype=v.dtype)
    stream = ((v.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(*lead, n * bits)
    if nbytes * 8 > n * bits:
        stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    place = 1 << torch.arange(8, device=v.device, dtype=torch.int16)
    return (stream.reshape(*lead, nbytes, 8).to(torch.int16) * place).sum(dim=-1).to(torch.uint8)


def unpack_uints(b: torch.Tensor, length: int, bits: int) -> torch.Tensor:
    """uint8 [..., B] (from `pack_uints`) -> int64 [..., length] (uint8 for `unpack_bits`)."""
    if b.shape[-1] < packed_bits_width(length, bits):
        raise ValueError(f"{b.shape[-1]} bytes cannot hold {length} values of {bits} bits")
    lead, dt = b.shape[:-1], _work_dtype(bits)
    shifts = torch.arange(8, device=b.device, dtype=torch.int16)
    stream = ((b.to(torch.int16).unsqueeze(-1) >> shifts) & 1).reshape(*lead, b.shape[-1] * 8)
    stream = stream[..., : length * bits].reshape(*lead, length, bits).to(dt)
    return (stream << torch.arange(bits, device=b.device, dtype=dt)).sum(dim=-1).to(torch.int64)


def index_bits(n: int) -> int:
    """Bits per entry of a stored column order of n entries (values 0..n-1):
    max(1, ceil(log2 n))."""
    return max(1, (int(n) - 1).bit_length())


def packed_perm_width(n: int) -> int:
    """Bytes of a packed column order of n entries (format 3)."""
    return packed_bits_width(n, index_bits(n))


def pack_perm(perm: torch.Tensor) -> torch.Tensor:
    """A column order (a permutation of 0..n-1, any integer dtype) [n] -> uint8
    [ceil(n * index_bits(n) / 8)], entry j in bits j*w .. j*w+w-1 of the stream."""
    n = perm.shape[-1]
    return pack_uints(perm, index_bits(n))


def unpack_perm(b: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 bit stream (from `pack_perm`) -> int64 [n]; refuses one that is not a
    permutation of 0..n-1 (a damaged or mismatched tensor)."""
    if b.dim() != 1 or b.shape[0] != packed_perm_width(n):
        raise ValueError(f"a packed column order of {n} entries has {packed_perm_width(n)} bytes, "
                         f"got shape {tuple(b.shape)}")
    p = unpack_uints(b, n, index_bits(n))
    if int(p.max()) >= n or not bool((torch.bincount(p, minlength=n) == 1).all()):
        raise ValueError(f"the packed column order is not a permutation of 0..{n - 1}")
    return p


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """±1 signs [n] -> uint8 [ceil(n / 8)], bit i set where signs[i] is negative."""
    if signs.numel() and not bool((signs.abs() == 1).all()):
        raise ValueError("signs must all be +1 or -1")
    return pack_uints(signs < 0, 1)


def unpack_signs(b: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n / 8)] (from `pack_signs`) -> int8 [n] of ±1."""
    if b.dim() != 1 or b.shape[0] != packed_bits_width(n, 1):
        raise ValueError(f"{n} packed signs take {packed_bits_width(n, 1)} bytes, got shape {tuple(b.shape)}")
    return (1 - 2 * unpack_uints(b, n, 1)).to(torch.int8)
