"""`pt2llm generate`'s decoding against transformers' own `generate`, on one CUDA GPU: the
Llama-2-7B-shaped model of benchmarks/e2e.py (random weights) in fp16, then ternary.

    PYTHONPATH=$PWD python3 benchmarks/generate.py --out docs/results     # generate.json, generate.md

Rows per model: transformers' `generate` (greedy, its dynamic cache, eager: what `pt2llm
generate` ran before), and pt2llm.speed.generate (static cache, the decode step as a CUDA
graph with the split-key attention kernel; then with torch.compile as well, `--compile`).
Each is the wall time of one call after a warm-up call, prompt and new-token counts as in
e2e.py; no stop token (random weights), so every call makes all the new tokens. Tokens/s
counts the decode steps (new tokens - 1) over the decode time; for transformers' generate,
whose prefill is not timed apart, the whole call over all new tokens.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402

from pt2llm import speed  # noqa: E402


def hf_generate(model, prompt, new_tokens) -> dict:
    def call():
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return out[:, prompt.shape[1]:], time.perf_counter() - t
    call()  # warm-up
    tokens, s = call()
    return {"tokens": tokens.cpu(), "wall_s": round(s, 3), "tokens_per_s": round(new_tokens / s, 1)}


def ours(model, prompt, new_tokens, compile=False) -> dict:
    if compile:
        torch._dynamo.reset()
    speed.generate(model, prompt, new_tokens, compile=compile)  # warm-up (and compilation)
    r = speed.generate(model, prompt, new_tokens, compile=compile)
    return {"tokens": r["tokens"], "wall_s": round(r["prefill_s"] + r["decode_s"], 3),
            "prefill_ms": round(r["prefill_s"] * 1e3, 2), "decode_mode": r["decode_mode"],
            "tokens_per_s": round(r["steps"] / r["decode_s"], 1)}


def main():
    args, date, model, prompt, gen = e2e.decode_setup(__doc__, "generate.json and generate.md", "also time speed.generate with torch.compile")
    rows = []
    for name in ("fp16", "ternary"):
        if name == "ternary":
            e2e.ternarize(model, gen)
        runs = {"transformers generate (eager, dynamic cache)": hf_generate(model, prompt, args.new_tokens),
                "pt2llm generate (CUDA graph)": ours(model, prompt, args.new_tokens)}
        if args.compile:
            runs["pt2llm generate --compile"] = ours(model, prompt, args.new_tokens, compile=True)
        ref = runs["transformers generate (eager, dynamic cache)"]["tokens"]
        for how, r in runs.items():
            same = torch.equal(r.pop("tokens"), ref)
            rows.append({"model": name, "how": how, **r, "same_tokens_as_transformers": same,
                         "device": torch.cuda.get_device_name(), "date": date})
            print(rows[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generate.json").write_text(json.dumps(rows, indent=1) + "\n")
        base = {r["model"]: r["tokens_per_s"] for r in rows if r["how"].startswith("transformers")}
        lines = [f"# `pt2llm generate` against transformers' generate: Llama-2-7B shape, random weights", "",
                 f"{rows[0]['device']}, {date}. Batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new "
                 f"tokens, greedy, no stop token. Regenerate: `PYTHONPATH=$PWD python3 benchmarks/generate.py "
                 f"--compile --out docs/results`. Wall time of one call after a warm-up call; tokens/s = decode "
                 f"steps / decode time (transformers: new tokens / the whole call).", "",
                 "| model | decoding | tokens/s | x transformers (same model) | wall s | same tokens |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['how']} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_s'] / base[r['model']]:.2f}x | {r['wall_s']:.2f} | "
                         f"{'yes' if r['same_tokens_as_transformers'] else 'no'} |")
        (args.out / "generate.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
