"""Decode attention for transformers models on CUDA: an attention function ("pt2llm") that
takes one-token steps through the split-key Triton kernel (kernels/triton_attention.py) and
hands every other call (prefill, CPU, dropout, soft-capping, attention sinks) to
transformers' own SDPA function, with SDPA's masks.

    from pt2llm import attention
    attention.use(model)        # what speed.Decoder (`pt2llm bench`) does

It changes no weight and no result beyond float rounding (tests/test_attention.py holds it to
SDPA's math in float64). Under torch.compile the kernel is one opaque op
(`torch.ops.pt2llm.decode_attention`, kernels/ops.py), and the compile backend folds the
rotary embedding and the static cache's write into it (ops.fuse_cache_write). `fused_decode`
does the same for the uncompiled step (speed.Decoder without compile): Llama's, Qwen2's and
Mistral's attention modules hand a one-token step on a static cache to one launch
(triton_attention.decode_append) instead of transformers' rotary, cache-update and attention
kernels.
"""
from __future__ import annotations

import contextlib
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


ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
_REFUSED = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions")


def _runs_here(hidden: torch.Tensor) -> bool:
    """Whether the kernel can run on hidden's device (CUDA with Triton)."""
    from .kernels import _have_triton
    return hidden.is_cuda and _have_triton()


def _static_layer(mod, cache, hidden: torch.Tensor):
    """The StaticLayer that this one-token step would update, where decode_append can do the
    step exactly as transformers would; else None."""
    if cache is None or getattr(cache, "offloading", False) or not hasattr(cache, "layers"):
        return None
    if mod.layer_idx is None or mod.layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[mod.layer_idx]
    if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", False):
        return None
    keys, values, length = layer.keys, layer.values, getattr(layer, "cumulative_length", None)
    if not (isinstance(length, torch.Tensor) and length.numel() == 1 and length.dtype == torch.int64
            and length.device == keys.device):
        return None
    B, D = hidden.shape[0], mod.head_dim
    if not (keys.dim() == 4 and keys.shape[0] == B and keys.shape[-1] == D and values.shape == keys.shape
            and keys.dtype == hidden.dtype and keys.device == hidden.device
            and keys.stride(-1) == 1 and values.stride(-1) == 1):
        return None
    return layer


def _decode_step(mod, hidden, position_embeddings, attention_mask, cache, kwargs):
    """transformers' attention forward for one token on a static cache, as one decode_append
    launch, or None where that would not be the same computation."""
    if (hidden.dim() != 3 or hidden.shape[1] != 1 or hidden.dtype not in (torch.float16, torch.bfloat16)
            or mod.training or mod.config._attn_implementation != NAME or torch.compiler.is_compiling()
            or getattr(mod, "sliding_window", None) is not None or position_embeddings is None
            or any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _REFUSED)
            or not _runs_here(hidden)):
        return None
    cos, sin = position_embeddings
    D = mod.head_dim
    layer = _static_layer(mod, cache, hidden)
    if layer is None or cos.shape[-1] != D or sin.shape != cos.shape or cos.dtype != hidden.dtype or D % 2:
        return None
    B = hidden.shape[0]
    q = mod.q_proj(hidden).view(B, 1, -1, D).transpose(1, 2)
    k = mod.k_proj(hidden).view(B, 1, -1, D).transpose(1, 2)
    v = mod.v_proj(hidden).view(B, 1, -1, D).transpose(1, 2)
    L = layer.keys.shape[2]
    mask = attention_mask
    if mask is not None and mask.shape[-1] != L:
        mask = mask[..., :L]
    from .kernels.triton_attention import decode_append, supported
    if not supported(q, layer.keys) or k.shape[1] != layer.keys.shape[1]:
        return None   # (heads the kernel does not take: the module's forward projects again)
    scale = mod.scaling if mod.scaling is not None else 1.0 / math.sqrt(D)
    out = decode_append(q, k, v, cos.unsqueeze(1), sin.unsqueeze(1), layer.keys, layer.values,
                        layer.cumulative_length, mask, float(scale), True)
    return mod.o_proj(out.reshape(B, 1, -1)), None


@contextlib.contextmanager
def fused_decode(model):
    """Within it, the model's attention modules (ATTENTIONS) take a one-token step on a static
    cache (speed.Decoder's uncompiled step, with the "pt2llm" attention function) as one
    decode_append launch: the rotary embedding of q and k, the cache write and its length
    counter, and the attention, instead of transformers' dozen or so kernels for them. Any
    other call (prefill, CPU, sliding windows, other caches, under torch.compile) runs the
    module's own forward. Yields the modules patched."""
    mods = [m for m in model.modules() if type(m).__name__ in ATTENTIONS
            and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx", "config"))]

    def fused(mod):
        own = type(mod).forward.__get__(mod)

        def forward(*args, **kwargs):
            if len(args) == 1 and "hidden_states" not in kwargs:
                hidden, rest = args[0], kwargs
            elif not args and "hidden_states" in kwargs:
                rest = dict(kwargs)
                hidden = rest.pop("hidden_states")
            else:
                return own(*args, **kwargs)
            rest = dict(rest)
            pe, mask = rest.pop("position_embeddings", None), rest.pop("attention_mask", None)
            cache = next((rest.pop(n) for n in ("cache", "past_key_values", "past_key_value") if n in rest), None)
            out = _decode_step(mod, hidden, pe, mask, cache, rest)
            return out if out is not None else own(*args, **kwargs)
        return forward

    from .nn import patched_forwards
    with patched_forwards(mods, fused):
        yield mods
