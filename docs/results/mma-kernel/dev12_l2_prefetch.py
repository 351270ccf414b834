"""Dev 12: L2 prefetch of the codes (cp.async.bulk.prefetch.L2, sm_90): no registers, no shared
memory. pfall: at the start each warp asks L2 for all its rows' codes of its split range (16
contiguous runs of per_split * 128 bytes); roll2 / roll4: in the loop, block it + 2 / it + 4.
Against the package kernel, paired. M = 1, 4, 16; the six shapes and the four groups."""
import os, sys, json, functools
import torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import kernels as bk
from pt2llm.kernels import cuda_ternary as ct, triton_ternary as tt

BASE = ct._SRC
ALL = r'''  fetch(b0);
#if __CUDA_ARCH__ >= 900 && defined(PF_ALL)
  if (t < 2 && (t == 0 ? okA : okB)) {   // lane (g, 0): row pA's run of this split; (g, 1): pB's
    const int lo = b0 * 128, hi = min(b1 * 128, K);
    if (hi > lo + 128)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"((t == 0 ? rowA : rowB) - 32 * t + lo + 128), "r"(hi - lo - 128) : "memory");
  }
#endif
'''
ROLL = r'''    if (it + 1 < nblk) fetch(b0 + it + 1);
#if __CUDA_ARCH__ >= 900 && defined(PF_ROLL)
    if (it + PF_ROLL < nblk && t < 2 && (t == 0 ? okA : okB) && (b0 + it + PF_ROLL) * 128 < K)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], 128;" :: "l"((t == 0 ? rowA : rowB) - 32 * t + (b0 + it + PF_ROLL) * 128) : "memory");
#endif
'''
SRC = BASE.replace("  fetch(b0);\n", ALL, 1).replace("    if (it + 1 < nblk) fetch(b0 + it + 1);\n", ROLL, 1)
assert SRC.count("PF_ALL") == 1 and SRC.count("PF_ROLL") == 4
# note: a block of the run may be shorter than 128 bytes only at K's end (hi clips it)
VARIANTS = {"base": None, "pfall": "-DPF_ALL", "roll2": "-DPF_ROLL=2", "roll4": "-DPF_ROLL=4", "all_roll4": ("-DPF_ALL", "-DPF_ROLL=4")}
CHOICE = ["base"]


@functools.cache
def comp(choice, name, capability, opts):
    extra = VARIANTS[choice]
    extra = [] if extra is None else ([extra] if isinstance(extra, str) else list(extra))
    return torch.cuda._compile_kernel(SRC, name, compute_capability=f"{capability[0]}{capability[1]}",
                                      nvcc_options=list(opts) + extra)


ct._compile = lambda name, capability, opts: comp(CHOICE[0], name, capability, opts)


def fn_for(choice, call):
    def fn(**c):
        CHOICE[0] = choice
        return call(c)
    return fn


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
    for n, k in shapes:
        L = bk.make_layer(n, k, gen)
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            errs = {}
            ref = None
            for ch in VARIANTS:
                CHOICE[0] = ch
                y = ct.matmul(x, L["packed"], L["alpha"], L["mu"], L["perm"], None, n)
                errs[ch] = bk.check(L, x, y)
                if ref is None:
                    ref = y
                assert torch.equal(y, ref), ch   # a prefetch changes no value
            tens = {key: L[key] for key in ("packed", "alpha", "mu", "perm")}
            call = lambda c: ct.matmul(x, c["packed"], c["alpha"], c["mu"], c["perm"], None, n)
            t = bk.paired_us({ch: (fn_for(ch, call), tens) for ch in VARIANTS})
            row = {"shape": f"{n}x{k}", "M": m, **{f"{c}_us": round(u, 2) for c, u in t.items()},
                   **{f"{c}_speedup": round(t["base"] / t[c], 3) for c in VARIANTS if c != "base"},
                   "err": float(f"{errs['base']:.2e}")}
            rows.append(row)
            print(row, flush=True)
        del L
    for name, (outs, k) in bk.GROUPS.items():
        Ls = [bk.make_layer(n, k, gen) for n in outs]
        tens, layers = bk.group_tensors(Ls, outs)
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            call = lambda c: tt.linear_group(x, layers(c), 128)
            outs_ = {}
            for ch in VARIANTS:
                CHOICE[0] = ch
                outs_[ch] = call(tens)
            assert all(torch.equal(a, b) for ch in VARIANTS for a, b in zip(outs_[ch], outs_["base"]))
            t = bk.paired_us({ch: (fn_for(ch, call), tens) for ch in VARIANTS})
            row = {"group": name, "M": m, **{f"{c}_us": round(u, 2) for c, u in t.items()},
                   **{f"{c}_speedup": round(t["base"] / t[c], 3) for c in VARIANTS if c != "base"}}
            rows.append(row)
            print(row, flush=True)
        del Ls, tens
    out = os.environ.get("OUT", "/tmp")
    json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(f"{out}/dev12.json", "w"), indent=1)


if __name__ == "__main__":
    main()
