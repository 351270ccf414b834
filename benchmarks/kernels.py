"""Ternary kernels (CUDA mma kernel, Triton kernels) against torch.nn.functional.linear in fp16, one CUDA GPU.

    PYTHONPATH=$PWD python3 benchmarks/kernels.py --out docs/results    # kernels.json, kernels-groups.json, kernels.md
    PYTHONPATH=$PWD python3 benchmarks/kernels.py --sweep --out DIR     # tune first, then the same

Times come from CUDA graphs, as in a model's decode loop: one graph calls the operation on
enough copies of the weights (at least 256 MiB in all) that they come from device memory,
not L2; its replays are timed with CUDA events, and the median over replays is divided by
the number of copies. (Timing single calls from Python measures the CPU's launch time for
these short kernels, not the GPU's.) fp16 and the ternary paths of one shape and M are
replayed in turn (`paired_us`), so the GPU's clock drift falls on all of them alike. The
bandwidth share is the kernel's fewest bytes (packed codes, alpha, mu, column order,
activations in, outputs out) over its time, divided by the bandwidth of a device-to-device
copy measured in the same run (bytes read + written). Weights are random codes; the
column order is a random permutation (as SSR gives).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from pt2llm import pack
from pt2llm.kernels import cuda_ternary, triton_ternary as tt
from pt2llm.kernels.dependent import dependent_launches
from pt2llm.rotate import hadamard
from pt2llm.rotate.online import hadamard_input, hadamard_input_torch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]  # out x in
MS = [1, 4, 16, 128, 2048]


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), median of runs."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def make_layer(n, k, gen):
    codes = torch.randint(-1, 2, (n, k), device="cuda", generator=gen, dtype=torch.int8)
    nb = -(-k // 128)
    perm = torch.randperm(k, device="cuda", generator=gen).to(torch.int16 if k < 32768 else torch.int32)
    return dict(packed=pack.pack_trit_rows(codes),
                alpha=(torch.rand(n, nb, device="cuda", generator=gen) * 0.02 + 0.005).half(),
                mu=(torch.randn(n, nb, device="cuda", generator=gen) * 0.002).half(),
                perm=perm, inv_perm=tt.inverse_perm(perm).to(torch.int32),  # as TernaryLinear caches it
                bias=None, n_out=n, block_size=128)


def ternary_bytes(L, m, k) -> int:
    n = L["n_out"]
    return (sum(L[t].numel() * L[t].element_size() for t in ("packed", "alpha", "mu", "perm"))
            + 2 * m * k + 2 * m * n)


def graph_us(fn, tensors: dict, reps: int = 15) -> float:
    """Microseconds per call of fn(**copy) over copies of `tensors` in one CUDA graph."""
    return paired_us({"fn": (fn, tensors)}, reps)["fn"]


def _graph(fn, tensors: dict):
    """(graph, calls) of fn(**copy) over copies of `tensors` (256 MiB or more in all)."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))
    copies = [tensors] + [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
                          for _ in range(min(200, -(-2**28 // nbytes)) - 1)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles, allocator) outside the graph
        for c in copies[:2]:
            fn(**c)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in copies:
            fn(**c)
    g.replay()
    torch.cuda.synchronize()
    return g, len(copies), copies


def paired_us(variants: dict, reps: int = 15) -> dict:
    """{name: (fn, tensors)} -> {name: microseconds per call}: each variant's CUDA graph over
    copies of its tensors (`_graph`), the graphs replayed in turn (fp16, then each path, again and again), median of
    each's replays. In turn, because the GPU's clock drifts over a run (it slows under long
    compute-bound work, and the first timing after a pause runs slow): timed one after the
    other, fp16's M = 1 figure moved 166-198 us and its M = 2048 figure 1288-1497 us on
    28672x8192 within a minute (docs/results/kernels.md)."""
    graphs = {k: _graph(fn, t) for k, (fn, t) in variants.items()}
    for g, _, _ in graphs.values():  # one replay each before timing
        g.replay()
    times = {k: [] for k in graphs}
    for _ in range(reps):
        for k, (g, n, _) in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            times[k].append(a.elapsed_time(b) * 1e3 / n)
    del graphs
    return {k: statistics.median(v) for k, v in times.items()}


def _dependent(fn):
    """fn() with the CUDA kernel's launches made dependent launches (kernels/dependent.py), as
    in a decode step: back to back in one graph, each launch's start overlaps the previous
    launch's end."""
    with dependent_launches():
        return fn()


def check(L, x, y) -> float:
    w = tt.dequantize(L["packed"], L["alpha"], L["mu"], L["n_out"], 128, torch.float32)
    ref = x.float()[:, L["perm"].long()] @ w.T
    return float((y.float() - ref).norm() / ref.norm())


def run(args):
    dev = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bw = copy_bandwidth()
    print(f"{dev}: device-to-device copy {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    L = make_layer(1000, 1408, gen)  # bf16 activations: a correctness check, not timed
    for m in (1, 16, 200):
        x = torch.randn(m, 1408, device="cuda", dtype=torch.bfloat16, generator=gen)
        err = check(L, x, tt.linear(x, **L))
        assert err < 1e-2, ("bf16", m, err)
    rows = []
    for n, k in SHAPES:
        L = make_layer(n, k, gen)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen) * 0.02
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            names = ["fused", "prefill"] if m <= 128 else ["prefill"]  # fused: far slower there
            if m <= 16 and cuda_ternary.supported(x, L["packed"], L["perm"], 128):
                names = ["mma", *names]
            variants = {"fp16": (lambda w: F.linear(x, w), {"w": w16})}
            used = tt.default_path(x, L["packed"], L["perm"], 128, L["n_out"])  # what linear() runs
            for p in names:
                y = tt.linear(x, **L, path=p)
                err = check(L, x, y)
                assert err < 2e-3, (n, k, m, p, err)
                variants[p] = (lambda p=p, **c: tt.linear(x, **c, path=p), L)
            if used == "mma" and cuda_ternary.dependent_possible(x):  # as a decode step would launch it
                variants["mma_dependent"] = (lambda **c: _dependent(lambda: tt.linear(x, **c, path="mma")), L)
            paths = paired_us(variants)
            fp16_us = paths.pop("fp16")
            dep_us = paths.pop("mma_dependent", None)
            t_us = paths[used]
            share = ternary_bytes(L, m, k) / (t_us * 1e-6) / bw
            fp16_share = (2 * n * k + 2 * m * k + 2 * m * n) / (fp16_us * 1e-6) / bw
            row = {"shape": f"{n}x{k}", "M": m, "fp16_us": round(fp16_us, 2), "ternary_us": round(t_us, 2),
                   "speedup": round(fp16_us / t_us, 2), "bandwidth_share": round(share, 3),
                   "fp16_bandwidth_share": round(fp16_share, 3), "path": used,
                   "paths_us": {p: round(v, 2) for p, v in paths.items()}, "rel_error": float(f"{err:.2e}"),
                   "device": dev, "date": date}
            if dep_us is not None:
                row |= {"dependent_us": round(dep_us, 2), "speedup_dependent": round(fp16_us / dep_us, 2)}
            rows.append(row)
            print(f"{n:>6}x{k:<6} M={m:<5} fp16 {fp16_us:9.1f} us  ternary {t_us:9.1f} us ({used})  "
                  f"x{fp16_us / t_us:5.2f}  bw {share:5.1%}  " + " ".join(f"{p}={v:.1f}" for p, v in paths.items())
                  + ("" if dep_us is None else f"  dependent {dep_us:.1f} us x{fp16_us / dep_us:5.2f}"), flush=True)
        del L, w16
    return rows, dev, date, bw


LAYERS = {"7B": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)],     # q k v o, gate up, down
          "70B": [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192)] + [(28672, 8192)] * 2 + [(8192, 28672)]}


GROUPS = {"7B q/k/v": ([4096] * 3, 4096), "7B gate/up": ([11008] * 2, 4096),
          "70B q/k/v": ([8192, 1024, 1024], 8192), "70B gate/up": ([28672] * 2, 8192)}


def group_tensors(Ls, outs):
    """(tensors, layers) for timing layers that read one input: their buffers as one dict of
    named tensors (what the CUDA-graph replay copies), and layers(copy) -> the
    (packed, alpha, mu, perm, bias, n_out) tuples linear_group and matmul_group take."""
    tens = {f"{key}{i}": L[key] for i, L in enumerate(Ls) for key in ("packed", "alpha", "mu", "perm")}
    return tens, lambda c: [(c[f"packed{i}"], c[f"alpha{i}"], c[f"mu{i}"], c[f"perm{i}"], None, n)
                            for i, n in enumerate(outs)]


def groups(gen, ms=(1, 4)) -> list[dict]:
    """The layers of a decoder layer that read one input, at decode sizes: fp16 (one F.linear
    each), ternary one launch each (linear), and ternary in one launch (linear_group, what a
    compiled model runs: kernels/ops.py)."""
    rows = []
    for name, (outs, k) in GROUPS.items():
        Ls = [make_layer(n, k, gen) for n in outs]
        w16 = {f"w{i}": torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen) * 0.02
               for i, n in enumerate(outs)}
        tens, layers = group_tensors(Ls, outs)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            for L, y in zip(Ls, tt.linear_group(x, layers(tens), 128)):
                assert check(L, x, y) < 2e-3, (name, m)
            t = paired_us({"fp16": (lambda **c: [F.linear(x, w) for w in c.values()], w16),
                           "separate": (lambda **c: [tt.linear(x, *lay, 128) for lay in layers(c)], tens),
                           "group": (lambda **c: tt.linear_group(x, layers(c), 128), tens)})
            row = {"layers": name, "shapes": [f"{n}x{k}" for n in outs], "M": m,
                   **{f"{key}_us": round(v, 2) for key, v in t.items()},
                   "speedup_separate": round(t["fp16"] / t["separate"], 2),
                   "speedup_group": round(t["fp16"] / t["group"], 2)}
            rows.append(row)
            print("group", row, flush=True)
        del Ls, w16, tens
    return rows


