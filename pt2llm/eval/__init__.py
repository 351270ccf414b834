"""Evaluation: perplexity by GPTQ's protocol (`perplexity`) and zero-shot tasks through
lm-eval (`tasks`); `evaluate` runs both on one loaded model."""
from __future__ import annotations


def evaluate(model, tokenizer, ppl_sets, task_names, *, seqlen: int = 2048, limit_windows: int | None = None,
             limit: int | None = None, batch_size: int = 32, device="cpu", progress: bool = True) -> dict:
    """{set: perplexity result for each of ppl_sets, "tasks": task results if task_names}."""
    from . import tasks
    from .perplexity import perplexity

    out = {s: perplexity(model, tokenizer, s, seqlen=seqlen, limit_windows=limit_windows, device=device,
                         progress=progress) for s in ppl_sets}
    if task_names:
        out["tasks"] = tasks.evaluate(model, tokenizer, list(task_names), limit=limit, batch_size=batch_size,
                                      device=device, progress=progress)
    return out
