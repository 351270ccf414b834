"""Programmatic dependent launch of the ternary kernel (cuda_ternary), and when it is safe.

On sm_90 a kernel launched as a programmatic dependent may start its CTAs before the kernel
ahead of it on the stream has finished: as soon as that kernel lets it (the ternary kernel
lets its successor start once it has itself waited for its predecessor; a kernel that says
nothing, once its CTAs have exited) and an SM has room. Its CTAs then load what does not
depend on that kernel (here weights: the first block's codes, the CTAs' (alpha, mu) pairs and
column order) and wait (`griddepcontrol.wait`) for it to complete before they read anything
else. Consecutive ternary launches of a compiled decode step (gate/up after o_proj, down after
gate/up, the next layer's q/k/v after down) so hide most of each launch's start behind the
previous one's end.

What a CTA reads before its wait may be written by the kernel just before it without the write
being seen. So launches are dependent only where the weights stay fixed, inside
`dependent_launches()`: speed.Decoder's compiled decode step (pt2llm bench / generate
--compile) turns it on; there a 7B-shape step decodes 12 % faster (docs/results/e2e.md,
session 24). Not in the uncompiled step, where every ternary launch follows another kernel (a
norm, the attention, the SiLU product) and dependent launches measured 3 % slower.
PT2LLM_PDL=0 turns it off everywhere.
"""
from __future__ import annotations

import contextlib
import os
import threading

_STATE = threading.local()


@contextlib.contextmanager
def dependent_launches(on: bool = True):
    """Within it (on this thread), the ternary kernel's launches that cuda_ternary.prepare
    makes are dependent launches (see the module docstring); launches prepared before keep what
    they were prepared as."""
    before = getattr(_STATE, "on", False)
    _STATE.on = on
    try:
        yield
    finally:
        _STATE.on = before


def dependent_launch() -> bool:
    """Whether launches prepared here are dependent (inside dependent_launches, unless
    PT2LLM_PDL=0)."""
    return getattr(_STATE, "on", False) and os.environ.get("PT2LLM_PDL", "1") != "0"
