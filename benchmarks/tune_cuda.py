"""Find the CUDA mma kernel's best launch settings per layer shape on this GPU, and write them
where the package reads them (pt2llm/kernels/cuda_tuned.json, `cuda_ternary.TUNED_FILE`).

    PYTHONPATH=$PWD python3 benchmarks/tune_cuda.py --write --out docs/results
    PYTHONPATH=$PWD python3 benchmarks/tune_cuda.py --shapes 896x896 4864x896 896+128+128x896

For each shape (one layer "NxK", or layers one launch takes, "N1+N2+N3xK": q/k/v, gate/up) and
M = 1, 4 and 16 (the kernel's M = 1, M = 2..8 and M = 9..16 variants), the candidates below are
timed in turn against what the package runs without the table (the size rule's settings,
`cuda_ternary.TUNING`; at M = 16 the Triton kernel unless the launch sums in a cluster) with
benchmarks/kernels.py's paired CUDA-graph replay, each checked against the reference product.
A candidate enters the table only where it beats that by more than `--margin` (3 %: the
replay's spread); elsewhere the default stays. Candidates differ in warps a CTA, CTAs an SM
(`minb`, at M = 16 `minb2`: registers capped at 65536 / (32 warps minb)), the CTAs split-K aims
at (slots: SMs x minb) and the largest cluster. At M = 16 only candidates whose launch sums in
a cluster count: the package takes the CUDA kernel for 9-16 rows only then (`clustered`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import GROUPS, SHAPES, check, group_tensors, make_layer, paired_us  # noqa: E402

from pt2llm.kernels import cuda_ternary as ct  # noqa: E402
from pt2llm.kernels import triton_ternary as tt  # noqa: E402

CANDIDATES = [(4, 3, 16), (8, 2, 8), (8, 3, 8), (8, 3, 16), (4, 4, 16), (4, 5, 16), (4, 6, 16)]  # warps, minb, max_cluster
CANDIDATES16 = [(4, 2, 16), (4, 3, 16), (4, 4, 16), (8, 2, 8), (8, 2, 16)]  # warps, minb2, max_cluster (M = 9..16)


def parse_shape(text: str) -> tuple[list[int], int]:
    outs, k = text.split("x")
    return [int(n) for n in outs.split("+")], int(k)


def default_shapes() -> list[tuple[list[int], int]]:
    return [([n], k) for n, k in SHAPES] + list(GROUPS.values())


def candidates(m: int, default: dict, sms: int) -> dict:
    """{name: settings} to time against the default at M = m."""
    out = {}
    if m <= 8:
        for warps, minb, cluster in CANDIDATES:
            s = dict(default, warps=warps, minb=minb, slots=sms * minb, max_cluster=cluster)
            if s != default:
                out[f"w{warps}b{minb}c{cluster}"] = s
    else:  # slots at M > 8 = slots x minb2 / minb: SMs x minb2
        for warps, minb2, cluster in CANDIDATES16:
            s = dict(default, warps=warps, minb=2, minb2=minb2, slots=sms * 2, max_cluster=cluster)
            out[f"w{warps}m{minb2}c{cluster}"] = s
    return out


def tune(shapes, ms=(1, 4, 16), margin=0.03, reps=21):
    dev = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, table = [], {}
    for outs, k in shapes:
        Ls = [make_layer(n, k, gen) for n in outs]
        tens, layers = group_tensors(Ls, outs)
        default = ct._settings(outs, k, 1, None, {})  # the size rule alone (no GPU name: no table)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            if m <= 8:
                variants = {"default": (lambda s=default, **c: ct.matmul_group(x, layers(c), **s), tens)}
            else:  # what the package runs at 9-16 rows: the CUDA kernel where it clusters, else Triton
                variants = {"default": (lambda **c: tt.linear_group(x, layers(c), 128), tens)}
            settings = {"default": default}
            for name, s in candidates(m, default, sms).items():
                if m > 8 and not ct._plan(m, k, -(-k // 128), [L["packed"].shape[0] for L in Ls], outs, dev,
                                          over=s)[3]:
                    continue  # no cluster: the package would not take the CUDA kernel
                for L, y in zip(Ls, ct.matmul_group(x, layers(tens), **s)):
                    assert check(L, x, y) < 2e-3, (outs, k, m, name)
                variants[name], settings[name] = (lambda s=s, **c: ct.matmul_group(x, layers(c), **s), tens), s
            times = paired_us(variants, reps)
            best = min(times, key=times.get)
            chosen = best if times[best] < (1 - margin) * times["default"] else "default"
            key = ct.shape_key(outs, k)
            if chosen != "default":
                table.setdefault(ct.rows_key(m), {})[key] = settings[chosen]
            rows.append({"shape": key, "M": m, "chosen": chosen, "settings": settings[chosen],
                         "us": {n: round(t, 2) for n, t in sorted(times.items(), key=lambda kv: kv[1])}})
            print(f"{key:<22} M={m}  default {times['default']:7.2f} us  best {best} {times[best]:7.2f} us"
                  f"  -> {chosen}", flush=True)
        del Ls, tens
    return rows, table


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", help="NxK or N1+N2xK (default: benchmarks/kernels.py's shapes and groups)")
    ap.add_argument("--margin", type=float, default=0.03, help="how much faster than the default a candidate must be")
    ap.add_argument("--write", action="store_true", help=f"merge the winners into {ct.TUNED_FILE}")
    ap.add_argument("--out", type=Path, help="folder for cuda-tuning.json (every candidate's time)")
    args = ap.parse_args()
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else default_shapes()
    os.environ["PT2LLM_CUDA_TUNED"] = "0"  # the default is the package without the table (candidates pass theirs)
    rows, table = tune(shapes, margin=args.margin)
    name = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.write:
        full = json.loads(ct.TUNED_FILE.read_text()) if ct.TUNED_FILE.exists() else {}
        mine = full.setdefault(name, {})
        tuned = {ct.shape_key(outs, k) for outs, k in shapes}
        for bucket in ("1", "8", "16"):  # the shapes tuned now replace their old entries
            kept = {key: v for key, v in mine.get(bucket, {}).items() if key not in tuned}
            mine[bucket] = dict(sorted({**kept, **table.get(bucket, {})}.items()))
        tmp = ct.TUNED_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
        tmp.replace(ct.TUNED_FILE)
        print(f"wrote {ct.TUNED_FILE}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cuda-tuning.json").write_text(json.dumps({"device": name, "date": date, "margin": args.margin,
                                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
