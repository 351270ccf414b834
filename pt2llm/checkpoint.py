"""The on-disk format of a quantized model, and loading it back.

DIR/config.json         the model's config with `quantization_config`
                        (quant_method "pt2llm", format_version, block_size, method and
                        every option, calibration source, package version, the list of
                        quantized modules)
DIR/model.safetensors   every tensor: TernaryLinear buffers, norms, embeddings, lm_head
DIR/tokenizer files

Format 3 stores each TernaryLinear's `perm` as a uint8 bit stream of max(1, ceil(log2 in))
bits an entry and each online transform's `signs` one bit each (`_unique_state` packs them,
for the folder and for the work folder's layer files alike); loading builds shells with that
layout and `upgrade_linears` unpacks them to the run-time int16/int32 and int8 tensors.
Format 2 stored them as int16/int32 [in] and int8 [in]; format 1 also packed the codes
along rows. Both still load.

Written into a temporary folder beside DIR and renamed when complete. The safetensors
file is written here (a deterministic header: tensors in name order, metadata keys
sorted) with the sha256 of every tensor's bytes in its metadata; loading checks them and
names the first tensor that does not match. Loading reads config.json as plain JSON and
tensors through safetensors only (never pickle), and runs no code from the folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from . import __version__, pack
from .nn import TernaryLinear, perm_dtype
from .rotate import online

FORMAT_VERSION = 3  # 3: perm and online-transform signs stored as bit streams (pack.pack_perm, pack_signs)
# 2: ternary codes packed 5 rows a byte (pack.pack_trit_rows); 1: 5 columns a byte
# (2 also brings rotated models: config key pt2llm_rotation, online-transform signs; rotate/online.py)
QUANT_METHOD = "pt2llm"


class CheckpointError(ValueError):
    """The folder is not a loadable pt2llm checkpoint (message says why)."""


def _stored_forms(model: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """State-dict key -> the function giving its format-3 on-disk form, for the tensors that
    are stored packed: every TernaryLinear's perm and every online transform's signs."""
    forms = {}
    for name, m in model.named_modules(remove_duplicate=False):
        pre = f"{name}." if name else ""
        if isinstance(m, TernaryLinear):
            forms[pre + "perm"] = lambda t: t if t.dtype == torch.uint8 else pack.pack_perm(t)
        elif isinstance(m, online.OnlineHadamard):
            forms[pre + "signs"] = lambda t: t if t.dtype == torch.uint8 else pack.pack_signs(t)
    return forms


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What is written for `model`: its state_dict without the second name of tied tensors
    (safetensors refuses aliases); float32/float64 tensors (embeddings, norms, lm_head) in
    float16; column orders and online-transform signs packed (format 3)."""
    out, seen = {}, {}
    forms = _stored_forms(model)
    for k, v in model.state_dict().items():
        if v.is_meta:  # a finished layer freed from memory: its tensors come from the work folder
            out[k] = v
            continue
        key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        v = v.detach().cpu()
        if v.dtype in (torch.float32, torch.float64):
            v = v.to(torch.float16)
        if k in forms:
            v = forms[k](v)
        out[k] = v.contiguous()
    return out


