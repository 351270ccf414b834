"""The online Hadamard transform alone (rotated models' o_proj / down_proj inputs): the Triton
kernel (pt2llm/kernels/triton_hadamard.py) against the torch path (rotate.hadamard.transform in
float32) measured in the same run, fp16 rows, CUDA-graph replays as in benchmarks/kernels.py.

    PYTHONPATH=$PWD python3 benchmarks/hadamard.py [--ms 1,16,64,128,512,2048] [--out DIR]
writes DIR/hadamard.json and prints a markdown table (docs/results/online-hadamard-kernel.md)."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import graph_us  # noqa: E402

from pt2llm.kernels import triton_hadamard as th  # noqa: E402
from pt2llm.rotate import hadamard  # noqa: E402
from pt2llm.rotate.online import hadamard_input_torch  # noqa: E402

WIDTHS = (896, 4864, 4096, 11008, 8192, 28672)  # Qwen2.5-0.5B o / down, Llama-2 7B and 70B o / down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1,16,64,128,512,2048")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    print(f"{dev}, {date}\n\n| width | factor | M | torch µs | Triton µs | speedup | rel. error |\n|---|---|---|---|---|---|---|")
    for n in WIDTHS:
        s = (torch.randint(0, 2, (n,), device="cuda", generator=g) * 2 - 1).to(torch.int8)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, n, device="cuda", dtype=torch.float16, generator=g)
            ref = hadamard.transform(x.double(), s)
            err = ((th.transform(x, s).double() - ref).norm() / ref.norm()).item()
            assert err < 2e-3, (n, m, err)
            a = graph_us(lambda x: hadamard_input_torch(x, s), {"x": x})
            b = graph_us(lambda x: th.transform(x, s), {"x": x})
            row = {"width": n, "factor": ":".join(map(str, hadamard.plan(n))), "M": m, "torch_us": round(a, 1),
                   "triton_us": round(b, 1), "speedup": round(a / b, 2), "rel_error": err, "device": dev, "date": date}
            rows.append(row)
            print(f"| {n} | {row['factor']} | {m} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {err:.1e} |", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hadamard.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
