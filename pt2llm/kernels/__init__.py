"""Forward paths for packed linears. Only the reference path exists so far: unpack,
dequantize per block, gather the activations by the stored column order, matmul."""
from .reference import linear

__all__ = ["linear"]
