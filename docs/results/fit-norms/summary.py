"""Prints README.md's table from runs/*.json: WikiText-2 perplexity, the calibration logit error
before and after the lm_head refit (the quantize report's `fit_head`), and quantization time,
without and with --fit-norms. Usage: python3 summary.py (from this folder)."""
import json
from pathlib import Path

RUNS = Path(__file__).parent / "runs"
MODELS = {"smol": "SmolLM2-135M", "qwen": "Qwen2.5-Coder-0.5B"}


def run(model: str, seed: int, variant: str):
    stem = RUNS / f"{model}-seed{seed}-{variant}"
    ppl = json.loads(stem.with_suffix(".eval.json").read_text())["results"][0]["wikitext2"]["ppl"]
    quant = json.loads(stem.with_suffix(".quant.json").read_text())
    head = quant["fit_head"]
    return ppl, head["logit_error_before"], head["logit_error_after"], quant["wall_seconds"]


def change(a: float, b: float) -> str:
    return f"{100 * (b / a - 1):+.1f} %"


for model, name in MODELS.items():
    for seed in range(3):
        if not (RUNS / f"{model}-seed{seed}-base.eval.json").exists():
            continue
        (p0, b0, a0, t0), (p1, b1, a1, t1) = run(model, seed, "base"), run(model, seed, "norms")
        print(f"| {name} | {seed} | {p0:.1f} | {p1:.1f} | {change(p0, p1)} | {b0:.5f} -> {b1:.5f} ({change(b0, b1)}) "
              f"| {a0:.5f} -> {a1:.5f} ({change(a0, a1)}) | {t0:.0f} / {t1:.0f} |")