def _unpack_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with packed column orders and signs (format 3) unpacked to the run-time
    dtypes of `model`'s modules (which must already be TernaryLinear / have their online
    transforms); tensors already in run-time form pass through."""
    out = dict(state)
    for name, m in model.named_modules(remove_duplicate=False):
        pre = f"{name}." if name else ""
        if isinstance(m, TernaryLinear) and getattr(out.get(pre + "perm"), "dtype", None) == torch.uint8:
            out[pre + "perm"] = pack.unpack_perm(out[pre + "perm"], m.in_features).to(perm_dtype(m.in_features))
        elif isinstance(m, online.OnlineHadamard) and getattr(out.get(pre + "signs"), "dtype", None) == torch.uint8:
            out[pre + "signs"] = pack.unpack_signs(out[pre + "signs"], m.size)
    return out


_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
              torch.int64: "I64", torch.bool: "BOOL"}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class LazyTensor(NamedTuple):
    """A tensor to be read only when written out (a finished layer kept on disk), with the
    sha256 its bytes must have."""
    dtype: torch.dtype
    shape: tuple
    load: Callable[[], torch.Tensor]
    sha256: str | None = None


def write_safetensors(path, tensors: dict, metadata: dict[str, str]) -> None:
    """A safetensors file with a deterministic layout (tensors in name order, metadata keys
    sorted); the sha256 of each tensor's bytes goes into metadata["pt2llm_sha256"] (a JSON
    object, name -> hex digest). Values are tensors or LazyTensors; one tensor at a time is
    in memory: the header is written with placeholder digests of the same length, the data
    streamed and hashed, then the header rewritten in place."""
    names = sorted(tensors)
    header, offset = {}, 0
    for k in names:
        t = tensors[k]
        nbytes = math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes

    def head(digests):
        meta = dict(metadata, pt2llm_sha256=json.dumps(digests, sort_keys=True, separators=(",", ":")))
        h = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":")).encode()
        return h + b" " * (-len(h) % 8)

    first = head({k: "0" * 64 for k in names})
    digests = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(first)))
        f.write(first)
        for k in names:
            t = tensors[k]
            b = _tensor_bytes(t.load() if isinstance(t, LazyTensor) else t)
            if len(b) != header[k]["data_offsets"][1] - header[k]["data_offsets"][0]:
                raise CheckpointError(f"tensor {k!r} changed size while being written")
            digests[k] = hashlib.sha256(b).hexdigest()
            if isinstance(t, LazyTensor) and t.sha256 not in (None, digests[k]):
                raise CheckpointError(f"tensor {k!r} read back from the work folder does not match its "
                                      f"recorded sha256: the work folder is corrupted")
            f.write(b)
        final = head(digests)
        assert len(final) == len(first)
        f.seek(8)
        f.write(final)
        f.flush()
        os.fsync(f.fileno())


def read_safetensors(path, verify: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, each checked against its recorded sha256."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            out = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} cannot be read (truncated or damaged?): {e}") from None
    if verify:
        try:
            digests = json.loads(meta["pt2llm_sha256"])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path} carries no valid per-tensor sha256 record: not written by pt2llm, "
                                  f"or its header was altered") from None
        if sorted(digests) != sorted(out):
            raise CheckpointError(f"{path}: the tensors present do not match the sha256 record")
        for k in sorted(out):
            if hashlib.sha256(_tensor_bytes(out[k])).hexdigest() != digests[k]:
                raise CheckpointError(f"{path}: tensor {k!r} does not match its recorded sha256: "
                                      f"the file is corrupted")
    return out


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse early (before hours of work) an --out that exists or cannot be created."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a folder")
    anc = out.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot create {out}: {anc} is not a writable folder")


def save(model: nn.Module, tokenizer, out_dir, quantization_config: dict, overwrite: bool = False,
         work: "WorkDir | None" = None) -> Path:
    """Write the quantized model; layers freed from memory (meta tensors) are read back from
    `work`, one tensor at a time."""
    out = Path(out_dir)
    check_writable(out, overwrite)
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
        state = _unique_state(model)
        meta = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_meta]
        if meta:
            lazy = work.lazy_state() if work is not None else {}
            missing = [k for k in meta if k not in lazy]
            if missing:
                raise CheckpointError(f"no data for {missing[0]}: neither in memory nor in the work folder")
            state.update({k: lazy[k] for k in meta})
        write_safetensors(tmp / "model.safetensors", state,
                          {"format": "pt", "pt2llm_format_version": str(FORMAT_VERSION)})
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


def read_config(path) -> dict:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{path} has no config.json: not a model folder")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p} does not hold a JSON object")
    return cfg


def read_quantization_config(path) -> dict:
    qc = read_config(path).get("quantization_config")
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a pt2llm-quantized folder (no quantization_config "
                              f"with quant_method {QUANT_METHOD!r})")
    v = qc.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses pt2llm format version {v}; this pt2llm ({__version__}) "
                              f"reads versions up to {FORMAT_VERSION}: upgrade pt2llm")
    return qc


def replace_linears(model: nn.Module, qc: dict, device=None) -> None:
    """Swap the quantized modules named in qc for empty TernaryLinear shells, and give the
    modules that model.config's rotation record names their (empty) online transforms."""
    bits = qc.get("bits") if qc.get("method") == "gptq" else None
    version = qc.get("format_version")
    packing = 1 if version == 1 else 2  # format 1 is repacked by upgrade_linears
    packed = isinstance(version, int) and version >= 3  # bit-stream perm and signs, unpacked by upgrade_linears
    for name in qc["modules"]:
        lin = model.get_submodule(name)
        if isinstance(lin, TernaryLinear):
            continue
        new = TernaryLinear(lin.in_features, lin.out_features, lin.bias is not None,
                            block_size=qc["block_size"], bits=bits, device=device, packing=packing,
                            perm_packed=packed)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    online.install(model, device=device, packed=packed)  # a rotated model's online transforms, if recorded


def upgrade_linears(model: nn.Module) -> None:
    """After the tensors are loaded into replace_linears' shells: repack format-1 codes into
    format 2, and unpack format-3 column orders and online-transform signs."""
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.upgrade_packing()
        elif isinstance(m, online.OnlineHadamard):
            m.unpack()


