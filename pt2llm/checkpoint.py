"""The on-disk format of a quantized model, and loading it back.

DIR/config.json         the model's config with `quantization_config`
                        (quant_method "pt2llm", format_version, block_size, method and
                        every option, calibration source, package version, the list of
                        quantized modules)
DIR/model.safetensors   every tensor: TernaryLinear buffers, norms, embeddings, lm_head
DIR/tokenizer files

Written into a temporary folder beside DIR and renamed when complete. Loading reads
safetensors only (never pickle) and runs no code from the folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .nn import TernaryLinear

FORMAT_VERSION = 1
QUANT_METHOD = "pt2llm"


class CheckpointError(ValueError):
    """The folder is not a loadable pt2llm checkpoint (message says why)."""


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (safetensors refuses aliases);
    float32/float64 tensors (embeddings, norms, lm_head) are stored in float16."""
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        v = v.detach().cpu()
        if v.dtype in (torch.float32, torch.float64):
            v = v.to(torch.float16)
        out[k] = v.contiguous()
    return out


def save(model: nn.Module, tokenizer, out_dir, quantization_config: dict, overwrite: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        qc = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
              "pt2llm_version": __version__, **quantization_config}
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qc
        cfg.pop("transformers_version", None)
        if cfg.get("dtype") in ("float32", "float64", None):
            cfg["dtype"] = "float16"
        save_file(_unique_state(model), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})  # one key: safetensors writes a map in random order
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_quantization_config(path) -> dict:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{path} has no config.json: not a model folder")
    try:
        qc = json.loads(p.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a pt2llm-quantized folder (no quantization_config "
                              f"with quant_method {QUANT_METHOD!r})")
    v = qc.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses pt2llm format version {v}; this pt2llm ({__version__}) "
                              f"reads versions up to {FORMAT_VERSION}: upgrade pt2llm")
    return qc


def replace_linears(model: nn.Module, qc: dict, device=None) -> None:
    """Swap the quantized modules named in qc for empty TernaryLinear shells."""
    bits = qc.get("bits") if qc.get("method") == "gptq" else None
    for name in qc["modules"]:
        lin = model.get_submodule(name)
        if isinstance(lin, TernaryLinear):
            continue
        new = TernaryLinear(lin.in_features, lin.out_features, lin.bias is not None,
                            block_size=qc["block_size"], bits=bits, device=device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def load(path, device="cpu", dtype=None):
    """(model, tokenizer) from a pt2llm folder; the model is in eval mode on `device`.
    dtype of the unquantized parts: float16 on CUDA, float32 on the CPU unless given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    path = Path(path)
    qc = read_quantization_config(path)
    st = path / "model.safetensors"
    if not st.is_file():
        raise CheckpointError(f"{path} has no model.safetensors")
    config = AutoConfig.from_pretrained(path)
    qc_obj = config.quantization_config
    del config.quantization_config
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_linears(model, qc)
    try:
        state = load_file(str(st))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{st} cannot be read: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied and not _non_persistent(model, k)]
    if missing or unexpected:
        raise CheckpointError(f"{st} does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    config.quantization_config = qc_obj
    model.config = config
    model.eval().to(device)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _non_persistent(model: nn.Module, key: str) -> bool:
    mod, _, name = key.rpartition(".")
    m = model.get_submodule(mod) if mod else model
    return name in getattr(m, "_non_persistent_buffers_set", set())
