"""TernaryLinear: a linear layer whose weight is stored packed, block by block.

Buffers (all in the state dict, all safetensors-friendly), at run time:
  packed  uint8 [ceil(out/5), in]: 5 rows' trits a byte (format 2, pack.pack_trit_rows);
          [out, ceil(in/5)] in format 1 until `upgrade_packing`; [out, ceil(in*bits/8)] for
          the uint-k baseline
  alpha   fp16  [out, ceil(in/block)] per-row, per-block scale
  mu      fp16  [out, ceil(in/block)] per-row, per-block offset; weight = alpha*code + mu
  perm    int16 [in] (int32 when in >= 32768): stored column j is input column perm[j]
  bias    fp16 [out], the original layer's bias, when it had one
  input_transform.signs  int8 [in] of ±1, only with an online input transform (rotated
          models, `rotate.online.OnlineHadamard`): forward computes x Q, dequantize() gives W Q
Blocks are consecutive runs of `block_size` stored columns; the last may be shorter.

In a saved folder (format 3; `checkpoint._unique_state` converts) `perm` is a uint8 bit
stream of w = max(1, ceil(log2 in)) bits an entry (pack.pack_perm: ceil(in*w/8) bytes) and
`input_transform.signs` one bit an entry (pack.pack_signs: ceil(in/8) bytes); formats 1 and
2 stored them as above. A module built with `perm_packed=True` holds the stored form until
`upgrade_packing` (checkpoint.upgrade_linears, after loading) unpacks it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import kernels, pack
from .kernels import ops


def perm_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features < 32768 else torch.int32


class TernaryLinear(nn.Module):
    """bits=None: ternary codes {-1, 0, 1}. bits=k: unsigned k-bit codes (GPTQ baseline)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 block_size: int = 128, bits: int | None = None, device=None, packing: int = 2,
                 perm_packed: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.bits = block_size, bits
        nb = -(-in_features // block_size)
        self.packing = packing if bits is None else None
        if bits is not None:
            shape = (out_features, pack.packed_bits_width(in_features, bits))
        elif packing == 1:  # a format-1 checkpoint's shape, until upgrade_packing()
            shape = (out_features, pack.packed_trit_width(in_features))
        else:
            shape = (pack.packed_trit_width(out_features), in_features)
        self.register_buffer("packed", torch.zeros(*shape, dtype=torch.uint8, device=device))
        self.register_buffer("alpha", torch.zeros(out_features, nb, dtype=torch.float16, device=device))
        self.register_buffer("mu", torch.zeros(out_features, nb, dtype=torch.float16, device=device))
        if perm_packed:  # a format-3 checkpoint's bit stream, until upgrade_packing()
            perm = torch.zeros(pack.packed_perm_width(in_features), dtype=torch.uint8, device=device)
        else:
            perm = torch.arange(in_features, device=device).to(perm_dtype(in_features))
        self.register_buffer("perm", perm)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None
        self.input_transform = None  # optional module applied to x first (rotate.online; its state is saved)
        self.siblings = None  # a Siblings group while `grouped` holds (not state)

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None = None, bits: int | None = None):
        """Build from a `ternary.QuantResult` (codes in stored order)."""
        n, m = result.codes.shape
        mod = cls(m, n, bias is not None, block_size=result.block_size, bits=bits, device="cpu")
        codes = result.codes.cpu()
        mod.packed.copy_(pack.pack_trit_rows(codes) if bits is None else pack.pack_bits(codes.to(torch.uint8), bits))
        mod.alpha.copy_(result.scale.cpu().to(torch.float16))
        mod.mu.copy_(result.offset.cpu().to(torch.float16))
        mod.perm.copy_(result.perm.cpu().to(mod.perm.dtype))
        if bias is not None:
            mod.bias.copy_(bias.detach().cpu())
        return mod

    def codes(self) -> torch.Tensor:
        """Integer codes [out, in] in stored column order."""
        if self.bits is None and self.packing == 1:
            return pack.unpack_trits(self.packed, self.in_features)
        if self.bits is None:
            return pack.unpack_trit_rows(self.packed, self.out_features)
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

    @property
    def perm_packed(self) -> bool:
        """Whether `perm` still holds a saved folder's bit stream (format 3, before upgrade_packing)."""
        return self.perm.dtype == torch.uint8

    def upgrade_packing(self) -> None:
        """Bring what an older or saved layout loaded to the run-time one: repack format-1
        codes (5 trits a byte along a row) into format 2 (5 rows a byte), and unpack a
        format-3 column order (bit stream) into int16/int32 indices."""
        if self.packing == 1:
            codes = pack.unpack_trits(self.packed, self.in_features)
            self.packed = pack.pack_trit_rows(codes).to(self.packed.device)
            self.packing = 2
        if self.perm_packed:
            self.perm = pack.unpack_perm(self.perm, self.in_features).to(self.perm.device, perm_dtype(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm_packed:
            raise RuntimeError("TernaryLinear.perm still holds the saved bit stream: call upgrade_packing() "
                               "(checkpoint.upgrade_linears) after loading the state")
        if self.input_transform is not None:  # online Hadamard (rotated models): x Q, weight stored as W Q
            x = self.input_transform(x)
        if x.is_cuda and self.packing == 2 and kernels.triton_supported(x, self.block_size):
            if torch.compiler.is_compiling():  # one opaque op for torch.compile (kernels/ops.py)
                return ops.ternary_linear(x, *self.layer(), self.block_size)
            if self.siblings is not None and x.numel() <= 16 * x.shape[-1]:  # decode rows (prefill: alone)
                return self.siblings.output(self, x)
            from .kernels import triton_ternary
            return triton_ternary.linear(x, *self.layer(), self.block_size,
                                         inv_perm=lambda: self._inverse_perm(triton_ternary.inverse_perm))
        return kernels.linear(x, self.weight_permuted(x.dtype), self.perm, self.bias)

    def layer(self) -> tuple:
        """(packed, alpha, mu, perm, bias, out_features): what the kernels' linear takes."""
        return self.packed, self.alpha, self.mu, self.perm, self.bias, self.out_features

    def _inverse_perm(self, invert) -> torch.Tensor:
        """perm's inverse (for the prefill kernel), computed once per perm tensor and device;
        a plain attribute, not state."""
        key = (self.perm.data_ptr(), self.perm._version, self.perm.device)
        if getattr(self, "_inv_perm_key", None) != key:
            self._inv_perm, self._inv_perm_key = invert(self.perm), key
        return self._inv_perm

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight in a saved folder (format 3): codes, alpha, mu and
        the packed column order (not the bias, nor an online transform's signs)."""
        return (sum(t.numel() * t.element_size() for t in (self.packed, self.alpha, self.mu))
                + pack.packed_perm_width(self.in_features))

    def extra_repr(self) -> str:
        kind = "ternary" if self.bits is None else f"uint{self.bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, codes={kind}")


SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # transformers' names


class Siblings:
    """TernaryLinears that read the same input (a decoder layer's q/k/v, its gate/up), while
    `grouped` holds. The first of them called with a CUDA tensor x of up to 16 rows (decode;
    longer inputs run each layer alone) computes all of their outputs
    (triton_ternary.linear_group: one launch of the CUDA kernel where it takes them) and keeps
    the others' until each is called with that same tensor, unchanged since (the same object,
    held here, and the same version); any other call computes afresh. Outputs equal each
    layer's own up to the split-K sum's rounding (the group's split count may differ). For
    one thread at a time (speed.Decoder's step)."""

    def __init__(self, members: list[TernaryLinear]):
        self.members = members
        self._x, self._version, self._kept = None, None, {}

    def output(self, member: TernaryLinear, x: torch.Tensor) -> torch.Tensor:
        from .kernels import triton_ternary
        if x is self._x and x._version == self._version and member in self._kept:
            y = self._kept.pop(member)
            if not self._kept:
                self._x = None
            return y
        ys = triton_ternary.linear_group(x, [m.layer() for m in self.members], member.block_size)
        self._x, self._version = x, x._version
        self._kept = {m: y for m, y in zip(self.members, ys) if m is not member}
        return ys[self.members.index(member)]


def sibling_groups(model: nn.Module) -> list[list[TernaryLinear]]:
    """The groups of TernaryLinears under one parent that transformers' models call on one
    input (SIBLING_NAMES), where they all share the input width, block size and ternary
    format-2 codes and have no online transform."""
    groups = []
    for parent in model.modules():
        for names in SIBLING_NAMES:
            mods = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, TernaryLinear) for m in mods):
                continue
            if (len({(m.in_features, m.block_size) for m in mods}) == 1
                    and all(m.bits is None and m.packing == 2 and m.input_transform is None for m in mods)):
                groups.append(mods)
    return groups


