"""Times exp_kernels.matmul variants against fp16 F.linear and the package fused kernel in one
run (CUDA-graph replays, benchmarks/kernels.py graph_us). From the repository root, on a GPU:
    SHAPES=28672x8192 MS=1,16 VARIANTS='[{"programs": 528}, {"fold": true}]' OUT=DIR \
        PYTHONPATH=$PWD python3 docs/results/fused-kernel-2026-11-23/exp_bench.py
writes DIR/exp.json (runN.json here)."""
import sys, json, os, torch, torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import exp_kernels as ek
from kernels import graph_us, make_layer
from pt2llm.kernels import triton_ternary as tt
out = os.environ.get("OUT", "/tmp")
gen = torch.Generator(device="cuda").manual_seed(0)
shapes = [(int(a), int(b)) for a, b in (s.split("x") for s in os.environ.get("SHAPES", "4096x4096,11008x4096,4096x11008,28672x8192,8192x28672").split(","))]
ms = [int(m) for m in os.environ.get("MS", "1,16").split(",")]
variants = json.loads(os.environ["VARIANTS"])
rows = []
for n, k in shapes:
    L = make_layer(n, k, gen)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
        w16 = {"w": torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)}
        fp16 = graph_us(lambda w: F.linear(x, w), w16, reps=7); del w16
        ref = tt.matmul(x, L["packed"], L["alpha"], L["mu"], L["perm"], None, n, 128).float()
        base = graph_us(lambda **c: tt.matmul(x, c["packed"], c["alpha"], c["mu"], c["perm"], None, n, 128), L, reps=7)
        print(f"{n}x{k} M={m} fp16 {fp16:.1f} base {base:.1f} ({fp16/base:.2f}x)", flush=True)
        rows.append(dict(shape=f"{n}x{k}", M=m, variant="fp16", us=fp16)); rows.append(dict(shape=f"{n}x{k}", M=m, variant="base", us=base))
        for v in variants:
            try:
                y = ek.matmul(x, L["packed"], L["alpha"], L["mu"], L["perm"], n, **v).float()
                err = float((y - ref).norm() / ref.norm())
                t = graph_us(lambda **c: ek.matmul(x, c["packed"], c["alpha"], c["mu"], c["perm"], n, **v), L, reps=7)
                print(f"   {v}: {t:.1f} us  fp16/ours {fp16/t:.2f}x  vs base {base/t:.2f}x  err {err:.1e}", flush=True)
                rows.append(dict(shape=f"{n}x{k}", M=m, variant=json.dumps(v), us=t, err=err))
            except Exception as e:
                print(f"   {v}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    del L
json.dump(rows, open(os.path.join(out, "exp.json"), "w"), indent=1)
