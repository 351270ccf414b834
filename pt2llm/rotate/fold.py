"""QuaRot-style rotation of a float Llama / Qwen2 model: computationally invariant (the
rotated float model computes the same function), so quantization then sees weights and
activations made incoherent by a random Hadamard-based orthogonal matrix.

With R = diag(s) K_hidden (`hadamard`), per decoder layer:
  - RMSNorm weights are folded into the linears that read them (input_layernorm into q/k/v,
    post_attention_layernorm into gate/up, the final norm into lm_head) and set to 1; an
    RMSNorm without weight commutes with an orthogonal R (it only divides by the norm);
  - the residual stream is rotated: embeddings E R, every linear that reads it W R (q, k, v,
    gate, up, lm_head), every linear that writes it Rᵀ W and its bias b R (o_proj, down_proj);
    a tied lm_head is untied first (it no longer equals the embeddings);
  - the value path is rotated per head with a random Hadamard of head_dim, folded offline:
    v_proj's output rows (and bias) of each kv head by Qᵀ, o_proj's input columns of each
    attention head by Q (attention mixes tokens, not features, so it commutes);
  - o_proj's and down_proj's inputs get an online random Hadamard of their whole width
    (`online.OnlineHadamard`): the weight W P offline, the activation x P at run time. For
    o_proj this mixes the heads, which the per-head Q cannot (QuaRot's H_heads ⊗ H_head):
    heads differ in scale by 6x to 115x, and on Qwen2.5-Coder-0.5B the full transform cut
    o_proj's calibration error (GPTQ objective, Hessian order, refine 4) by 14-31 % over the
    per-head one alone (docs/results/rotation-oproj/).
The signs come from one CPU generator seeded with `seed`, drawn in a fixed order (residual,
then per layer: value heads, down_proj; then per layer: o_proj, appended when o_proj's
transform was added so the earlier signs stay what they were), so every layer's transforms
are known up front and a layer can be rotated when it is loaded (streamed models). The math
is done in float64 on the tensors' device and written back in their dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import hadamard, online

MODEL_TYPES = ("llama", "qwen2")
ONLINE = ("self_attn.o_proj", "mlp.down_proj")  # per layer, the linears with an online input transform
_ROW_CHUNK = 8192


class RotationError(ValueError):
    """The model cannot be rotated (message says why)."""


# ---- pure tensor functions -------------------------------------------------------------

def rotate_input(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """W Q: the weight of a linear whose input is rotated by Q = diag(signs) K (x -> x Q)."""
    return hadamard.transform(w, signs)


def rotate_output(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Qᵀ W: the weight of a linear whose output is rotated by Q (its bias: b Q)."""
    return hadamard.transform(w.t(), signs).t()


