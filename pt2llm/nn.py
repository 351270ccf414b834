"""TernaryLinear: a linear layer whose weight is stored packed, block by block.

Buffers (all in the state dict, all safetensors-friendly):
  packed  uint8 [out, ceil(in/5)] trits (or [out, ceil(in*bits/8)] for the uint-k baseline)
  alpha   fp16  [out, ceil(in/block)] per-row, per-block scale
  mu      fp16  [out, ceil(in/block)] per-row, per-block offset; weight = alpha*code + mu
  perm    int16 [in] (int32 when in >= 32768): stored column j is input column perm[j]
  bias    fp16 [out], the original layer's bias, when it had one
  input_transform.signs  int8 [in], only with an online input transform (rotated models,
          `rotate.online.OnlineHadamard`): forward computes x Q, dequantize() gives W Q
Blocks are consecutive runs of `block_size` stored columns; the last may be shorter.
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernels, pack


def perm_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features < 32768 else torch.int32


class TernaryLinear(nn.Module):
    """bits=None: ternary codes {-1, 0, 1}. bits=k: unsigned k-bit codes (GPTQ baseline)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 block_size: int = 128, bits: int | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.bits = block_size, bits
        nb = -(-in_features // block_size)
        width = pack.packed_trit_width(in_features) if bits is None else pack.packed_bits_width(in_features, bits)
        self.register_buffer("packed", torch.zeros(out_features, width, dtype=torch.uint8, device=device))
        self.register_buffer("alpha", torch.zeros(out_features, nb, dtype=torch.float16, device=device))
        self.register_buffer("mu", torch.zeros(out_features, nb, dtype=torch.float16, device=device))
        self.register_buffer("perm", torch.arange(in_features, device=device).to(perm_dtype(in_features)))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None
        self.input_transform = None  # optional module applied to x first (rotate.online; its state is saved)

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None = None, bits: int | None = None):
        """Build from a `ternary.QuantResult` (codes in stored order)."""
        n, m = result.codes.shape
        mod = cls(m, n, bias is not None, block_size=result.block_size, bits=bits, device="cpu")
        codes = result.codes.cpu()
        mod.packed.copy_(pack.pack_trits(codes) if bits is None else pack.pack_bits(codes.to(torch.uint8), bits))
        mod.alpha.copy_(result.scale.cpu().to(torch.float16))
        mod.mu.copy_(result.offset.cpu().to(torch.float16))
        mod.perm.copy_(result.perm.cpu().to(mod.perm.dtype))
        if bias is not None:
            mod.bias.copy_(bias.detach().cpu())
        return mod

    def codes(self) -> torch.Tensor:
        """Integer codes [out, in] in stored column order."""
        if self.bits is None:
            return pack.unpack_trits(self.packed, self.in_features)
        return pack.unpack_bits(self.packed, self.in_features, self.bits)

    def weight_permuted(self, dtype=torch.float32) -> torch.Tensor:
        """alpha * code + mu, [out, in], columns in stored order."""
        a = self.alpha.to(dtype).repeat_interleave(self.block_size, dim=1)[:, : self.in_features]
        m = self.mu.to(dtype).repeat_interleave(self.block_size, dim=1)[:, : self.in_features]
        return a * self.codes().to(dtype) + m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight [out, in] in the ORIGINAL column order."""
        wp = self.weight_permuted(dtype)
        w = torch.empty_like(wp)
        w[:, self.perm.long()] = wp
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:  # online Hadamard (rotated models): x Q, weight stored as W Q
            x = self.input_transform(x)
        return kernels.linear(x, self.weight_permuted(x.dtype), self.perm, self.bias)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight: codes, alpha, mu and column order (not the bias)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.alpha, self.mu, self.perm))

    def extra_repr(self) -> str:
        kind = "ternary" if self.bits is None else f"uint{self.bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, codes={kind}")
