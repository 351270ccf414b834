"""One row of sessions 22's and 23's A/Bs (docs/results/e2e.md): the compiled ternary decode step of
benchmarks/e2e.py's Llama-2-7B-shaped model, with the pt2llm package found on PYTHONPATH
(so that an older tree can be timed in its own process). Prints one line, "AB {json}".

    PYTHONPATH=$PWD python3 docs/results/e2e-fusion/ab.py TAG [--no-glu] [--no-norm] [--no-cache-write]
                                                              [--fp16] [--eager] [--eager-only] [--no-fused-norms]
                                                              [--no-fused-decode] [--no-pdl]

--no-glu / --no-norm / --no-cache-write switch off that rewrite of ops.backend (fuse_glu,
fuse_norm, fuse_cache_write: session 23); --fp16 also times the fp16 model
compiled, --eager the ternary model uncompiled, --eager-only that alone; --no-fused-norms runs
the uncompiled step with transformers' own RMSNorm forward (no nn.fused_norms), --no-fused-decode
with transformers' own attention forward (no attention.fused_decode: session 23); --no-pdl
makes no ternary launch a dependent one (PT2LLM_PDL=0: session 24). Run from the repository
root on a GPU.
"""
import json
import os
import sys

sys.path.insert(1, os.path.join(os.getcwd(), "benchmarks"))
import torch  # noqa: E402

import e2e  # noqa: E402
import pt2llm  # noqa: E402
from pt2llm import speed  # noqa: E402
from pt2llm.kernels import ops  # noqa: E402

tag = sys.argv[1]
if "--no-pdl" in sys.argv:
    os.environ["PT2LLM_PDL"] = "0"
if "--no-glu" in sys.argv:
    ops.fuse_glu = lambda gm: 0
if "--no-norm" in sys.argv:
    ops.fuse_norm = lambda gm: 0
if "--no-cache-write" in sys.argv:
    ops.fuse_cache_write = lambda gm: 0
if "--no-fused-norms" in sys.argv:
    import contextlib

    import pt2llm.nn
    pt2llm.nn.fused_norms = lambda model: contextlib.nullcontext([])
if "--no-fused-decode" in sys.argv:
    import contextlib

    import pt2llm.attention
    pt2llm.attention.fused_decode = lambda model: contextlib.nullcontext([])
torch.manual_seed(0)
gen = torch.Generator(device="cuda").manual_seed(0)
model = e2e.fp16_model(32)
out = {"tag": tag, "pkg": pt2llm.__file__}
if "--fp16" in sys.argv:
    torch._dynamo.reset()
    out["fp16c"] = speed.measure(model, 128, 256, 1, compile=True)["decode_tokens_per_s"]
e2e.ternarize(model, gen)
if "--eager" in sys.argv or "--eager-only" in sys.argv:
    r = speed.measure(model, 128, 256, 1)
    out["tern"], out["tern_ms"] = r["decode_tokens_per_s"], r["decode_ms_per_token"]
if "--eager-only" in sys.argv:
    print("AB", json.dumps(out), flush=True)
    sys.exit(0)
torch._dynamo.reset()
r = speed.measure(model, 128, 256, 1, compile=True)
out["ternc"], out["ternc_ms"] = r["decode_tokens_per_s"], r["decode_ms_per_token"]
print("AB", json.dumps(out), flush=True)
