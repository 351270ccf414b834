"""Print the tables of README.md from runs/*.json and kernels-rerun.json (no GPU needed).

    python3 docs/results/mma-kernel/summary.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
SHAPES = ["4096x4096", "11008x4096", "4096x11008", "8192x8192", "28672x8192", "8192x28672"]
VERSIONS = [("1-first.json", "cuda"), ("2-ring.json", "cuda"), ("3-subnormal-decode.json", "r"),
            ("4-warps.json", "w"), ("6-staged.json", "w")]


def best(row, prefix):
    return min(v for k, v in row.items() if k.startswith(prefix) and k != "speedup")


def versions(m):
    print(f"| run | " + " | ".join(SHAPES) + " |")
    print("|---|" + "---|" * len(SHAPES))
    runs = {f: {r["shape"]: r for r in json.loads((HERE / "runs" / f).read_text())["time"] if r["M"] == m}
            for f, _ in VERSIONS}
    first = runs[VERSIONS[0][0]]
    print("| fp16 (run 1) | " + " | ".join(f"{first[s]['fp16']:.1f}" for s in SHAPES) + " |")
    print("| Triton fused (run 1) | " + " | ".join(f"{first[s]['triton']:.1f}" for s in SHAPES) + " |")
    for f, prefix in VERSIONS:
        rows = runs[f]
        print(f"| {f[:-5]} | " + " | ".join(f"{best(rows[s], prefix):.1f} ({rows[s]['fp16'] / best(rows[s], prefix):.2f}x)"
                                           for s in SHAPES) + " |")
    rerun = {r["shape"]: r for r in json.loads((HERE / "kernels-rerun.json").read_text()) if r["M"] == m}
    if rerun:
        print("| kernels-rerun (package defaults) | " + " | ".join(
            f"{rerun[s]['paths_us']['mma']:.1f} ({rerun[s]['fp16_us'] / rerun[s]['paths_us']['mma']:.2f}x)"
            for s in SHAPES) + " |")


def diagnostics():
    rows = json.loads((HERE / "runs" / "5-diagnostics.json").read_text())
    keys = [k for k in rows[0] if k != "shape"]
    print("| variant | " + " | ".join(r["shape"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.1f}" for r in rows) + " |")


if __name__ == "__main__":
    print("M = 1, microseconds (best launch setting of each run; speedup over that run's fp16)\n")
    versions(1)
    print("\nRun 5: parts of the run-4 kernel switched off (M = 1, microseconds)\n")
    diagnostics()