def online(gen, ms=(1, 16)) -> list[dict]:
    """Decode cost of the online Hadamard transforms that a rotated model runs on o_proj's and
    down_proj's inputs, against the same layer unrotated: per decoder layer (its seven linears,
    GQA-shaped for 70B) at M = 1 and 16, fp16 F.linear vs ternary vs ternary + transforms, the
    transforms by `hadamard_input` (the Triton kernel on CUDA) and by the torch path."""
    rows = []
    for name, shapes in LAYERS.items():
        online_at = {3: shapes[3][1], 6: shapes[6][1]}  # o_proj, down_proj: their input widths
        signs = {i: (torch.randint(0, 2, (k,), device="cuda", generator=gen) * 2 - 1).to(torch.int8)
                 for i, k in online_at.items()}
        for m in ms:
            fp16 = tern = had = had_torch = 0.0
            for i, (n, k) in enumerate(shapes):
                L = make_layer(n, k, gen)
                x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
                w16 = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen) * 0.02
                variants = {"fp16": (lambda w: F.linear(x, w), {"w": w16}),
                            "ternary": (lambda **c: tt.linear(x, **c), L)}
                if i in online_at:
                    s = signs[i]
                    y, ref = hadamard_input(x, s), hadamard_input_torch(x, s)
                    assert torch.isfinite(y).all() and (y.float() - ref.float()).norm() <= 2e-3 * ref.float().norm()
                    variants["rotated"] = (lambda s=s, **c: tt.linear(hadamard_input(x, s), **c), L)
                    variants["rotated_torch"] = (lambda s=s, **c: tt.linear(hadamard_input_torch(x, s), **c), L)
                t = paired_us(variants)
                fp16 += t["fp16"]
                tern += t["ternary"]
                if i in online_at:
                    had += t["rotated"] - t["ternary"]
                    had_torch += t["rotated_torch"] - t["ternary"]
                del L, w16
            factors = [f"{k} ({':'.join(map(str, hadamard.plan(k)))})" for k in online_at.values()]
            row = {"layer": name, "M": m, "online_in": factors,
                   "fp16_us": round(fp16, 1), "ternary_us": round(tern, 1), "hadamard_us": round(had, 1),
                   "hadamard_torch_us": round(had_torch, 1),
                   "speedup": round(fp16 / tern, 2), "speedup_rotated": round(fp16 / (tern + had), 2),
                   "kept": round(tern / (tern + had), 3), "kept_torch": round(tern / (tern + had_torch), 3)}
            rows.append(row)
            print("online", row, flush=True)
    return rows


