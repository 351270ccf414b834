"""Streaming a model from safetensors shards: the model is built on the meta device,
everything outside the decoder layers (embeddings, final norm, rotary tables, lm_head)
is loaded at once, and each decoder layer is loaded only when its turn comes. With the
driver replacing each finished layer by its small quantized form, host memory stays at
about one float layer plus the embeddings, whatever the depth (a 70B model on a host that
cannot hold it in fp16)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .driver import find_decoder_layers


class StreamError(ValueError):
    pass


def has_safetensors(folder) -> bool:
    p = Path(folder)
    return p.is_dir() and ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


class LayerStream:
    """`model` is usable for capturing layer-0 inputs right away; call `load_layer(i)`
    before touching decoder layer i."""

    def __init__(self, folder, dtype=torch.float32):
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder, self.dtype = Path(folder), dtype
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(self.folder / "model.safetensors"), framework="pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        self._files = {}
        self.config = AutoConfig.from_pretrained(self.folder)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        _, self.layers, self.layers_name = find_decoder_layers(self.model)
        inside = {id(m) for m in self.layers.modules()}
        outside = [(n, m) for n, m in self.model.named_modules() if id(m) not in inside]
        self._materialize(outside)
        self.model.tie_weights()
        for n, p in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if p.is_meta and not n.startswith(self.layers_name + "."):
                raise StreamError(f"{self.folder}: no tensor for {n} in its safetensors files")

    def _tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open
        fname = self.where[key]
        if fname not in self._files:
            self._files[fname] = safe_open(str(self.folder / fname), framework="pt")
        return self._files[fname].get_tensor(key)

    def _materialize(self, named_modules) -> None:
        for name, mod in named_modules:
            prefix = f"{name}." if name else ""
            own = [(k, p) for k, p in mod.named_parameters(recurse=False) if p.is_meta]
            own_buf = [(k, b) for k, b in mod.named_buffers(recurse=False) if b.is_meta]
            if not own and not own_buf:
                continue
            nonpersistent = [k for k, _ in own_buf if k in mod._non_persistent_buffers_set]
            if nonpersistent:  # computed at construction (rotary tables): construct it again
                self._rebuild(name, mod)
                continue
            loaded = {k: self._tensor(prefix + k) for k, _ in own + own_buf if prefix + k in self.where}
            if not loaded:  # e.g. an lm_head tied to the embeddings: tie_weights fills it in
                continue
            missing = [prefix + k for k, _ in own + own_buf if k not in loaded]
            if missing:
                raise StreamError(f"{self.folder}: no tensor for {missing[0]} in its safetensors files")
            mod.to_empty(device="cpu", recurse=False)
            for k, t in loaded.items():
                target = getattr(mod, k)
                if tuple(target.shape) != tuple(t.shape):
                    raise StreamError(f"{self.folder}: {prefix + k} has shape {tuple(t.shape)}, "
                                      f"the config implies {tuple(target.shape)}")
                target.data.copy_(t)
        self._files.clear()  # drop the shards' memory maps: their pages would count as ours

    def _rebuild(self, name: str, mod: nn.Module) -> None:
        try:
            new = type(mod)(config=self.config)
        except TypeError:
            raise StreamError(f"cannot stream {type(mod).__name__} ({name}): its buffers are computed at "
                              f"construction and it does not take a config") from None
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, new)

    def load_layer(self, i: int) -> None:
        prefix = f"{self.layers_name}.{i}"
        layer = self.layers[i]
        if not any(p.is_meta for p in layer.parameters()):
            return
        self._materialize([(f"{prefix}.{n}" if n else prefix, m) for n, m in layer.named_modules()])
        for n, p in layer.named_parameters():
            if p.is_meta:
                raise StreamError(f"{self.folder}: no tensor for {prefix}.{n} in its safetensors files")
