"""Run-time (online) input transforms: x -> x diag(s) K_n before a linear whose weight was
multiplied by the same orthogonal matrix offline (W diag(s) K_n), so the product is
unchanged while the weight and its input are incoherent. QuaRot puts one on down_proj's
input, which the residual rotation cannot reach, and one across the heads on o_proj's input;
so does rotate/fold.py.

`hadamard_input(x, signs)` is the whole computation (on CUDA, 16-bit: the Triton kernel of
kernels/triton_hadamard.py; else the torch path); `OnlineHadamard` holds the signs (int8
buffer of ±1, saved with the model: a pt2llm folder of format 3 stores them one bit each,
pack.pack_signs); the small dense factor is rebuilt from the width (`hadamard.factor`), so
nothing else is stored.
`install(model, record)` rebuilds the transforms a saved folder records in its config
(key `pt2llm_rotation`, list "online": module names).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels, pack
from ..kernels import ops
from . import hadamard

CONFIG_KEY = "pt2llm_rotation"


def hadamard_input(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x diag(signs) K_n along the last dimension, in float32 for 16-bit inputs (the FWHT sums
    many terms), returned in x's dtype. On CUDA, 16-bit: one Triton kernel
    (kernels.triton_hadamard); else `hadamard_input_torch`. Under torch.compile the kernel,
    and the torch path of a width whose small factor is random (dynamo cannot trace the
    seeded generator that makes it), run as one opaque op (kernels/ops.py)."""
    if torch.compiler.is_compiling() and (kernels.hadamard_supported(x) or hadamard.plan(x.shape[-1])[0] == "random"):
        return ops.hadamard_input(x, signs)
    return hadamard_input_eager(x, signs)


def hadamard_input_eager(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """`hadamard_input` outside torch.compile (and the body of its op): the Triton kernel where
    it takes x, else the torch path."""
    if kernels.hadamard_supported(x):
        from ..kernels import triton_hadamard
        return triton_hadamard.transform(x, signs)
    return hadamard_input_torch(x, signs)


def hadamard_input_torch(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The torch path of `hadamard_input` on any device (what the Triton kernel replaces)."""
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return hadamard.transform(y, signs).to(x.dtype)


class OnlineHadamard(nn.Module):
    """x -> x diag(signs) K_n, n = len(signs). packed=True: an empty shell whose `signs` has
    a format-3 folder's layout (uint8 [ceil(n/8)], a bit each) until `unpack()`."""

    def __init__(self, n: int, signs: torch.Tensor | None = None, device=None, packed: bool = False):
        super().__init__()
        self.n = n
        if packed:
            if signs is not None:
                raise ValueError("a packed shell takes no signs: they are loaded into it")
            self.register_buffer("signs", torch.zeros(pack.packed_bits_width(n, 1), dtype=torch.uint8, device=device))
            return
        if signs is None:
            signs = torch.ones(n, dtype=torch.int8, device=device)
        if tuple(signs.shape) != (n,):
            raise ValueError(f"need {n} signs, got shape {tuple(signs.shape)}")
        self.register_buffer("signs", signs.to(device=device, dtype=torch.int8))

    @property
    def size(self) -> int:
        return self.n

    @property
    def packed(self) -> bool:
        """Whether `signs` still holds a saved folder's bits (format 3, before unpack())."""
        return self.signs.dtype == torch.uint8

    def unpack(self) -> None:
        """Loaded bits (format 3) -> int8 ±1 signs, on the same device; a no-op otherwise."""
        if self.packed:
            self.signs = pack.unpack_signs(self.signs, self.n).to(self.signs.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            raise RuntimeError("OnlineHadamard.signs still holds the saved bits: call unpack() "
                               "(checkpoint.upgrade_linears) after loading the state")
        return hadamard_input(x, self.signs)

    def extra_repr(self) -> str:
        kind, h = hadamard.plan(self.size)
        return f"n={self.size}, factor={kind}:{h}"


class RotatedLinear(nn.Linear):
    """A float nn.Linear whose input first goes through `input_transform`."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.input_transform = OnlineHadamard(in_features, device=device)

    @classmethod
    def wrap(cls, linear: nn.Linear, transform: OnlineHadamard) -> "RotatedLinear":
        """The same weight and bias (shared, not copied) behind `transform`."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.input_transform = transform
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_transform(x), self.weight, self.bias)


def attach(model: nn.Module, name: str, transform: OnlineHadamard) -> None:
    """Put `transform` in front of the linear `name`: a TernaryLinear (or anything with an
    `input_transform` attribute) takes it as is, a float nn.Linear becomes a RotatedLinear."""
    mod = model.get_submodule(name)
    if getattr(mod, "in_features", None) != transform.size:
        raise ValueError(f"{name}: no linear layer with {transform.size} inputs to put an online transform on")
    if hasattr(mod, "input_transform"):
        mod.input_transform = transform
        return
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"{name} is a {type(mod).__name__}, not a linear layer")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, RotatedLinear.wrap(mod, transform))


def record_of(config) -> dict | None:
    """The rotation record in a model config (a transformers config or a dict), or None."""
    rec = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if rec is None:
        return None
    if not (isinstance(rec, dict) and rec.get("method") == "hadamard" and isinstance(rec.get("online"), list)):
        raise ValueError(f"config key {CONFIG_KEY!r} is not a rotation record this pt2llm knows: {rec!r}")
    return rec


def install(model: nn.Module, record: dict | None = None, device=None, packed: bool = False) -> None:
    """Empty online transforms (their signs are loaded with the weights) on every module the
    rotation record names; the record defaults to the one in model.config. packed=True: shells
    for a format-3 folder's one-bit signs (`OnlineHadamard.unpack` after loading)."""
    record = record if record is not None else record_of(model.config)
    if record is None:
        return
    for name in record["online"]:
        mod = model.get_submodule(name)
        if getattr(mod, "input_transform", None) is None:
            attach(model, name, OnlineHadamard(mod.in_features, device=device, packed=packed))
