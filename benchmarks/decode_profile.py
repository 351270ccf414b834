"""Where a compiled decode step's GPU time goes: the Llama-2-7B-shaped model of
benchmarks/e2e.py, in fp16 and then ternary, each step through torch.compile (speed.Decoder,
compile=True) and profiled over a few steps run eagerly; kernel time summed by kernel name.

    PYTHONPATH=$PWD python3 benchmarks/decode_profile.py --out docs/results/e2e-profile.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402

from pt2llm import speed  # noqa: E402


def kernel_time(dec: speed.Decoder, steps: int) -> dict:
    """GPU microseconds per step by kernel name (longest first) and in all."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.step()
        torch.cuda.synchronize()
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name][0] += e.device_time_total
            by_name[e.name][1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {"gpu_us_per_step": round(sum(v[0] for v in by_name.values()) / steps, 1),
            "kernels_per_step": sum(v[1] for v in by_name.values()) // steps,
            "by_kernel": [{"kernel": k[:120], "us_per_step": round(v[0] / steps, 1), "calls_per_step": v[1] // steps}
                          for k, v in top]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="a JSON file for the figures")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    model = e2e.fp16_model(32)
    res = {"device": torch.cuda.get_device_name()}
    for name in ("fp16", "ternary"):
        if name == "ternary":
            e2e.ternarize(model, gen)
        torch._dynamo.reset()
        dec = speed.Decoder(model, 1, 400, compile=True)
        dec.prefill(torch.randint(0, model.config.vocab_size, (1, 128), device="cuda"))
        for _ in range(3):  # compiles, then warm
            dec.step()
        res[name] = kernel_time(dec, args.steps)
        print(name, res[name]["gpu_us_per_step"], "us a step;",
              [(k["kernel"][:60], k["us_per_step"]) for k in res[name]["by_kernel"][:6]], flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
