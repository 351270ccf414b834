"""Other projects' quantizers, applied to the same decoder linears, for comparison.

Each function quantizes every decoder linear's weight with the peer's own code and puts
the peer's own dequantization back into the float model (fake quantization: the numbers
a user of that format would get; the model stays dense). It returns the bits per weight
of the peer's storage, counted from what its quantizer actually produced.

- `hqq`: HQQ (PyPI `hqq`), data-free half-quadratic optimisation, asymmetric uint-k per
  group along each row, fp16 scale and zero per group (no meta quantization).
- `gguf_ternary`: llama.cpp's TQ1_0 (1.6875 bits) and TQ2_0 (2.0625 bits) through the
  `gguf` package's reference quantize/dequantize. Both need rows that are a multiple of
  256 weights; a shorter tail is zero-padded to 256 (zeros leave the block's absmax scale
  unchanged and stay zero), and the padding's bytes count in the bits per weight.
"""
from __future__ import annotations

import numpy as np
import torch

from .model import driver

GGUF_KINDS = ("TQ1_0", "TQ2_0")
GGUF_BLOCK = 256


class PeerError(ValueError):
    pass


def decoder_linears(model):
    """(name, module) of every nn.Linear inside the decoder layers."""
    _, layers, name = driver.find_decoder_layers(model)
    for i, layer in enumerate(layers):
        for n, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                yield f"{name}.{i}.{n}", m


@torch.no_grad()
def hqq(model, bits: int = 2, group_size: int = 64, device="cpu", progress: bool = True) -> float:
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as e:
        raise PeerError("the HQQ baseline needs the hqq package: pip install hqq") from e
    from tqdm.auto import tqdm

    stored = weights = 0
    for _, lin in tqdm(list(decoder_linears(model)), desc=f"hqq {bits}-bit g{group_size}", disable=not progress):
        w = lin.weight.data
        if w.shape[1] % group_size:
            raise PeerError(f"HQQ: in_features {w.shape[1]} is not a multiple of --group-size {group_size}")
        wq, meta = Quantizer.quantize(w.to(device=device, dtype=torch.float16), nbits=bits, group_size=group_size,
                                      optimize=True, axis=1, device=str(device), compute_dtype=torch.float16)
        deq = Quantizer.dequantize(wq, meta).reshape(w.shape)
        lin.weight.data = deq.to(device=w.device, dtype=w.dtype)
        stored += wq.numel() * wq.element_size() * 8 + (meta["scale"].numel() + meta["zero"].numel()) * 16
        weights += w.numel()
    return stored / weights


def gguf_roundtrip(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """Quantize rows of `w` [out, in] to a llama.cpp ternary type and back.
    Returns (dequantized weight, bytes stored)."""
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError as e:
        raise PeerError("the TQ1_0/TQ2_0 baselines need the gguf package: pip install gguf") from e
    if kind not in GGUF_KINDS:
        raise PeerError(f"{kind}: expected one of {', '.join(GGUF_KINDS)}")
    qtype = getattr(GGMLQuantizationType, kind)
    out_f, in_f = w.shape
    padded = -(-in_f // GGUF_BLOCK) * GGUF_BLOCK
    x = np.zeros((out_f, padded), dtype=np.float32)
    x[:, :in_f] = w.detach().float().cpu().numpy()
    q = quants.quantize(x, qtype)
    deq = quants.dequantize(q, qtype)[:, :in_f]
    return torch.from_numpy(np.ascontiguousarray(deq)), int(q.nbytes)


@torch.no_grad()
def gguf_ternary(model, kind: str, progress: bool = True) -> float:
    from tqdm.auto import tqdm

    stored = weights = 0
    for _, lin in tqdm(list(decoder_linears(model)), desc=kind, disable=not progress):
        deq, nbytes = gguf_roundtrip(lin.weight.data, kind)
        lin.weight.data = deq.to(device=lin.weight.device, dtype=lin.weight.dtype)
        stored += nbytes * 8
        weights += lin.weight.numel()
    return stored / weights
