"""End to end on one CUDA GPU: a Llama-2-7B-shaped model (config written out here, random
weights) in fp16, then with every decoder linear ternary, through the same timing as
`pt2llm bench` (pt2llm.speed.measure), and the ternary model once more with the CUDA mma
kernel switched off (PT2LLM_CUDA_KERNEL=0: decode on the Triton kernel).

    PYTHONPATH=$PWD python3 benchmarks/e2e.py --compile --out docs/results     # e2e.json, e2e.md

The ternary layers are built directly from random codes on the GPU (alpha, mu and the
column order random too): quantizing 6.5 billion weights with `--method rtn` goes
through the blockwise loop and does not fit a 10-minute device call, and the values do not
change the speed. Embeddings, norms and lm_head stay fp16, as `pt2llm quantize` leaves them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from pt2llm import pack, speed
from pt2llm.nn import TernaryLinear, perm_dtype

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def fp16_model(layers: int):
    cfg = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    return model.eval()


def decode_setup(doc: str, outputs: str, compile_help: str):
    """The options and the model of the decode benchmarks built on this file's model (generate.py,
    sampling.py): (args, date, the fp16 model, a random prompt [1, --prompt-len], the CUDA
    generator that made it, for ternarize)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help=f"folder for {outputs}")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help=compile_help)
    args = ap.parse_args()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    model = fp16_model(args.layers)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device="cuda", generator=gen)
    return args, date, model, prompt, gen


@torch.no_grad()
def ternarize(model, gen) -> int:
    """Every decoder nn.Linear -> TernaryLinear with random codes; returns how many."""
    n, dev = 0, next(model.parameters()).device
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if not isinstance(lin, torch.nn.Linear):
                continue
            out_f, in_f = lin.out_features, lin.in_features
            t = TernaryLinear(in_f, out_f, lin.bias is not None, device=dev)
            codes = torch.randint(-1, 2, (out_f, in_f), device=dev, generator=gen, dtype=torch.int8)
            t.packed.copy_(pack.pack_trit_rows(codes))
            t.alpha.copy_(torch.rand(t.alpha.shape, device=dev, generator=gen) * 0.02 + 0.005)
            t.mu.copy_(torch.randn(t.mu.shape, device=dev, generator=gen) * 0.002)
            t.perm.copy_(torch.randperm(in_f, device=dev, generator=gen).to(perm_dtype(in_f)))
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, t)
            n += 1
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for e2e.json and e2e.md")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 for the 7B shape)")
    ap.add_argument("--tuning", type=Path, help="kernel launch settings found by benchmarks/kernels.py --sweep")
    ap.add_argument("--attention", choices=["pt2llm", "model"], default="pt2llm",
                    help="the decode step's attention in every row (speed.measure)")
    ap.add_argument("--compile", action="store_true",
                    help="also time fp16 and ternary with the decode step through torch.compile")
    args = ap.parse_args()
    if args.tuning:
        from pt2llm.kernels import triton_ternary
        triton_ternary.update_tuning(json.loads(args.tuning.read_text()))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.manual_seed(0)
    rows = []

    def timed(name, model, compile=False):
        if compile:
            torch._dynamo.reset()  # a fresh compile for this model
        r = speed.measure(model, args.prompt_len, args.new_tokens, args.batch, compile=compile,
                          attention=args.attention)
        rows.append({"model": name, **r})
        print(rows[-1], flush=True)

    model = fp16_model(args.layers)
    timed("fp16", model)
    if args.compile:
        timed("fp16, torch.compile", model, compile=True)
    n = ternarize(model, gen)
    timed(f"ternary ({n} TernaryLinear)", model)
    if args.compile:
        timed("ternary, torch.compile", model, compile=True)
    before = os.environ.get("PT2LLM_CUDA_KERNEL")
    os.environ["PT2LLM_CUDA_KERNEL"] = "0"  # the same model on the Triton kernels alone
    r = speed.measure(model, args.prompt_len, args.new_tokens, args.batch, attention=args.attention)
    if before is None:
        del os.environ["PT2LLM_CUDA_KERNEL"]
    else:
        os.environ["PT2LLM_CUDA_KERNEL"] = before
    rows.append({"model": "ternary, Triton kernels only (PT2LLM_CUDA_KERNEL=0)", **r})
    print(rows[-1], flush=True)
    for row in rows:
        row["date"] = date
    by = {r["model"]: r for r in rows}
    f16, tern = by["fp16"], by[f"ternary ({n} TernaryLinear)"]
    summary = {"decode_speedup": round(tern["decode_tokens_per_s"] / f16["decode_tokens_per_s"], 2),
               "prefill_speedup": round(tern["prefill_tokens_per_s"] / f16["prefill_tokens_per_s"], 2),
               "memory_ratio": round(f16["model_gb"] / tern["model_gb"], 2)}
    if args.compile:  # both compiled, and the best of each
        f16c, ternc = by["fp16, torch.compile"], by["ternary, torch.compile"]
        summary["decode_speedup_compiled"] = round(ternc["decode_tokens_per_s"] / f16c["decode_tokens_per_s"], 2)
        best = lambda *rs: max(r["decode_tokens_per_s"] for r in rs)  # noqa: E731
        summary["decode_speedup_best"] = round(best(tern, ternc) / best(f16, f16c), 2)
    print(summary)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        shape = f"Llama-2-7B shape ({args.layers} layers)" if args.layers != 32 else "Llama-2-7B shape"
        (args.out / "e2e.json").write_text(json.dumps({"model": shape, "rows": rows, **summary}, indent=1) + "\n")
        lines = [f"# End to end: {shape}, random weights", "",
                 f"{f16['device']}, {date}. Batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} "
                 f"new tokens (greedy, static KV cache, one decode step replayed as a CUDA graph). "
                 f"Regenerate: `PYTHONPATH=$PWD python3 benchmarks/e2e.py --compile --out docs/results`; for a "
                 f"model folder: `pt2llm bench DIR [--compile]`.", "",
                 "The ternary model's decoder linears are TernaryLinear modules built from random codes on the "
                 "GPU (not run through `pt2llm quantize --method rtn`, which takes longer than a device call "
                 "for 6.5 B weights; the values do not change the speed). Model memory = parameters and "
                 "buffers on the GPU (GB = 1e9 bytes). Decode-step attention in every row: "
                 + ("pt2llm's split-key Triton kernel (pt2llm.attention; `--attention model` for the model's own "
                    "SDPA)." if args.attention == "pt2llm" else "the model's own (transformers' SDPA)."), "",
                 "| model | prefill tokens/s | decode tokens/s | ms/token | model GB | model GiB | peak GiB |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                         f"{r['decode_ms_per_token']:.2f} | {r['model_gb']:.2f} | {r['model_gib']:.2f} | {r['peak_gib']:.2f} |")
        lines += ["", f"Decode: {summary['decode_speedup']}x fp16; prefill: {summary['prefill_speedup']}x; "
                      f"memory: fp16 / ternary = {summary['memory_ratio']}x."]
        if args.compile:
            lines += ["", f"With the decode step through torch.compile (both models): decode "
                          f"{summary['decode_speedup_compiled']}x fp16; the faster row of each: "
                          f"{summary['decode_speedup_best']}x."]
        (args.out / "e2e.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
