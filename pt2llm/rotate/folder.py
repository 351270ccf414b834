"""A rotated float model on disk: a Hugging Face folder (config.json, model.safetensors,
tokenizer) whose config carries the rotation record (`pt2llm_rotation`: method, seed, the
modules with an online input transform). Plain transformers would load it without those
transforms (and drop their signs); `load` rebuilds them before the weights go in."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import online


def is_rotated_folder(path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and online.CONFIG_KEY in cfg and "quantization_config" not in cfg


def save(model, tokenizer, out, overwrite: bool = False) -> Path:
    """Write the rotated model (written beside `out` under a temporary name, then renamed)."""
    from ..checkpoint import check_writable

    out = Path(out)
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(str(folder / f)))
    return state


def load(path, dtype=torch.float32):
    """(model, tokenizer) of a rotated float folder, online transforms included; eval mode, CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.initialization import no_init_weights

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("auto_map", None)  # never custom code from the folder
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    online.install(model)
    state = _tensors(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path)