def sweep(args) -> dict:
    """Time the fused kernel's launch settings at M = 1 and 16, and both dequantize kernels'
    tiles, on three shapes; print the best, set them in tt.TUNING (what the rest of the run
    uses) and return them. Also prints what the gather of the activations (x[:, perm],
    M = 2048) costs on those shapes: what dequantizing in the original order saves prefill."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(11008, 4096), (4096, 11008), (28672, 8192)]
    grid = [dict(block_g=bg, warps=nw, stages=ns, programs=tp)
            for bg, nw, ns, tp in [(64, 4, 1, 264), (64, 4, 1, 528), (64, 4, 2, 264), (64, 4, 3, 528),
                                   (128, 8, 1, 264), (128, 8, 1, 132), (32, 4, 2, 264)]]
    dgrid = [dict(block_g=bg, warps=nw) for bg, nw in [(8, 2), (8, 4), (16, 4), (32, 4)]]
    ogrid = [dict(block_c=bc, warps=nw) for bc, nw in [(512, 4), (1024, 4), (1024, 8), (2048, 8), (2048, 16)]]
    scores, dscores, oscores = [[] for _ in grid], [[] for _ in dgrid], [[] for _ in ogrid]
    gather = []
    for n, k in shapes:
        L = make_layer(n, k, gen)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            for i, cfg in enumerate(grid):
                mm = lambda **c: tt.matmul(x, c["packed"], c["alpha"], c["mu"], c["perm"], None, n, 128, **cfg)
                assert check(L, x, mm(**L)) < 2e-3, (n, k, m, cfg)
                scores[i].append(graph_us(mm, L, reps=5))
        ref = tt.dequantize(L["packed"], L["alpha"], L["mu"], n, 128)
        for i, cfg in enumerate(dgrid):
            dq = lambda **c: tt.dequantize(c["packed"], c["alpha"], c["mu"], n, 128, **cfg)
            assert torch.equal(dq(**L), ref), (n, k, cfg)
            dscores[i].append(graph_us(dq, L, reps=5))
        ref[:, L["perm"].long()] = ref.clone()  # the original column order
        for i, cfg in enumerate(ogrid):
            dq = lambda **c: tt.dequantize_original(c["packed"], c["alpha"], c["mu"], c["inv_perm"], n, 128, **cfg)
            assert torch.equal(dq(**L), ref), (n, k, cfg)
            oscores[i].append(graph_us(dq, L, reps=5))
        del ref
        xg = {"x": torch.randn(2048, k, device="cuda", dtype=torch.float16, generator=gen), "perm": L["perm"].long()}
        gather.append(graph_us(lambda x, perm: x.index_select(1, perm), xg, reps=5))
        del L, xg
    for key, g, sc, what in [("fused", grid, scores, "(shape, M = 1, 16)"), ("dequant", dgrid, dscores, "(shape)"),
                             ("dequant_original", ogrid, oscores, "(shape)")]:
        ranked = sorted(range(len(g)), key=lambda i: statistics.geometric_mean(sc[i]))
        for i in ranked:
            print("sweep", key, g[i], f"us at {what}:", [round(v, 1) for v in sc[i]], flush=True)
        tt.update_tuning({key: g[ranked[0]]})
    print("sweep gather x[:, perm] at M = 2048, us at (shape):", [round(v, 1) for v in gather], flush=True)
    print("TUNING =", tt.TUNING, flush=True)
    return tt.TUNING


def write_online(rows, dev, date, out: Path):
    (out / "online-hadamard.json").write_text(json.dumps([r | {"device": dev, "date": date} for r in rows],
                                                         indent=1) + "\n")
    lines = ["# Decode cost of the online Hadamard transforms (rotated models)", "",
             f"{dev}, {date}. Regenerate: `PYTHONPATH=$PWD python3 benchmarks/kernels.py --online --out "
             "docs/results`.", "",
             "One decoder layer's seven linears (Llama-2 shapes; 70B with its 8 KV heads), summed times "
             "from CUDA-graph replays as in kernels.md. A rotated model runs two extra transforms per layer, "
             "on o_proj's and on down_proj's input (`rotate.online.hadamard_input`: on CUDA the one-kernel "
             "Triton transform, `kernels/triton_hadamard.py`; the torch path, signs, fast Walsh-Hadamard "
             "stages as small GEMMs and the small dense factor, is timed beside it). `kept` = the share of "
             "the unrotated ternary speedup that the rotated layer keeps (issue target: at least 80 %).", "",
             "| layer | M | online inputs (factor) | fp16 µs | ternary µs | transforms µs (torch) | speedup | "
             "rotated speedup | kept (torch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['M']} | {', '.join(r['online_in'])} | {r['fp16_us']} | "
                     f"{r['ternary_us']} | {r['hadamard_us']} ({r['hadamard_torch_us']}) | {r['speedup']}x | "
                     f"{r['speedup_rotated']}x | {r['kept']:.0%} ({r['kept_torch']:.0%}) |")
    (out / "online-hadamard.md").write_text("\n".join(lines) + "\n")


def write_groups(rows, dev, date, out: Path):
    (out / "kernels-groups.json").write_text(json.dumps([r | {"device": dev, "date": date} for r in rows],
                                                        indent=1) + "\n")
    lines = ["", "## Layers that read one input, in one launch", "",
             "A decoder layer's q/k/v (and its gate/up) read the same activations. A compiled model "
             "(`pt2llm bench --compile`, kernels/ops.py) runs them as one launch of the CUDA kernel "
             "(`triton_ternary.linear_group`); eager calls launch each. fp16: one `F.linear` each. "
             "Times per group, paired as above.", "",
             "| layers | shapes | M | fp16 µs | ternary, one launch each µs | ternary, one launch µs | "
             "speedup (each) | speedup (one launch) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {', '.join(r['shapes'])} | {r['M']} | {r['fp16_us']:.1f} | "
                     f"{r['separate_us']:.1f} | {r['group_us']:.1f} | {r['speedup_separate']:.2f}x | "
                     f"{r['speedup_group']:.2f}x |")
    with open(out / "kernels.md", "a") as f:
        f.write("\n".join(lines) + "\n")


def write(rows, dev, date, bw, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(tt.TUNING) + "\n")  # benchmarks/e2e.py --tuning reads it
    keep = ("shape", "M", "fp16_us", "ternary_us", "speedup", "bandwidth_share", "device", "date")
    (out / "kernels.json").write_text(json.dumps([{k: r[k] for k in keep} | {k: v for k, v in r.items() if k not in keep}
                                                  for r in rows], indent=1) + "\n")
    lines = ["# Ternary kernels vs fp16 `F.linear`", "",
             f"{dev}, {date}. Device-to-device copy: {bw / 1e12:.2f} TB/s (read + write). "
             f"Regenerate: `PYTHONPATH=$PWD python3 benchmarks/kernels.py --out docs/results`.", "",
             "Shapes are out x in; speedup = fp16 time / ternary time; bandwidth share = the ternary "
             "kernel's fewest bytes over its time, as a share of the copy's bandwidth. Times per call "
             "from CUDA-graph replays over copies of the weights (256 MiB or more in all: weights come from "
             "device memory; no launch gaps), median of replays; fp16 and every path of a row are replayed "
             "in turn (`paired_us`), so that the GPU's clock drift falls on all of them alike. Paths: `mma`, "
             "the CUDA kernel (kernels/cuda_ternary.py, "
             f"the default up to M = {tt.TUNING['mma_max_m']}, and up to 16 where its launch sums the split-K parts "
             "in a thread-block cluster); `fused`, the Triton kernel (the default up to M = "
             f"{tt.TUNING['prefill_from_m'] - 1} after that); `prefill`, dequantize (in the original column order) + "
             "cuBLAS (larger M). Every path's time is given where it was timed. Launch settings: Triton "
             f"`{json.dumps(tt.TUNING)}`, CUDA `{json.dumps(cuda_ternary.TUNING)}`, and for the shapes "
             "that `pt2llm/kernels/cuda_tuned.json` lists for this GPU (benchmarks/tune_cuda.py), its "
             "settings.", "",
             "`mma`, dependent (where `mma` is the layer's path): the CUDA kernel's launches made "
             "programmatic dependent launches (kernels/dependent.py), as the compiled decode step makes "
             "them (speed.Decoder with compile: `pt2llm bench --compile`, `pt2llm generate --compile`): "
             "replayed back to back, each launch stages its codes, scales and column order while the launch "
             "before it ends, so its start overlaps that launch's end. In a decode step a layer follows "
             "another ternary launch (gate/up after o_proj, down after gate/up, q/k/v after down) or the "
             "attention kernel. fp16's cuBLAS launches are not dependent ones.", "",
             "| shape | M | fp16 µs | ternary µs | speedup | bandwidth share | path | mma µs | fused µs | "
             "dequant+cuBLAS µs | mma, dependent µs | speedup, dependent |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paths_us"]
        dep = (f"{r['dependent_us']} | {r['speedup_dependent']:.2f}x" if "dependent_us" in r else " | ")
        lines.append(f"| {r['shape']} | {r['M']} | {r['fp16_us']:.1f} | {r['ternary_us']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['bandwidth_share']:.0%} | {r['path']} | {p.get('mma', '')} | {p.get('fused', '')} | "
                     f"{p.get('prefill', '')} | {dep} |")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for kernels.json and kernels.md")
    ap.add_argument("--sweep", action="store_true", help="first time the kernels' launch settings, "
                    "and use the best")
    ap.add_argument("--online", action="store_true", help="also time the online Hadamard transform of "
                    "rotated models per decoder layer (online-hadamard.json / .md)")
    ap.add_argument("--only-online", action="store_true", help="time only the online transform")
    args = ap.parse_args()
    if args.sweep:
        sweep(args)
    dev = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if not args.only_online:
        rows, dev, date, bw = run(args)
        grows = groups(torch.Generator(device="cuda").manual_seed(2))
        if args.out:
            write(rows, dev, date, bw, args.out)
            write_groups(grows, dev, date, args.out)
    if args.online or args.only_online:
        orows = online(torch.Generator(device="cuda").manual_seed(1))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            write_online(orows, dev, date, args.out)


if __name__ == "__main__":
    main()
