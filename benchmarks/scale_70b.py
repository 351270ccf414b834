"""Quantizing a Llama-2-70B-shaped model without holding it in host memory.

Writes the first --layers decoder layers of a 70B-shaped model (random fp16 weights,
one safetensors shard per layer plus one for embeddings/norm/lm_head, with an index),
then quantizes them with PT² (paper settings) streaming one layer at a time, each finished
layer written to the run's work folder and freed (as `pt2llm quantize` does), recording
per-layer time, host RSS and peak GPU memory after each layer; extrapolates 80 layers.

    python benchmarks/scale_70b.py --layers 3 --out docs/results/scale-70b
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pt2llm import checkpoint  # noqa: E402
from pt2llm.model import driver  # noqa: E402
from pt2llm.model.stream import LayerStream  # noqa: E402

LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=80)


def gpu_peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def rss_gib() -> float:
    """Anonymous resident memory (RssAnon): what the process holds, not file pages it mapped."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def write_shards(folder: Path, layers: int, device: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(**{**LLAMA2_70B, "num_hidden_layers": layers})
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    g = torch.Generator(device=device).manual_seed(0)
    shards, weight_map = {}, {}
    for k, p in meta.state_dict().items():
        shard = f"layer-{int(k.split('.')[2]):03d}.safetensors" if k.startswith("model.layers.") else "rest.safetensors"
        shards.setdefault(shard, []).append((k, p.shape))
    for shard, items in shards.items():
        tensors = {}
        for k, shape in items:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float16)
            tensors[k] = (t * 0.02 if len(shape) == 2 else t.abs() * 0 + 1).cpu()
            weight_map[k] = shard
        save_file(tensors, str(folder / shard))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", default="docs/results/scale-70b")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama2-70b-shape"
        folder.mkdir()
        t0 = time.perf_counter()
        write_shards(folder, a.layers, a.device)
        t_write = time.perf_counter() - t0
        rss0 = rss_gib()
        ls = LayerStream(folder, dtype=torch.float16)
        rss_skeleton = rss_gib()
        calib = torch.randint(0, LLAMA2_70B["vocab_size"], (a.nsamples, a.seqlen),
                              generator=torch.Generator().manual_seed(0))
        per_layer = []

        def loader(i):
            if per_layer or i:
                per_layer[-1]["rss_gib_after"] = round(rss_gib(), 2)
                per_layer[-1]["peak_gpu_gib"] = gpu_peak_gib()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            ls.load_layer(i)
            per_layer.append({"layer": i, "rss_gib_loaded": round(rss_gib(), 2)})

        stats = driver.DriverStats()
        cfg = driver.QuantConfig()
        work = checkpoint.WorkDir(Path(tmp) / "q", {"benchmark": "scale_70b"}, resume=False)
        t1 = time.perf_counter()
        driver.quantize_model(ls.model, calib, cfg, device=a.device, progress=False,
                              stats=stats, layer_loader=loader, work=work)
        t_quant = time.perf_counter() - t1
        per_layer[-1]["rss_gib_after"] = round(rss_gib(), 2)
        per_layer[-1]["peak_gpu_gib"] = gpu_peak_gib()
        for row, s in zip(per_layer, stats.layers):
            row["seconds"] = s["seconds"]
        t2 = time.perf_counter()
        checkpoint.save(ls.model, None, Path(tmp) / "q", {"method": "pt2", "modules": []}, work=work)
        t_save = time.perf_counter() - t2
    mean_layer = sum(r["seconds"] for r in per_layer) / len(per_layer)
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": datetime.date.today().isoformat(),
           "model": "Llama-2-70B shape (hidden 8192, MLP 28672, GQA 64/8), random fp16 weights, first "
                    f"{a.layers} of 80 layers in safetensors shards",
           "calibration": f"{a.nsamples} x {a.seqlen} random tokens", "write_shards_seconds": round(t_write, 1),
           "rss_gib_before_model": round(rss0, 2), "rss_gib_skeleton_and_embeddings": round(rss_skeleton, 2),
           "capture_seconds": round(stats.seconds["capture"], 2), "per_layer": per_layer,
           "quantize_seconds": round(t_quant, 1), "save_seconds_measured_layers": round(t_save, 1),
           "extrapolated_80_layers_minutes": round((stats.seconds["capture"] + 80 * mean_layer) / 60, 1),
           "driver_seconds": {k: round(v, 1) for k, v in stats.seconds.items()}}
    Path(a.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Llama-2-70B shape, streamed ({res['device']}, {res['date']})", "",
             f"{res['model']}; {res['calibration']}; PT² with the paper's settings.", "",
             "| layer | seconds | host RssAnon loaded (GiB) | host RssAnon after (GiB) | peak GPU (GiB) |", "|---|---|---|---|---|"]
    for r in per_layer:
        lines.append(f"| {r['layer']} | {r['seconds']} | {r['rss_gib_loaded']} | {r['rss_gib_after']} | {r['peak_gpu_gib']} |")
    lines += ["", f"Skeleton and embeddings: {res['rss_gib_skeleton_and_embeddings']} GiB host RssAnon; "
              f"80 layers extrapolated: {res['extrapolated_80_layers_minutes']} min."]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