def rotate_heads_output(w: torch.Tensor, signs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """blockdiag(Qᵀ) W for W [heads * head_dim, in]: each head's output rows rotated by Q."""
    heads = w.shape[0] // head_dim
    x = w.reshape(heads, head_dim, -1).transpose(1, 2)
    return hadamard.transform(x, signs).transpose(1, 2).reshape(w.shape)


def rotate_heads_input(w: torch.Tensor, signs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """W blockdiag(Q) for W [out, heads * head_dim]: each head's input columns rotated by Q."""
    return hadamard.transform(w.reshape(w.shape[0], -1, head_dim), signs).reshape(w.shape)


def fold_scale(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W diag(g): a norm's elementwise weight g moved into the linear that reads it."""
    return w * g[None, :]


# ---- the model ---------------------------------------------------------------------------

@dataclass
class Plan:
    """All random signs of one rotation, drawn up front from `seed`."""
    seed: int
    residual: torch.Tensor            # [hidden] int8
    heads: list[torch.Tensor]         # per layer, [head_dim] int8
    down: list[torch.Tensor]          # per layer, [intermediate] int8
    attn: list[torch.Tensor]          # per layer, [o_proj.in_features] int8

    @classmethod
    def for_model(cls, model: nn.Module, seed: int = 0) -> "Plan":
        _, layers = check_supported(model)
        gen = torch.Generator().manual_seed(seed)
        residual = hadamard.random_signs(model.config.hidden_size, gen)
        heads, down = [], []
        for layer in layers:
            heads.append(hadamard.random_signs(layer.self_attn.head_dim, gen))
            down.append(hadamard.random_signs(layer.mlp.down_proj.in_features, gen))
        attn = [hadamard.random_signs(layer.self_attn.o_proj.in_features, gen) for layer in layers]
        return cls(seed, residual, heads, down, attn)


def check_supported(model: nn.Module):
    """(base model, decoder layers) of a Llama / Qwen2 causal LM, or RotationError."""
    cfg = model.config
    if online.record_of(cfg) is not None:
        raise RotationError("the model is already rotated (its config has a pt2llm_rotation record)")
    if getattr(cfg, "model_type", None) not in MODEL_TYPES:
        raise RotationError(f"rotation supports model types {', '.join(MODEL_TYPES)}; "
                            f"got {getattr(cfg, 'model_type', None)!r}")
    base = model.model
    for layer in base.layers:
        att, mlp = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if not isinstance(lin, nn.Linear):
                raise RotationError(f"{type(lin).__name__} is not a float nn.Linear: only float models can be "
                                    f"rotated (rotate first, then quantize)")
    norms = [base.norm] + [n for layer in base.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    for n in norms:
        if getattr(n, "bias", None) is not None or not type(n).__name__.endswith("RMSNorm"):
            raise RotationError(f"{type(n).__name__} is not a plain RMSNorm: rotation would change the model")
    return base, base.layers


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _in_chunks(w: torch.Tensor, fn) -> None:
    """w <- fn(w) row chunk by row chunk, in float64 (embeddings can be large)."""
    with torch.no_grad():
        for i in range(0, w.shape[0], _ROW_CHUNK):
            w[i:i + _ROW_CHUNK] = fn(w[i:i + _ROW_CHUNK].double()).to(w.dtype)


def _fold_norm(norm: nn.Module, linears) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        _write(lin.weight, fold_scale(lin.weight.double(), g.to(lin.weight.device)))
    with torch.no_grad():
        norm.weight.fill_(1.0)


def untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own copy of the weight if it shares the embeddings'; True if it did."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False
    return tied


def rotate_outside(model: nn.Module, plan: Plan, layers_name: str = "model.layers") -> dict:
    """Embeddings, final norm and lm_head; records the rotation in model.config. Returns the
    record (config key `pt2llm_rotation`)."""
    base, layers = check_supported(model)
    untied = untie_lm_head(model)
    head = model.get_output_embeddings()
    _fold_norm(base.norm, [head])
    r = plan.residual
    _in_chunks(model.get_input_embeddings().weight, lambda e: rotate_input(e, r))
    _in_chunks(head.weight, lambda w: rotate_input(w, r))
    record = {"method": "hadamard", "seed": plan.seed, "untied_lm_head": untied,
              "online": [f"{layers_name}.{i}.{name}" for i in range(len(layers)) for name in ONLINE]}
    setattr(model.config, online.CONFIG_KEY, record)
    return record


def rotate_layer(layer: nn.Module, i: int, plan: Plan) -> None:
    """Rotate decoder layer i in place (on whatever device it is)."""
    att, mlp = layer.self_attn, layer.mlp
    _fold_norm(layer.input_layernorm, [att.q_proj, att.k_proj, att.v_proj])
    _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    r, hs, ds, hd, ps = plan.residual, plan.heads[i], plan.down[i], att.head_dim, plan.attn[i]
    for lin in (att.q_proj, att.k_proj, mlp.gate_proj, mlp.up_proj):
        _write(lin.weight, rotate_input(lin.weight.double(), r))
    _write(att.v_proj.weight, rotate_heads_output(rotate_input(att.v_proj.weight.double(), r), hs, hd))
    if att.v_proj.bias is not None:
        _write(att.v_proj.bias, hadamard.transform(att.v_proj.bias.double().reshape(-1, hd), hs).reshape(-1))
    o = rotate_input(rotate_heads_input(att.o_proj.weight.double(), hs, hd), ps)
    _write(att.o_proj.weight, rotate_output(o, r))
    _write(mlp.down_proj.weight, rotate_output(rotate_input(mlp.down_proj.weight.double(), ds), r))
    for lin in (att.o_proj, mlp.down_proj):
        if lin.bias is not None:
            _write(lin.bias, hadamard.transform(lin.bias.double(), r))
    for name, signs in zip(ONLINE, (ps, ds)):
        device = layer.get_submodule(name).weight.device
        online.attach(layer, name, online.OnlineHadamard(signs.numel(), signs.clone(), device=device))


def rotate_model(model: nn.Module, seed: int = 0) -> dict:
    """Rotate a float Llama / Qwen2 causal LM in place; returns the rotation record."""
    plan = Plan.for_model(model, seed)
    _, layers = check_supported(model)
    record = rotate_outside(model, plan)
    for i, layer in enumerate(layers):
        rotate_layer(layer, i, plan)
    return record
