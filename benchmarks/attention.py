"""Decode attention on one CUDA GPU: pt2llm's split-key Triton kernel (pt2llm.attention,
kernels/triton_attention.py) against transformers' SDPA function as a decode step calls it
(one query token, a static KV cache, a bool mask of the filled positions).

    PYTHONPATH=$PWD python3 benchmarks/attention.py --out docs/results    # decode-attention.json, .md

Each case is timed as benchmarks/kernels.py times layers: a CUDA graph over enough copies of
the cache that they come from device memory, the variants replayed in turn, the median over
replays divided by the copies. Bandwidth share: the keys and values of the filled positions
(the fewest bytes the product needs) over the time, divided by a device-to-device copy's
bandwidth measured in the same run. Every case checks the kernel against SDPA's output.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import copy_bandwidth, paired_us  # noqa: E402

from pt2llm import attention  # noqa: E402
from pt2llm.kernels import triton_attention  # noqa: E402

# (name, query heads, kv heads, head size): Llama-2-7B, Llama-2-70B, Qwen2.5-0.5B
MODELS = [("7B", 32, 32, 128), ("70B", 64, 8, 128), ("Qwen-0.5B", 14, 2, 64)]
# (static cache length, filled positions): `pt2llm bench`'s default run (128 + 256 tokens), a long one
CASES = [(388, 128), (388, 384), (4096, 2048)]


def _case(H: int, Hkv: int, D: int, L: int, filled: int, B: int, gen):
    """(tensors, sdpa, kernel): a decode step's inputs (random fp16 query and cache, a bool mask
    of the first `filled` positions) and the two attentions as functions of them."""
    q = torch.randn(B, H, 1, D, device="cuda", generator=gen, dtype=torch.float16)
    k = torch.randn(B, Hkv, L, D, device="cuda", generator=gen, dtype=torch.float16)
    v = torch.randn(B, Hkv, L, D, device="cuda", generator=gen, dtype=torch.float16)
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device="cuda")
    mask[..., :filled] = True
    module = types.SimpleNamespace(num_key_value_groups=H // Hkv, is_causal=True, training=False)
    scale = D ** -0.5

    def sdpa(q, k, v, mask):
        return attention._sdpa(module, q, k, v, mask, scaling=scale)[0]

    def kernel(q, k, v, mask):
        return triton_attention.decode(q, k, v, mask, scale)

    return dict(q=q, k=k, v=v, mask=mask), sdpa, kernel


def run(args):
    dev = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bw = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, H, Hkv, D in MODELS:
        for L, filled in CASES:
            for B in args.batch:
                t, sdpa, kernel = _case(H, Hkv, D, L, filled, B, gen)
                ref = sdpa(**t).float()
                err = float((kernel(**t).float() - ref).norm() / ref.norm())
                us = paired_us({"sdpa": (sdpa, t), "pt2llm": (kernel, t)}, args.reps)
                need = 2 * B * Hkv * filled * D * 2
                rows.append({"model": name, "batch": B, "cache_len": L, "filled": filled, "heads": H,
                             "kv_heads": Hkv, "head_dim": D, "sdpa_us": round(us["sdpa"], 2),
                             "pt2llm_us": round(us["pt2llm"], 2), "speedup": round(us["sdpa"] / us["pt2llm"], 2),
                             "bandwidth_share": round(need / (us["pt2llm"] * 1e-6) / bw, 3),
                             "splits": triton_attention.split_count(B * H, L),
                             "rel_err_vs_sdpa": float(f"{err:.2e}"), "device": dev, "date": date})
                print(rows[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode-attention.json").write_text(json.dumps(rows, indent=1) + "\n")
        lines = ["# Decode attention: the split-key Triton kernel against SDPA", "",
                 f"{dev}, {date}. One query token a sequence, fp16, a static cache of `cache` positions of which "
                 f"`filled` are attended (bool mask), as a decode step calls attention. SDPA: transformers' "
                 f"`sdpa_attention_forward` (torch picks the backend). Bandwidth share: the filled positions' keys "
                 f"and values (kv heads) over the kernel's time, against a device-to-device copy's "
                 f"{bw / 1e12:.2f} TB/s. "
                 "Regenerate: `PYTHONPATH=$PWD python3 benchmarks/attention.py --out docs/results`.", "",
                 "| model (heads / kv heads / dim) | batch | cache | filled | SDPA µs | pt2llm µs | speedup | splits | bandwidth share |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} ({r['heads']}/{r['kv_heads']}/{r['head_dim']}) | {r['batch']} | "
                         f"{r['cache_len']} | {r['filled']} | {r['sdpa_us']} | {r['pt2llm_us']} | {r['speedup']}x | "
                         f"{r['splits']} | {100 * r['bandwidth_share']:.0f} % |")
        (args.out / "decode-attention.md").write_text("\n".join(lines) + "\n")


def sweep(args):
    """Tile size and warps of the kernel, each setting against SDPA in the same replay."""
    defaults = triton_attention.BLOCK_N, triton_attention.WARPS
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, H, Hkv, D in MODELS:
        for L, filled in CASES:
            t, sdpa, _ = _case(H, Hkv, D, L, filled, 1, gen)
            variants = {"sdpa": (sdpa, t)}
            for bn in (32, 64, 128):
                for w in (2, 4, 8):
                    def fn(q, k, v, mask, bn=bn, w=w):
                        triton_attention.BLOCK_N, triton_attention.WARPS = bn, w
                        return triton_attention.decode(q, k, v, mask, D ** -0.5)
                    variants[f"b{bn}w{w}"] = (fn, t)
            us = paired_us(variants, args.reps)
            print(name, L, filled, {k: round(x, 2) for k, x in us.items()}, flush=True)
    triton_attention.BLOCK_N, triton_attention.WARPS = defaults


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for decode-attention.json and .md")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--sweep", action="store_true", help="time tile sizes and warps instead")
    args = ap.parse_args()
    sweep(args) if args.sweep else run(args)


if __name__ == "__main__":
    main()
