"""Sequential, layer-by-layer quantization of a decoder-only causal LM (GPTQ's driver).

One decoder layer at a time lives on the compute device. The calibration activations
entering layer 0 are captured once (with whatever extra arguments the model passes its
layers: position embeddings, masks); each layer is then quantized sub-layer group by
sub-layer group in execution order (q/k/v, o, gate/up, down for Llama), re-running the
layer between groups so every group sees the outputs of the already-quantized ones
(true-sequential); finally the quantized layer's outputs become the next layer's inputs.
Groups are found by watching a forward pass: consecutive linears that read the same
input tensor share one Hessian. No per-architecture table.
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import rotate, ternary
from ..nn import TernaryLinear
from ..timing import stage

log = logging.getLogger(__name__)


class DriverError(ValueError):
    """The model cannot be quantized as given (message says why)."""


class _StopForward(Exception):
    pass


TARGETS = ("quantized", "float", "residual")
# --target residual: the linears whose output is added to the residual stream, and the module
# whose input is that stream just before their sub-layer (Llama-style decoder layers)
RESIDUAL_WRITERS = {"self_attn.o_proj": "input_layernorm", "mlp.down_proj": "post_attention_layernorm"}


# Hessian damping, as a fraction of mean(diag H): GPTQ's and the paper's 1 %, and 10 % when
# fitting the float model (--target float / residual), where it also regularises the target's
# solve W* = W + (W D + P)(H + λI)⁻¹: 10 % measured better on both real models
# (docs/results/damping-qwen, docs/results/damping-cpu-quick). `target_damp` sets that
# solve's damping apart from GPTQ's (by default the two are one value).
PAPER_DAMP = 0.01
TARGET_DAMP = 0.1
# --fit-head: damping of the lm_head refit's solve (flat from 0.1 % to 10 % on SmolLM2, quick protocol)
HEAD_DAMP = 0.01


@dataclass
class QuantConfig:
    method: str = "pt2"          # pt2 | rtn | gptq
    bits: int = 2                # gptq only
    block_size: int = 128
    itf: bool = True
    aga: bool = True
    reorder: str | None = None   # None: ssr for pt2, none for rtn/gptq
    max_iters: int = 50
    percdamp: float | None = None  # None: PAPER_DAMP, or TARGET_DAMP with --target float / residual
    seed: int = 0                # also seeds the rotation's random signs
    rotate: str = "none"         # none | hadamard: rotate the float model first (rotate/fold.py)
    target: str = "quantized"    # quantized (GPTQ) | float: fit the float model's outputs | residual: float, and
                                 # o_proj / down_proj also cancel the residual stream's drift (ternary/target.py)
    refine: int = 0              # sweeps of ternary/refine.py after GPTQ (0: the paper's method)
    target_damp: float | None = None  # damping of W*'s solve (--target float / residual); None: percdamp
    fit_head: bool = False       # refit the 16-bit lm_head to the float logits at the end (`fit_head`)

    def __post_init__(self):
        if self.method not in ternary.METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {ternary.METHODS}")
        if self.block_size <= 0:
            raise ValueError(f"block size must be positive, got {self.block_size}")
        if self.method == "gptq" and not 2 <= self.bits <= 8:
            raise ValueError(f"--bits must be in 2..8 for gptq, got {self.bits}")
        if self.reorder is None:
            self.reorder = "ssr" if self.method == "pt2" else "none"
        if self.reorder not in ternary.ssr.ORDERS:
            raise ValueError(f"unknown reorder {self.reorder!r}; expected one of {ternary.ssr.ORDERS}")
        if self.rotate not in rotate.METHODS:
            raise ValueError(f"unknown rotate {self.rotate!r}; expected one of {rotate.METHODS}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; expected one of {TARGETS}")
        if self.method == "rtn" and self.target != "quantized":
            raise ValueError(f"rtn uses no calibration data, so it cannot use --target {self.target}")
        if self.percdamp is None:
            self.percdamp = PAPER_DAMP if self.target == "quantized" else TARGET_DAMP
        if not self.percdamp >= 0:
            raise ValueError(f"--percdamp must be >= 0, got {self.percdamp}")
        if self.target_damp is not None:
            if self.target == "quantized":
                raise ValueError("--target-damp damps the float model's target, so it needs --target float or "
                                 "--target residual")
            if not self.target_damp >= 0:
                raise ValueError(f"--target-damp must be >= 0, got {self.target_damp}")
        if self.fit_head and self.target == "quantized":
            raise ValueError("--fit-head fits the float model's logits, so it needs --target float or "
                             "--target residual")
        if self.refine < 0:
            raise ValueError(f"--refine must be >= 0, got {self.refine}")
        if self.method == "rtn" and self.refine:
            raise ValueError("rtn uses no calibration data, so it cannot use --refine")
        if self.method == "rtn" and self.reorder == "hessian":
            raise ValueError("rtn uses no calibration data, so it cannot use --reorder hessian")

    @property
    def code_bits(self) -> int | None:
        """None for ternary codes, k for the uint-k GPTQ baseline."""
        return self.bits if self.method == "gptq" else None

    def quantizer(self) -> ternary.BlockQuantizer:
        return ternary.make_quantizer(self.method, bits=self.bits, itf=self.itf, aga=self.aga,
                                      max_iters=self.max_iters)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.method != "gptq":
            d.pop("bits")
        if self.target == "quantized":
            d.pop("target")  # the default, as before the option existed: older work folders still resume
        if not self.refine:
            d.pop("refine")
        if self.target_damp is None:
            d.pop("target_damp")  # one damping for both solves, as before the option existed
        if not self.fit_head:
            d.pop("fit_head")
        return d

    @property
    def solve_damp(self) -> float:
        """The damping of the float / residual target's solve W* (`ternary.target.float_target`)."""
        return self.percdamp if self.target_damp is None else self.target_damp


