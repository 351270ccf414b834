import os, sys, torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import kernels as bk
from pt2llm.kernels import cuda_ternary as ct
gen = torch.Generator(device="cuda").manual_seed(0)
outs, K = [28672], 8192
Ls = [bk.make_layer(n, K, gen) for n in outs]
x = torch.randn(1, K, device="cuda", dtype=torch.float16, generator=gen)
lay = [(L["packed"], L["alpha"], L["mu"], L["perm"], None, n) for L, n in zip(Ls, outs)]
for _ in range(4):
    ct.matmul_group(x, lay)
torch.cuda.synchronize()
