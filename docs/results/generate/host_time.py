"""Host time of eager TernaryLinear calls on CUDA against F.linear (fp16, the same shape), M = 1:
2000 calls timed without synchronising (the GPU keeps up, so this is the host's time a call),
then a cProfile of 500 calls of the 11008x4096 layer (generate.md, "Reading the table").
Shapes: a 7B layer's 4096x4096 and 11008x4096, and its q/k/v read as one group
(triton_ternary.linear_group) against three F.linear calls.

    PYTHONPATH=$PWD python3 docs/results/generate/host_time.py [OUT.json] [--no-profile]
"""
import cProfile, io, json, pstats, sys, time
import torch
import torch.nn.functional as F
from pt2llm.nn import TernaryLinear, perm_dtype
from pt2llm import pack
from pt2llm.kernels import triton_ternary

dev = 'cuda'
gen = torch.Generator(device=dev).manual_seed(0)


def make(out_f, in_f):
    t = TernaryLinear(in_f, out_f, False, device=dev)
    codes = torch.randint(-1, 2, (out_f, in_f), device=dev, generator=gen, dtype=torch.int8)
    t.packed.copy_(pack.pack_trit_rows(codes))
    t.alpha.copy_(torch.rand(t.alpha.shape, device=dev, generator=gen) * 0.02 + 0.005)
    t.mu.copy_(torch.randn(t.mu.shape, device=dev, generator=gen) * 0.002)
    t.perm.copy_(torch.randperm(in_f, device=dev, generator=gen).to(perm_dtype(in_f)))
    return t


def host_us(f, n=2000):
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host * 1e6, (time.perf_counter() - t) / n * 1e6


x = torch.randn(1, 1, 4096, device=dev, dtype=torch.float16)
rows = []
with torch.no_grad():
    for out_f in (4096, 11008):
        lin = make(out_f, 4096)
        ref = torch.nn.Linear(4096, out_f, bias=False, device=dev, dtype=torch.float16)
        for f, name in ((ref, 'F.linear'), (lin, 'TernaryLinear')):
            host, wall = host_us(lambda: f(x))
            rows.append({"shape": f"{out_f}x4096", "what": name, "host_us": round(host, 1), "wall_us": round(wall, 1)})
            print(rows[-1], flush=True)
    qkv = [make(4096, 4096) for _ in range(3)]
    refs = [torch.nn.Linear(4096, 4096, bias=False, device=dev, dtype=torch.float16) for _ in range(3)]
    layers = [(t.packed, t.alpha, t.mu, t.perm, t.bias, t.out_features) for t in qkv]
    for f, name in ((lambda: [F.linear(x, r.weight) for r in refs], '3 x F.linear'),
                    (lambda: triton_ternary.linear_group(x, layers, 128), 'linear_group (one launch)')):
        host, wall = host_us(f)
        rows.append({"shape": "3x4096x4096", "what": name, "host_us": round(host, 1), "wall_us": round(wall, 1)})
        print(rows[-1], flush=True)
    if "--no-profile" not in sys.argv:
        lin = make(11008, 4096)
        pr = cProfile.Profile(); pr.enable()
        for _ in range(500): lin(x)
        pr.disable(); torch.cuda.synchronize()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats('tottime').print_stats(15); print(s.getvalue()[:5000])
out = [a for a in sys.argv[1:] if not a.startswith("--")]
if out:
    json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "rows": rows}, open(out[0], "w"), indent=1)
