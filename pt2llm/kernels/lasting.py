"""Device tensors that a cache keeps for the life of the process (split-K counters, small
transform factors), made so that no CUDA-graph memory pool holds them.

torch.compile's CUDA graphs ("reduce-overhead", which transformers' generate turns on with
cache_implementation="static") first run a function once with the new allocations of the
calling thread routed to the graph tree's memory pool, then capture it. A cached tensor made
during that first run would sit in the pool without being an output of the function, and the
tree refuses that ("tensor(s) in the cudagraph pool not tracked as outputs"). So `make` runs
in a helper thread, on a side stream, and waits for it. Under a capture itself (a plain
torch.cuda.graph that meets the cache empty) the tensor is made where it is, in that graph's
pool, which it then keeps alive; its making (a memset, a copy) is part of the graph and runs
again at each replay. While dynamo traces, the making is traced like any other code.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch


def make(fn: Callable[[], torch.Tensor], device) -> torch.Tensor:
    """fn() (which makes a tensor on `device`), outside any memory pool that routes the current
    thread's or stream's allocations; on the CPU, while the current stream captures, or while
    dynamo traces, just fn()."""
    device = torch.device(device)
    if torch.compiler.is_compiling() or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return fn()
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.current_stream(device).synchronize()  # fn may read what the stream is writing
    made: list = []

    def run():
        try:
            side = torch.cuda.Stream(device)
            with torch.cuda.device(device), torch.cuda.stream(side):
                made.append(fn())
            side.synchronize()
        except BaseException as e:  # handed to the caller below
            made.append(e)

    t = threading.Thread(target=run, name="pt2llm-lasting")
    t.start()
    t.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]
