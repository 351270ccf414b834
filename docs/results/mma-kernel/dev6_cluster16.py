"""Dev 6: clusters of 16 (non-portable) for the long-split shapes, launched with cuLaunchKernelEx
(runtime cluster dims), against the package's default and its cluster of 8."""
import os, sys, json, ctypes
import torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import kernels as bk
from kernels import paired_us as paired  # the runs used an equivalent helper with 21 replays instead of 15
from pt2llm.kernels import cuda_ternary as ct
from torch.cuda._utils import _get_gpu_runtime_library
BASE = ct._SRC
SRC = BASE.replace("#if CL > 1\n#define CLUSTER __cluster_dims__(1, CL, 1)", "#if CL > 1 && !defined(CL_RUNTIME)\n#define CLUSTER __cluster_dims__(1, CL, 1)")
assert SRC != BASE
lib = _get_gpu_runtime_library()


class Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("val", ctypes.c_uint * 16)]


class Cfg(ctypes.Structure):
    _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint),
                ("bx", ctypes.c_uint), ("by", ctypes.c_uint), ("bz", ctypes.c_uint),
                ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(Attr)),
                ("nattrs", ctypes.c_uint)]


class ExKernel:
    def __init__(self, k, cl):
        self.k, self.cl = k, cl
        rc = lib.cuFuncSetAttribute(k.func, 14, 1)  # NON_PORTABLE_CLUSTER_SIZE_ALLOWED
        assert rc == 0, rc

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        keep, c_args = [], []
        for a in args:
            if isinstance(a, torch.Tensor):
                p = ctypes.c_void_p(a.data_ptr())
            else:
                p = ctypes.c_int(a)
            keep.append(p)
            c_args.append(ctypes.cast(ctypes.byref(p), ctypes.c_void_p))
        arr = (ctypes.c_void_p * len(c_args))(*c_args)
        at = Attr()
        at.id = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        at.val[0], at.val[1], at.val[2] = 1, self.cl, 1
        cfg = Cfg(grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_mem,
                  ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), ctypes.pointer(at), 1)
        rc = lib.cuLaunchKernelEx(ctypes.byref(cfg), self.k.func, arr, None)
        assert rc == 0, rc


gen = torch.Generator(device="cuda").manual_seed(0)
res = []
real = ct._kernel
cap = torch.cuda.get_device_capability()
cases = [("4096x11008", [4096], 11008), ("4096x4096", [4096], 4096), ("8192x28672", [8192], 28672),
         ("gateup7B", [11008] * 2, 4096), ("11008x4096", [11008], 4096)]
for name, outs, K in cases:
    Ls = [bk.make_layer(n, K, gen) for n in outs]
    tens = {f"{key}{i}": L[key] for i, L in enumerate(Ls) for key in ("packed", "alpha", "mu", "perm")}
    lay = lambda c: [(c[f"packed{i}"], c[f"alpha{i}"], c[f"mu{i}"], c[f"perm{i}"], None, n) for i, n in enumerate(outs)]
    NB = -(-K // 128)
    for m in (1, 16) if name != "8192x28672" else (1,):
        x = torch.randn(m, K, device="cuda", dtype=torch.float16, generator=gen)
        row = {"case": name, "M": m}
        variants = {"default": (lambda **c: ct.matmul_group(x, lay(c)), tens)}
        st = ct._settings(sum(outs), K, {})
        for cl in (11, 13, 15, 16):
            s = ct._final_splits(NB, cl)
            if s != cl:
                row[f"c{cl}"] = f"splits {s}"
                continue
            ct._SRC = SRC
            try:
                k = ct._compile(f"ternary_mma<{1 if m <= 8 else 2}, {'true' if m == 1 else 'false'}>", cap,
                                tuple(ct.options(st["warps"], st["minb"], cl) + ["-DCL_RUNTIME"]))
            finally:
                ct._SRC = BASE
            try:
                ex = ExKernel(k, cl)
            except AssertionError as e:
                row[f"c{cl}"] = f"attr failed {e}"
                continue
            orig_check = ct.CLUSTER_MAX

            def f(ex=ex, cl=cl, **c):
                ct._kernel = lambda *a, **kw: ex
                ct.CLUSTER_MAX = 16
                try:
                    return ct.matmul_group(x, lay(c), splits=cl, cluster=True)
                finally:
                    ct._kernel = real
                    ct.CLUSTER_MAX = orig_check
            try:
                got = f(**tens)
                torch.cuda.synchronize()
            except Exception as e:
                row[f"c{cl}"] = f"launch failed {e!r}"[:200]
                continue
            want = ct.matmul_group(x, lay(tens), splits=cl, cluster=False)
            row[f"c{cl}_same"] = all(torch.equal(a, b) for a, b in zip(got, want))
            variants[f"c{cl}"] = (f, tens)
        t = paired(variants)
        row.update({k: round(v, 2) for k, v in t.items()})
        res.append(row)
        print(json.dumps(row), flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "dev6.json"), "w"), indent=1)
