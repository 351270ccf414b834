"""Host time of one eager TernaryLinear call (11008x4096, M = 1) against F.linear on CUDA:
2000 calls timed without synchronising, then cProfile of 500 (generate.md, "Reading the table").

    PYTHONPATH=$PWD python3 docs/results/generate/host_time.py
"""
import cProfile, io, pstats, time
import torch
from pt2llm.nn import TernaryLinear, perm_dtype
from pt2llm import pack

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
lin = make(11008, 4096)
ref = torch.nn.Linear(4096, 11008, bias=False, device=dev, dtype=torch.float16)
x = torch.randn(1, 1, 4096, device=dev, dtype=torch.float16)
with torch.no_grad():
    for f, name in ((ref, 'F.linear'), (lin, 'ternary')):
        for _ in range(20): f(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(2000): f(x)
        host = (time.perf_counter() - t) / 2000
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 2000
        print(f"{name}: host {host*1e6:.1f} us/call, wall {wall*1e6:.1f} us/call", flush=True)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(500): lin(x)
    pr.disable(); torch.cuda.synchronize()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats('cumulative').print_stats(35); print(s.getvalue()[:9000])
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats('tottime').print_stats(25); print(s.getvalue()[:7000])
