"""Opt-in stage timers for benchmarks: `with stage("itf"): ...` adds the seconds spent to
the dict given to `record()`; with no recording active it costs nothing. On CUDA the
device is synchronised around each stage so the seconds are the device's."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

_acc: dict | None = None


@contextmanager
def record():
    """Collect stage seconds inside the block: `with record() as seconds: ...`."""
    global _acc
    prev, _acc = _acc, defaultdict(float)
    try:
        yield _acc
    finally:
        _acc = prev


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def stage(name: str):
    if _acc is None:
        yield
        return
    _sync()
    t = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        _acc[name] += time.perf_counter() - t