@contextlib.contextmanager
def grouped(model: nn.Module):
    """Within it, the model's sibling TernaryLinears (sibling_groups) compute their outputs
    together on CUDA outside torch.compile (Siblings): fewer launches a decoder layer, which
    speed.Decoder's uncompiled step uses (under torch.compile, ops.backend groups them)."""
    groups = [Siblings(g) for g in sibling_groups(model)]
    for g in groups:
        for m in g.members:
            m.siblings = g
    try:
        yield groups
    finally:
        for g in groups:
            for m in g.members:
                m.siblings = None


# transformers' RMSNorm classes whose forward is weight * (h / sqrt(mean(h^2) + eps)) with
# eps in `variance_epsilon` (Llama's; Qwen2's and Mistral's are copies of it)
RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")


@contextlib.contextmanager
def patched_forwards(mods, make):
    """Within it each module's forward is make(module) (an instance attribute); on exit the
    class's forward again."""
    for m in mods:
        m.forward = make(m)
    try:
        yield mods
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


@contextlib.contextmanager
def fused_norms(model: nn.Module):
    """Within it, the model's RMSNorm modules (RMS_NORMS) run as one Triton kernel on CUDA
    outside torch.compile (kernels/triton_norm.py) instead of transformers' eight eager
    kernels: speed.Decoder's uncompiled step. Elsewhere (CPU, other dtypes, under
    torch.compile) they run their own forward. Yields the modules patched."""
    mods = [m for m in model.modules() if type(m).__name__ in RMS_NORMS
            and isinstance(getattr(m, "weight", None), torch.Tensor) and hasattr(m, "variance_epsilon")]

    def fused(mod):
        own = type(mod).forward.__get__(mod)

        def forward(h, *args, **kwargs):
            if not (args or kwargs) and h.is_cuda and not torch.compiler.is_compiling() and kernels._have_triton():
                from .kernels import triton_norm
                if triton_norm.supported(h, mod.weight):
                    return triton_norm.rms_norm(h, mod.weight, mod.variance_epsilon)
            return own(h, *args, **kwargs)
        return forward

    with patched_forwards(mods, fused):
        yield mods
