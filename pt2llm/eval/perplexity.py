"""Perplexity by GPTQ's protocol: the whole test text tokenized once, cut into
non-overlapping windows of seqlen tokens (the tail shorter than seqlen is dropped),
each window scored on its own; perplexity = exp(mean token NLL over all windows)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import data


@torch.no_grad()
def perplexity(model, tokenizer, name: str, *, seqlen: int = 2048, limit_windows: int | None = None,
               device="cpu", progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    ids = data.tokenize(tokenizer, data.eval_text(name))
    n = ids.numel() // seqlen
    if n == 0:
        raise data.DataError(f"{name}: {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit_windows is not None:
        n = min(n, limit_windows)
    total = 0.0
    for i in tqdm(range(n), desc=f"ppl {name}", unit="win", disable=not progress):
        x = ids[i * seqlen:(i + 1) * seqlen][None].to(device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, x[0, 1:], reduction="mean").item()
    nll = total / n
    return {"dataset": name, "ppl": math.exp(nll) if nll < 700 else float("inf"), "nll": nll,
            "windows": n, "seqlen": seqlen, "tokens": int(ids.numel())}
