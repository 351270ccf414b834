"""The timing harness of dev runs 20-22 (dev11_balanced_decode.py, dev12_l2_prefetch.py,
dev13_relaxed_exit.py): kernel-source variants of the mma kernel, each compiled from its own
source and options, checked against the float64 reference, and timed in turn with
benchmarks/kernels.py's paired CUDA-graph replay on the issue's six layer shapes (M = 1, 4, 16)
and the four groups (M = 1, 4). Run from the repository root (benchmarks/ on the path)."""
import functools
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

import kernels as bk
from pt2llm.kernels import cuda_ternary as ct
from pt2llm.kernels import triton_ternary as tt

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]


@dataclass
class Variant:
    source: str                                   # the kernel source it compiles
    flags: tuple = ()                             # extra NVRTC options (-D...)
    bytes_map: Callable | None = None             # packed codes -> the bytes this variant reads


_choice = ["base"]
_variants: dict[str, Variant] = {}


@functools.cache
def _compile(choice, name, capability, opts):
    v = _variants[choice]
    return torch.cuda._compile_kernel(v.source, name, compute_capability=f"{capability[0]}{capability[1]}",
                                      nvcc_options=list(opts) + list(v.flags))


def _packed(name, t):
    f = _variants[name].bytes_map
    return t if f is None else f(t)


def _timed(name, call):
    def fn(**c):
        _choice[0] = name
        return call(c)
    return fn


def run(variants: dict[str, Variant], out_name: str, identical: bool) -> list[dict]:
    """Every variant (the first is the baseline) on every shape and group; `identical`: assert
    that each gives the baseline's output bit for bit. Writes $OUT/out_name."""
    _variants.clear()
    _variants.update(variants)
    ct._compile = lambda name, capability, opts: _compile(_choice[0], name, capability, opts)
    names = list(variants)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []

    def finish(row, outs, errs, t):
        if identical:
            assert all(torch.equal(a, b) for n in names for a, b in zip(outs[n], outs[names[0]])), row
        row.update({f"{n}_us": round(u, 2) for n, u in t.items()})
        row.update({f"{n}_speedup": round(t[names[0]] / t[n], 3) for n in names[1:]})
        row.update({f"err_{n}": float(f"{e:.2e}") for n, e in errs.items()})
        rows.append(row)
        print(row, flush=True)

    for n_out, k in SHAPES:
        L = bk.make_layer(n_out, k, gen)
        tens = {key: L[key] for key in ("packed", "alpha", "mu", "perm")}
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            call = lambda c: [ct.matmul(x, c["packed"], c["alpha"], c["mu"], c["perm"], None, n_out)]  # noqa: E731
            per = {n: dict(tens, packed=_packed(n, tens["packed"])) for n in names}
            outs, errs = {}, {}
            for n in names:
                _choice[0] = n
                outs[n] = call(per[n])
                errs[n] = bk.check(L, x, outs[n][0])
            finish({"shape": f"{n_out}x{k}", "M": m}, outs, errs,
                   bk.paired_us({n: (_timed(n, call), per[n]) for n in names}))
        del L, tens
    for group, (n_outs, k) in bk.GROUPS.items():
        Ls = [bk.make_layer(n, k, gen) for n in n_outs]
        tens, layers = bk.group_tensors(Ls, n_outs)
        per = {n: {key: (_packed(n, v) if key.startswith("packed") else v) for key, v in tens.items()} for n in names}
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            call = lambda c: tt.linear_group(x, layers(c), 128)  # noqa: E731
            outs, errs = {}, {}
            for n in names:
                _choice[0] = n
                outs[n] = call(per[n])
                errs[n] = max(bk.check(L, x, y) for L, y in zip(Ls, outs[n]))
            finish({"group": group, "M": m}, outs, errs, bk.paired_us({n: (_timed(n, call), per[n]) for n in names}))
        del Ls, tens, per
    out = os.environ.get("OUT", "/tmp")
    with open(f"{out}/{out_name}", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return rows
