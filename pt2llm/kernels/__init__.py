"""Forward paths for packed linears: the reference path (unpack, dequantize per block,
gather the activations by the stored column order, matmul), correct on any device, and the
Triton kernels (`triton_ternary`) that TernaryLinear uses on CUDA, and the Triton kernel of
the online Hadamard transform (`triton_hadamard`) that rotated models run on CUDA."""
from __future__ import annotations

from .reference import linear

__all__ = ["linear", "triton_supported", "hadamard_supported"]


_TRITON: bool | None = None  # whether triton imports, once known (a plain global, not a
# functools.cache: torch.compile traces this check, and dynamo warns on cache wrappers)


def _have_triton() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton_ternary  # noqa: F401
            _TRITON = True
        except ImportError:
            _TRITON = False
    return _TRITON


def triton_supported(x, block_size: int) -> bool:
    """Whether the Triton kernels take this input (else the reference path runs)."""
    if not _have_triton():
        return False
    from .triton_ternary import supported
    return supported(x, block_size)


def hadamard_supported(x) -> bool:
    """Whether the Triton online-Hadamard kernel (`triton_hadamard`) takes this input: CUDA,
    16-bit, a width it splits (else rotate.hadamard.transform, the torch path, runs)."""
    if not (x.is_cuda and _have_triton()):
        return False
    from .triton_hadamard import supported
    return supported(x)
