"""Quantization time of a Llama-2-7B-shaped model with random weights (the cost does not
depend on the values), the paper's settings: 128 x 2048 calibration, block 128, ITF, AGA,
SSR; and `--method gptq --bits 2` in the same run as our GPTQ reference.

One run cannot go past 10 minutes on the lent GPU, so the model is built with
--layers of its 32 decoder layers; per-layer cost is measured on them and the full
model's time is extrapolated (fixed costs + 32 x per-layer). Writes JSON and markdown.

    python benchmarks/quant_time.py --layers 3 --out docs/results/quant-time
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pt2llm import checkpoint, timing  # noqa: E402
from pt2llm.model import driver  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=32)


def build(layers: int, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    return model.to("cpu").eval()


def run(method: str, layers: int, nsamples: int, seqlen: int, device: str) -> dict:
    model = build(layers, device)
    calib = torch.randint(0, LLAMA2_7B["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    cfg = driver.QuantConfig(method="pt2") if method == "pt2" else driver.QuantConfig(method="gptq", bits=2)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stats = driver.DriverStats()
    t0 = time.perf_counter()
    with timing.record() as sec:
        driver.quantize_model(model, calib, cfg, device=device, progress=False, stats=stats)
        t_quant = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d, timing.stage("saving"):
            checkpoint.save(model, None, Path(d) / "q", {**cfg.to_dict(), "modules": []})
    wall = time.perf_counter() - t0
    per_layer = [x["seconds"] for x in stats.layers]
    fixed = wall - sum(per_layer)
    return {"method": method if method == "pt2" else "gptq2", "layers_measured": layers,
            "wall_seconds_measured": round(wall, 2), "quantize_seconds_measured": round(t_quant, 2),
            "per_layer_seconds": per_layer, "fixed_seconds": round(fixed, 2),
            "extrapolated_32_layers_seconds": round(fixed + 32 * sum(per_layer) / len(per_layer), 1),
            "stage_seconds_measured": {k: round(v, 2) for k, v in sorted(sec.items())},
            "driver_seconds": {k: round(v, 2) for k, v in stats.seconds.items()},
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
            "peak_host_gib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--methods", default="pt2,gptq2")
    ap.add_argument("--out", default="docs/results/quant-time")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    dev = a.device
    rows = [run(m, a.layers, a.nsamples, a.seqlen, dev) for m in a.methods.split(",")]
    meta = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "model": "Llama-2-7B shape, random fp16 weights",
            "calibration": f"{a.nsamples} x {a.seqlen} random tokens", "results": rows}
    Path(a.out + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"# Quantization time, Llama-2-7B shape ({meta['device']}, {meta['date']})", "",
             f"Measured on {a.layers} of 32 decoder layers, extrapolated to 32 (fixed costs + 32 x mean per-layer).", "",
             "| method | per layer (s) | fixed (s) | 32 layers, extrapolated (min) | peak GPU (GiB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        pl = sum(r["per_layer_seconds"]) / len(r["per_layer_seconds"])
        lines.append(f"| {r['method']} | {pl:.1f} | {r['fixed_seconds']:.1f} | "
                     f"{r['extrapolated_32_layers_seconds'] / 60:.1f} | {r['peak_gpu_gib']} |")
    lines += ["", "Stage seconds over the measured layers (device-synchronised):", ""]
    for r in rows:
        lines.append(f"- {r['method']}: " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds_measured"].items()))
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
