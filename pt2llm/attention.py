"""Decode attention for transformers models on CUDA: an attention function ("pt2llm") that
takes one-token steps through the split-key Triton kernel (kernels/triton_attention.py) and
hands every other call (prefill, CPU, dropout, soft-capping, attention sinks) to
transformers' own SDPA function, with SDPA's masks.

    from pt2llm import attention
    attention.use(model)        # what speed.Decoder (`pt2llm bench`) does

It changes no weight and no result beyond float rounding (tests/test_attention.py holds it to
SDPA's math in float64). Under torch.compile the kernel is one opaque op
(`torch.ops.pt2llm.decode_attention`, kernels/ops.py).
"""
from __future__ import annotations

import math

import torch

NAME = "pt2llm"
_REGISTERED = False


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(*args, **kwargs)


def takes(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    """Whether the kernel runs this call (else SDPA)."""
    if not query.is_cuda or dropout:
        return False
    if any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias", "cache")):
        return False
    if kwargs.get("output_attentions"):
        return False
    from .kernels import _have_triton
    if not _have_triton():
        return False
    from .kernels.triton_attention import supported
    return supported(query, key)


def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function interface: query [B, H, q, D], key and value
    [B, Hkv, L, D]; returns ([B, q, H, D], None)."""
    if not takes(query, key, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    mask = attention_mask
    if mask is not None and mask.shape[-1] != key.shape[2]:
        mask = mask[..., : key.shape[2]]
    from .kernels import ops  # noqa: F401  (registers the op)
    return torch.ops.pt2llm.decode_attention(query, key, value, mask, float(scale)), None


def register() -> None:
    """Make "pt2llm" an attention implementation (and SDPA's masks its masks) in transformers."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    except ImportError:  # older transformers: masks are not keyed by implementation
        pass
    _REGISTERED = True


def _set(model, name: str) -> None:
    if model.config._attn_implementation == name:
        return
    if hasattr(model, "set_attn_implementation"):  # transformers that validates and reaches submodels
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def use(model) -> str:
    """Switch `model` (and its submodels) to the "pt2llm" attention function; returns the
    implementation it had, for `restore`."""
    register()
    before = model.config._attn_implementation
    _set(model, NAME)
    return before


def restore(model, before: str) -> None:
    """Undo `use`."""
    _set(model, before)
