"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p and
min-p; either with a repetition penalty.

The rules are transformers' (RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper and MinPLogitsWarper, in that order): the logit l of every
token already in the sequence (prompt or generated) becomes l / penalty where l > 0 and
l * penalty where not (greedy decoding too); then the logits are divided by the temperature,
only the k largest are kept, of those only the fewest largest whose probabilities sum to at
least top_p (always the largest one), and of those only the tokens whose probability is at
least min_p times the largest one's. A token is then drawn from the softmax of what is left by the
Gumbel-max rule, argmax(z - log E) with E = -log U ~ Exp(1), which draws exactly from
softmax(z) and needs no data-dependent shapes, so it runs inside a CUDA graph (speed.Decoder).
U is drawn in float64 (53 random bits): 0 < E < inf but for a chance of 2^-53 a token, where
float32's 24 bits would put E = 0, and with it a forced pick, on one token in 2^24. The noise
comes from a torch.Generator, so a seed gives the same tokens again on the same device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax; top_k, top_p and min_p then play no part); top_k 0
    keeps every token; top_p 1 keeps every token that top_k kept; min_p 0 every token that
    top_p kept; repetition_penalty 1 is off (above 1 discourages repeats, below 1 favours them)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0: off), got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1: off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether the repetition penalty is on (next_tokens then needs the tokens seen)."""
        return self.repetition_penalty != 1

    def describe(self) -> str:
        penalty = f"repetition penalty {self.repetition_penalty:g}" if self.penalised else ""
        if self.greedy:
            return f"greedy ({penalty})" if penalty else "greedy"
        parts = [f"temperature {self.temperature:g}"]
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.top_p < 1:
            parts.append(f"top-p {self.top_p:g}")
        if self.min_p > 0:
            parts.append(f"min-p {self.min_p:g}")
        if penalty:
            parts.append(penalty)
        return "sampled (" + ", ".join(parts) + f", seed {self.seed})"


GREEDY = Sampling()


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty on logits [..., V] (float32): where seen [..., V] (bool) is set,
    l / penalty for l > 0 and l * penalty otherwise."""
    z = logits.float()
    return torch.where(seen, torch.where(z > 0, z / penalty, z * penalty), z)


def candidates(logits: torch.Tensor, s: Sampling) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z, ids) for logits [..., V] (after any penalty): z the tempered logits of the tokens
    still in the draw (-inf for those top_p or min_p removed), ids their token ids ([..., k];
    None when z covers the whole vocabulary in order). Not for greedy."""
    z = logits.float() / s.temperature
    ids = None
    if s.top_k and s.top_k < z.shape[-1]:
        z, ids = z.topk(s.top_k, dim=-1)  # sorted, largest first
    if s.top_p < 1:
        if ids is None:
            z, ids = z.sort(dim=-1, descending=True)
        p = z.softmax(-1)
        before = p.cumsum(-1) - p  # the mass of the larger tokens: drop once it reaches top_p
        z = z.masked_fill(before >= s.top_p, float("-inf"))
    if s.min_p > 0:
        p = z.softmax(-1)
        z = z.masked_fill(p < s.min_p * p.amax(-1, keepdim=True), float("-inf"))
    return z, ids


def _scores(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None) -> torch.Tensor:
    if not s.penalised:
        return logits
    if seen is None:
        raise ValueError("a repetition penalty needs the tokens seen so far (seen)")
    return penalise(logits, seen, s.repetition_penalty)


def probabilities(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution next_tokens draws from, over the whole vocabulary [..., V] (float32);
    seen as next_tokens takes it."""
    logits = _scores(logits, s, seen)
    if s.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    z, ids = candidates(logits, s)
    p = z.softmax(-1)
    return p if ids is None else torch.zeros(logits.shape, device=p.device).scatter(-1, ids, p)


def next_tokens(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row of logits [B, V], as [B, 1] (long). seen [B, V] (bool): the
    tokens already in each sequence, which the repetition penalty needs."""
    logits = _scores(logits, s, seen)
    if s.greedy:
        return logits.argmax(-1, keepdim=True)
    z, ids = candidates(logits, s)
    u = torch.rand(z.shape, dtype=torch.float64, device=z.device, generator=generator)
    pick = (z.double() - (-u.log()).log()).argmax(-1, keepdim=True)
    return pick if ids is None else ids.gather(-1, pick)
