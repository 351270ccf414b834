"""What sampling costs in `pt2llm generate`'s decode loop, on one CUDA GPU: the Llama-2-7B-shaped
model of benchmarks/e2e.py (random weights) in fp16, then ternary; greedy against two sampling
settings, each step's draw (and the repetition penalty's tokens seen) inside the CUDA graph
(pt2llm.sampling).

    PYTHONPATH=$PWD python3 benchmarks/sampling.py --compile --out docs/results   # sampling.json, sampling.md

Each figure is speed.generate's decode tokens/s (decode steps / decode time) of one call after
a warm-up call, prompt and new-token counts as in e2e.py, no stop token. "top-p 0.95" alone
sorts the whole vocabulary each step; with top-k 40 only the 40 largest are sorted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402

from pt2llm import speed  # noqa: E402
from pt2llm.sampling import GREEDY, Sampling  # noqa: E402

SETTINGS = {"greedy": GREEDY, "temperature 0.7, top-k 40, top-p 0.95": Sampling(0.7, top_k=40, top_p=0.95),
            "temperature 0.7, top-p 0.95": Sampling(0.7, top_p=0.95),
            "temperature 0.7, min-p 0.05, repetition penalty 1.1": Sampling(0.7, min_p=0.05, repetition_penalty=1.1)}


def decode_rate(model, prompt, new_tokens, compile, how) -> tuple[float, str]:
    speed.generate(model, prompt, new_tokens, compile=compile, sampling=how)  # warm-up (and compilation)
    r = speed.generate(model, prompt, new_tokens, compile=compile, sampling=how)
    return r["steps"] / r["decode_s"], r["decode_mode"]


def main():
    args, date, model, prompt, gen = e2e.decode_setup(__doc__, "sampling.json and sampling.md", "also with the step through torch.compile")
    rows = []
    for name in ("fp16", "ternary"):
        if name == "ternary":
            e2e.ternarize(model, gen)
        for compile in ([False, True] if args.compile else [False]):
            if compile:
                torch._dynamo.reset()
            for label, how in SETTINGS.items():
                rate, mode = decode_rate(model, prompt, args.new_tokens, compile, how)
                rows.append({"model": name, "decode_mode": mode, "sampling": label, "tokens_per_s": round(rate, 1),
                             "device": torch.cuda.get_device_name(), "date": date})
                print(rows[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sampling.json").write_text(json.dumps(rows, indent=1) + "\n")
        greedy = {(r["model"], r["decode_mode"]): r["tokens_per_s"] for r in rows if r["sampling"] == "greedy"}
        fp16 = {(r["decode_mode"], r["sampling"]): r["tokens_per_s"] for r in rows if r["model"] == "fp16"}
        lines = ["# Sampling in `pt2llm generate`: Llama-2-7B shape, random weights", "",
                 f"{rows[0]['device']}, {date}. Batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new "
                 f"tokens, no stop token. Regenerate: `PYTHONPATH=$PWD python3 benchmarks/sampling.py --compile "
                 f"--out docs/results`. Decode tokens/s of one speed.generate call after a warm-up call; the "
                 f"draw runs inside the step's CUDA graph.", "",
                 "| model | decoding | next token | tokens/s | x greedy | x fp16 (same decoding and draw) |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['decode_mode']} | {r['sampling']} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_s'] / greedy[r['model'], r['decode_mode']]:.3f}x | "
                         f"{r['tokens_per_s'] / fp16[r['decode_mode'], r['sampling']]:.2f}x |")
        (args.out / "sampling.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