@dataclass
class DriverStats:
    seconds: dict = field(default_factory=lambda: {"capture": 0.0, "forward": 0.0, "quantize": 0.0})
    layers: list = field(default_factory=list)   # per layer: name, seconds
    damping_raised: list = field(default_factory=list)
    owners: dict = field(default_factory=dict)   # several devices: linear's dotted name -> rank
    ranks: list = field(default_factory=list)    # several devices: per rank, device and its own seconds
    head: dict | None = None                     # --fit-head: the calibration logit error before and after


def find_decoder_layers(model: nn.Module):
    """(parent module, ModuleList of decoder layers, dotted name)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return base, layers, "model.layers"
    best = None
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1
                and any(isinstance(x, nn.Linear) for x in mod[0].modules())):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        tree = ", ".join(f"{n} ({type(c).__name__})" for n, c in model.named_children())
        raise DriverError(f"found no decoder layers (a ModuleList of blocks holding nn.Linear); "
                          f"top-level modules: {tree}")
    parent = model.get_submodule(best[0].rsplit(".", 1)[0]) if "." in best[0] else model
    return parent, best[1], best[0]


def check_finite(layers, layers_name: str, first: int = 0) -> None:
    """Refuse a model with NaN or inf in a decoder linear's weight, naming the layer."""
    for i, layer in enumerate(layers, start=first):
        for n, m in layer.named_modules():
            if isinstance(m, nn.Linear) and not bool(torch.isfinite(m.weight).all()):
                raise DriverError(f"non-finite weights (NaN or inf) in {layers_name}.{i}.{n}: "
                                  f"refusing to quantize a broken model")


