"""Codes <-> bytes. Trits: 5 to a byte in base 3 (3^5 = 243 <= 256), digit i of byte b is
the trit at position 5*b + i, stored as trit + 1. Unsigned k-bit codes: a little-endian
bit stream. Both pack along the last dimension, any length, each row on its own.
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
    """unsigned codes [..., L] in [0, 2^bits) -> uint8 [..., ceil(L * bits / 8)]."""
    L = codes.shape[-1]
    c = codes.to(torch.int16)
    shifts = torch.arange(bits, device=c.device, dtype=torch.int16)
    stream = ((c[..., None] >> shifts) & 1).reshape(*c.shape[:-1], L * bits)
    pad = packed_bits_width(L, bits) * 8 - L * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(*c.shape[:-1], packed_bits_width(L, bits), 8)
    weights = (1 << torch.arange(8, device=c.device, dtype=torch.int16))
    return (stream * weights).sum(dim=-1).to(torch.uint8)


def unpack_bits(b: torch.Tensor, length: int, bits: int) -> torch.Tensor:
    """uint8 [..., B] -> uint8 codes [..., length]."""
    shifts = torch.arange(8, device=b.device, dtype=torch.int16)
    stream = ((b.to(torch.int16)[..., None] >> shifts) & 1).reshape(*b.shape[:-1], b.shape[-1] * 8)
    stream = stream[..., : length * bits].reshape(*b.shape[:-1], length, bits)
    weights = (1 << torch.arange(bits, device=b.device, dtype=torch.int16))
    return (stream * weights).sum(dim=-1).to(torch.uint8)