def load(path, device="cpu", dtype=None, verify: bool = True):
    """(model, tokenizer) from a pt2llm folder; the model is in eval mode on `device`.
    dtype of the unquantized parts: float16 on CUDA, float32 on the CPU unless given.
    verify: check every tensor against the sha256 recorded at save time."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    path = Path(path)
    qc = read_quantization_config(path)
    st = path / "model.safetensors"
    if not st.is_file():
        raise CheckpointError(f"{path} has no model.safetensors")
    cfg = read_config(path)
    cfg.pop("auto_map", None)  # never custom code from the folder
    cfg.pop("quantization_config")
    try:
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json does not describe a known model type: {e}") from None
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        replace_linears(model, qc)
    except (AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: quantization_config's module list does not fit the model: {e}") from None
    state = read_safetensors(st, verify=verify)
    expected = model.state_dict()
    for k, v in state.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{st}: tensor {k!r} has shape {tuple(v.shape)} but the config implies "
                                  f"{tuple(expected[k].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied and not _non_persistent(model, k)]
    if missing or unexpected:
        raise CheckpointError(f"{st} does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    upgrade_linears(model)
    from .hf import PT2LLMConfig
    config.quantization_config = PT2LLMConfig(**qc)
    model.config = config
    model.eval().to(device)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _non_persistent(model: nn.Module, key: str) -> bool:
    mod, _, name = key.rpartition(".")
    m = model.get_submodule(mod) if mod else model
    return name in getattr(m, "_non_persistent_buffers_set", set())


def work_path(out) -> Path:
    """The folder beside OUT where a run keeps its finished layers: .OUT.work."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


class WorkDir:
    """The finished layers of a run in progress, in a folder beside its output
    (OUT's parent/.OUT.work/): run.json (what the run is) and layer-NNNNN.safetensors, each
    written under a temporary name and renamed, so a kill at any moment leaves only whole
    files. `pt2llm quantize ... --resume` continues after the last finished layer."""

    layers_name = "model.layers"  # set by the driver to where the decoder layers live

    def __init__(self, out, manifest: dict, resume: bool, overwrite: bool = False):
        out = Path(out)
        self.path = work_path(out)
        # the layer files are in this format: a work folder of another one is not resumed
        self.manifest = json.loads(json.dumps({**manifest, "format_version": FORMAT_VERSION}, default=str))
        run = self.path / "run.json"
        if self.path.exists():
            if resume:
                try:
                    old = json.loads(run.read_text())
                except (OSError, json.JSONDecodeError):
                    old = None
                if old != self.manifest:
                    raise CheckpointError(f"{self.path} belongs to a run with other settings (model, method, "
                                          f"options, calibration or pt2llm format version): rerun that exact "
                                          f"command with --resume, or remove the folder to start over")
            elif self._layer_files() and not overwrite:
                raise CheckpointError(f"{self.path} holds {len(self._layer_files())} finished layers of an "
                                      f"interrupted run: pass --resume to continue it, or --overwrite to start over")
            else:
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not run.is_file():
            _atomic_write_text(run, json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")

    def _layer_files(self):
        return sorted(self.path.glob("layer-*.safetensors")) if self.path.is_dir() else []

    def _file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def finished(self) -> int:
        """How many layers, from the first, are finished."""
        n = 0
        while self._file(n).is_file():
            n += 1
        return n

    def save_layer(self, i: int, layer: nn.Module) -> None:
        tmp = self._file(i).with_suffix(".tmp")
        write_safetensors(tmp, _unique_state(layer), {"format": "pt"})
        os.replace(tmp, self._file(i))

    def load_layer(self, i: int, layer: nn.Module, config) -> list[str]:
        """Put finished layer i's stored state into `layer` (TernaryLinear shells first);
        returns the names of its quantized linears."""
        state = read_safetensors(self._file(i))
        names = sorted(k[: -len(".packed")] for k in state if k.endswith(".packed"))
        for name in names:
            lin = layer.get_submodule(name)
            dev = lin.weight.device
            new = TernaryLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                block_size=config.block_size, bits=config.code_bits, device=dev)
            new.input_transform = getattr(lin, "input_transform", None)  # rotated layer: kept
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)
        layer.load_state_dict(_unpack_state(layer, state), strict=True)
        return names

    def lazy_state(self) -> dict[str, LazyTensor]:
        """Every finished layer's tensors, by full name, read only when asked for."""
        out = {}
        for i in range(self.finished()):
            path = str(self._file(i))
            with safe_open(path, framework="pt") as f:
                digests = json.loads((f.metadata() or {}).get("pt2llm_sha256", "{}"))
                specs = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            for k, (dt, shape) in specs.items():
                out[f"{self.layers_name}.{i}.{k}"] = LazyTensor(_TORCH_DTYPES[dt], shape, _loader(path, k),
                                                                digests.get(k))
        return out

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def _loader(path: str, key: str):
    def load():
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)
    return load


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