def _has(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
        return True
    except AttributeError:
        return False


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _forward_until_stop(module, *args, **kwargs) -> None:
    """module(*args, **kwargs), ended early by a hook that raises _StopForward."""
    try:
        module(*args, **kwargs)
    except _StopForward:
        pass


@torch.no_grad()
def capture_layer_inputs(model, parent, layers, calib: torch.Tensor, device):
    """Run the calibration windows up to the first decoder layer. Returns (list of
    hidden states [1, seqlen, hidden] on device, extra args, extra kwargs)."""
    moved = [c for c in parent.children() if c is not layers]
    for c in moved:
        c.to(device)
    inps, extra = [], {}

    def grab(module, args, kwargs):
        inps.append(args[0].detach())
        if not extra:
            extra["args"], extra["kwargs"] = args[1:], dict(kwargs)
        raise _StopForward

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(calib.shape[0]):
            _forward_until_stop(model, input_ids=calib[i:i + 1].to(device), use_cache=False)
    finally:
        h.remove()
        for c in moved:
            c.to("cpu")
    if len(inps) != calib.shape[0]:
        raise DriverError("the model never called its first decoder layer")
    kwargs = extra["kwargs"]
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return inps, extra["args"], kwargs


@torch.no_grad()
def linear_groups(layer: nn.Module, x, args, kwargs) -> list[list[str]]:
    """Linears of a layer grouped by shared input, in execution order."""
    names = {mod: name for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
    calls: list[tuple[str, torch.Tensor]] = []

    def rec(module, inp):
        calls.append((names[module], inp[0]))

    hooks = [m.register_forward_pre_hook(rec) for m in names]
    try:
        layer(x, *args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups, seen, prev = [], set(), None
    for name, inp in calls:
        if name in seen:
            continue
        seen.add(name)
        if prev is not None and inp is prev:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = inp
    missing = set(names.values()) - seen
    if missing:
        log.warning("linears never called in a forward pass stay unquantized: %s", sorted(missing))
    return groups


@torch.no_grad()
def quantize_model(model: nn.Module, calib: torch.Tensor, config: QuantConfig, device="cpu",
                   progress: bool = True, stats: DriverStats | None = None, work=None,
                   layer_loader=None, dist=None) -> list[str]:
    """Quantize every decoder linear of `model` in place; returns the dotted names of the
    replaced modules. calib: LongTensor [nsamples, seqlen].

    work: a `checkpoint.WorkDir`; each finished layer is persisted there atomically, and
    layers already there (from an interrupted run) are loaded instead of quantized again.
    The next layer's inputs are always computed by the quantized layer as stored (16-bit
    norms, TernaryLinear modules), so a resumed run is bit-identical to an uninterrupted one.

    layer_loader: called with i before layer i is used, for models streamed layer by layer
    (`stream.LayerStream.load_layer`); their weights are checked for NaN/inf on arrival.

    config.rotate == "hadamard": the float model is rotated first (`rotate.fold`: embeddings,
    final norm and lm_head at once, each decoder layer on the device when its turn comes), so
    the Hessians are those of the rotated activations; down_proj keeps its online transform.

    dist: a `distributed.Dist` (one process per device, each calling this with its own
    device): every rank runs every forward pass; the linears of each sub-layer group are
    shared out and their results broadcast; only rank 0 writes to `work` (the others pass a
    `distributed.WorkReader`). None: one device.
    """
    from tqdm.auto import tqdm

    stats = stats if stats is not None else DriverStats()
    device = torch.device(device)
    parent, layers, layers_name = find_decoder_layers(model)
    if config.target == "residual":
        missing = [n for n in (*RESIDUAL_WRITERS, *RESIDUAL_WRITERS.values()) if not _has(layers[0], n)]
        if missing:
            raise DriverError(f"--target residual needs Llama-style decoder layers; {layers_name}.0 has no "
                              f"{', '.join(missing)}")
    head_norm = final_norm(model, parent) if config.fit_head else None  # refused before any work
    if layer_loader is None:
        check_finite(layers, layers_name)
    quantizer = config.quantizer()
    use_data = config.method != "rtn"
    plan = None
    if config.rotate == "hadamard":
        plan = rotate.fold.Plan.for_model(model, config.seed)
        rotate.fold.rotate_outside(model, plan, layers_name)
    t0 = time.perf_counter()
    if use_data:
        inps, args, kwargs = capture_layer_inputs(model, parent, layers, calib, device)
    floats = use_data and config.target != "quantized"
    finps = [x.clone() for x in inps] if floats else None  # the float model's stream
    stats.seconds["capture"] += time.perf_counter() - t0

    replaced = []
    done = work.finished() if work is not None else 0
    if dist is not None:
        done = dist.broadcast_object(done)  # rank 0's work folder is the one that counts
        stats.seconds["share"] = 0.0
    writes = work is not None and (dist is None or dist.is_main)
    if work is not None:
        work.layers_name = layers_name
    bar = tqdm(range(len(layers)), desc=f"quantize ({config.method})", unit="layer", disable=not progress)
    for i in bar:
        t_layer = time.perf_counter()
        if layer_loader is not None:
            layer_loader(i)
            check_finite(layers[i:i + 1], layers_name, first=i)
        layer = layers[i].to(device)
        if plan is not None:
            rotate.fold.rotate_layer(layer, i, plan)
        flayer = copy.deepcopy(layer) if finps is not None else None  # the float layer, kept for its outputs
        if i < done:
            bar.set_postfix_str("resumed")
            names = work.load_layer(i, layer, config)
        else:
            names = _quantize_layer(layer, quantizer, config, inps if use_data else None,
                                    (args, kwargs) if use_data else None, stats, f"{layers_name}.{i}", bar, dist,
                                    flayer=flayer, finps=finps)
            _round_to_fp16(layer)
        if use_data:
            t = time.perf_counter()
            for j, x in enumerate(inps):
                inps[j] = _first(layer(x, *args, **kwargs))
            if finps is not None:
                for j, x in enumerate(finps):
                    finps[j] = _first(flayer(x, *args, **kwargs))
                del flayer
            stats.seconds["forward"] += time.perf_counter() - t
        layers[i] = layer.to("cpu")
        if writes and i >= done:
            with stage("persist_layer"):
                work.save_layer(i, layers[i])
            _inject_fault(i)
        if work is not None and layer_loader is not None:
            layers[i] = layers[i].to("meta")  # streaming: the saved layer is read back at the end
        replaced += [f"{layers_name}.{i}.{n}" for n in names]
        stats.layers.append({"layer": i, "seconds": round(time.perf_counter() - t_layer, 3), "resumed": i < done})
    if config.fit_head:
        with stage("fit_head"):
            t = time.perf_counter()
            stats.head = fit_head(model, head_norm, inps, finps, device)
            stats.seconds["fit_head"] = time.perf_counter() - t
    _round_to_fp16(model)
    if dist is not None:
        mine = sum(1 for r in stats.owners.values() if r == dist.rank)
        stats.ranks = dist.all_gather_object({"device": dist.device, "linears": mine,
                                              "quantize_seconds": round(stats.seconds["quantize"], 3),
                                              "share_seconds": round(stats.seconds["share"], 3)})
    return replaced


def final_norm(model: nn.Module, parent: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and lm_head (Llama-style: model.model.norm)."""
    norm = getattr(parent, "norm", None)
    if not isinstance(norm, nn.Module) or model.get_output_embeddings() is None:
        raise DriverError("--fit-head needs a final norm at the decoder's `norm` and an lm_head "
                          "(Llama-style causal LMs)")
    return norm


_HEAD_CHUNK = 16384  # lm_head rows mapped at a time


@torch.no_grad()
def fit_head(model: nn.Module, norm: nn.Module, inps, finps, device) -> dict:
    """--fit-head (beyond the paper): refit the 16-bit lm_head W by least squares so that on
    the calibration windows its logits from the quantized model's final hidden states z match
    the float model's W z̃ (z = norm(last layer's output), both streams): W* = W M,
    M = I + D (H + λI)⁻¹ (`ternary.target.float_target_map`, λ = HEAD_DAMP), the float
    target's solve with nothing quantized. A lm_head tied to the embeddings is untied first
    (the embeddings keep their weight). Returns the calibration logit error
    Σ‖W' z − W z̃‖² / Σ‖W z̃‖² before (W' = W) and after."""
    rotate.fold.untie_lm_head(model)
    head = model.get_output_embeddings()
    home = next(norm.parameters(), torch.empty(0)).device
    norm.to(device)
    d = head.in_features
    acc, accf = ternary.target.CrossAccumulator(d, device=device), ternary.HessianAccumulator(d, device=device)
    for x, xf in zip(inps, finps):
        z, zf = norm(x), norm(xf)
        acc.add(z, zf)
        accf.add(zf)
    norm.to(home)
    M = ternary.target.float_target_map(acc.H, acc.D, HEAD_DAMP)
    W = head.weight
    G = torch.zeros(d, d, dtype=torch.float64, device=device)
    for r in range(0, W.shape[0], _HEAD_CHUNK):
        w = W[r:r + _HEAD_CHUNK].to(device=device, dtype=torch.float64)
        G.addmm_(w.T, w)
        W[r:r + _HEAD_CHUNK] = (w @ M).to(device=W.device, dtype=W.dtype)
    energy = float((G * accf.H.double()).sum())  # Σ‖W z̃‖² = tr(WᵀW Σ z̃ z̃ᵀ)
    before = ternary.target.logit_error(G, torch.eye(d, dtype=torch.float64, device=device), acc.H, acc.D, accf.H)
    after = ternary.target.logit_error(G, M, acc.H, acc.D, accf.H)
    return {"logit_error_before": before / energy, "logit_error_after": after / energy}


def _inject_fault(i: int) -> None:
    """Fault injection for the resume tests: PT2LLM_FAULT_AFTER_LAYER=N kills the process
    (SIGKILL) once layer N is persisted; N:SIGINT interrupts it as Ctrl-C would."""
    spec = os.environ.get("PT2LLM_FAULT_AFTER_LAYER", "")
    layer, _, sig = spec.partition(":")
    if layer == str(i):
        os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))


def _quantize_layer(layer, quantizer, config, inps, extra, stats, prefix, bar, dist=None,
                    flayer=None, finps=None) -> list[str]:
    """Quantize one layer's linears group by group (true-sequential) and swap them for
    TernaryLinear modules on the layer's device. Returns their names within the layer.
    With `dist`, this rank quantizes its share of each group and receives the rest.
    With `flayer` / `finps` (config.target float or residual), each linear is fitted to the float
    layer's outputs on the float model's inputs (`ternary.target`)."""
    device = next(layer.parameters()).device
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    if inps is not None:
        args, kwargs = extra
        t = time.perf_counter()
        groups = linear_groups(layer, inps[0], args, kwargs)
        stats.seconds["forward"] += time.perf_counter() - t
    else:  # no data: nothing ties the linears together (one group when shared out over devices)
        groups = [[n] for n in linears] if dist is None else [list(linears)]
    results = {}
    for group in groups:
        H = D = P = None
        if inps is not None:
            t = time.perf_counter()
            drift = RESIDUAL_WRITERS.get(group[0]) if config.target == "residual" and len(group) == 1 else None
            H, D, P = _group_hessian(layer, group, inps, args, kwargs, flayer, finps, drift)
            stats.seconds["forward"] += time.perf_counter() - t
        t = time.perf_counter()
        owners = None if dist is None else dist.assign(group, linears)
        got = {}
        for n in group:
            if owners is not None and owners[n] != dist.rank:
                continue
            bar.set_postfix_str(n)
            w = linears[n].weight
            if D is not None:
                with stage("float_target"):
                    w = ternary.target.float_target(w, H, D, config.solve_damp, P)
            got[n] = ternary.quantize_weight(w, H, quantizer, block_size=config.block_size,
                                             reorder=config.reorder, percdamp=config.percdamp, seed=config.seed)
            if config.refine:
                with stage("refine"):
                    got[n] = ternary.refine.refine(got[n], w, H, quantizer.lo, quantizer.hi, config.refine)
        shared = 0.0
        if dist is not None:
            t_share = time.perf_counter()
            got = dist.share(group, owners, got)  # every result on every rank, bytes as computed
            shared = time.perf_counter() - t_share
            stats.seconds["share"] += shared
            stats.owners.update({f"{prefix}.{n}": r for n, r in owners.items()})
        for n in group:  # the group's linears share H and nothing else: finishing them after is the same
            lin, r = linears[n], got[n]
            if r.damp > config.percdamp or r.recomputed:
                stats.damping_raised.append((f"{prefix}.{n}", r.damp, r.recomputed))
            lin.weight.copy_(r.dequantize().to(lin.weight.dtype))  # later groups see it quantized
            results[n] = r
        stats.seconds["quantize"] += time.perf_counter() - t - shared
    for n, r in results.items():
        with stage("packing"):
            q = TernaryLinear.from_result(r, linears[n].bias, bits=config.code_bits).to(device)
        q.input_transform = getattr(linears[n], "input_transform", None)  # rotated down_proj: x Q stays online
        _set_module(layer, n, q)
    return list(results)


def _round_to_fp16(module: nn.Module) -> None:
    """What is kept unquantized is stored in 16 bits: round float32 parameters to float16
    values now, so the model in memory is exactly the one that is saved."""
    for p in module.parameters():
        if p.dtype in (torch.float32, torch.float64):
            p.data.copy_(p.data.to(torch.float16))


def _group_hessian(layer, group: list[str], inps, args, kwargs, flayer=None, finps=None, drift=None):
    """(H, D, P) for the input shared by the linears `group` of `layer`: H = 2 X X^T / N over
    the windows `inps`, each forward pass stopped as soon as the last linear of the group is
    reached; D = None, or with the float layer `flayer` and its stream `finps` the cross term
    of `ternary.target.CrossAccumulator` (x̃ from flayer on the float stream, window by window);
    P = None, or with `drift` (the name of the module whose input is the residual stream
    before the group's sub-layer) the drift term of `ternary.target.DriftAccumulator`."""
    first = layer.get_submodule(group[0])
    cross = finps is not None
    if drift is not None:
        acc = ternary.target.DriftAccumulator(first.in_features, first.out_features, device=first.weight.device)
    elif cross:
        acc = ternary.target.CrossAccumulator(first.in_features, device=first.weight.device)
    else:
        acc = ternary.HessianAccumulator(first.in_features, device=first.weight.device)
    transform = getattr(first, "input_transform", None) or (lambda x: x)  # the linear sees x Q, not x
    seen = {}

    def grab(module, inp):
        seen["x"] = inp[0]
        raise _StopForward

    def stream(key):
        def keep(module, inp):
            seen[key] = inp[0]
        return keep

    def add(module, inp):
        with stage("hessian"):
            if drift is not None:
                acc.add(transform(inp[0]), transform(seen.pop("x")), seen.pop("hf") - seen.pop("h"))
            elif cross:
                acc.add(transform(inp[0]), transform(seen.pop("x")))
            else:
                acc.add(transform(inp[0]))

    def stop(module, inp):
        raise _StopForward

    hooks = [first.register_forward_pre_hook(add), layer.get_submodule(group[-1]).register_forward_pre_hook(stop)]
    if cross:
        hooks.append(flayer.get_submodule(group[0]).register_forward_pre_hook(grab))
    if drift is not None:
        hooks += [flayer.get_submodule(drift).register_forward_pre_hook(stream("hf")),
                  layer.get_submodule(drift).register_forward_pre_hook(stream("h"))]
    try:
        for j, x in enumerate(inps):
            if cross:
                _forward_until_stop(flayer, finps[j], *args, **kwargs)
            _forward_until_stop(layer, x, *args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return acc.H, (acc.D if cross else None), (acc.P if drift is not None else None)
