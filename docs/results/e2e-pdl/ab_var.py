"""Session 24's dev variants of docs/results/e2e-fusion/ab.py (docs/results/e2e-pdl/README.md),
patched into the package before it builds its kernels:

    PYTHONPATH=$PWD python3 docs/results/e2e-pdl/ab_var.py TAG [ab.py's flags] [--l2pf] [--no-cols]
                                                           [--slots-minus N] [--oproj-plain]

--l2pf: each lane asks L2 for its rows' codes of the CTA's later blocks before the wait;
--no-cols: the kernel built for dependent launches does not stage the column order before its
wait; --slots-minus N: every launch setting aims at N CTAs an SM fewer (room for the next
launch's CTAs); --oproj-plain: a 7B layer's o_proj (the one 4096x4096 launch of one layer)
stays a plain launch."""
import runpy, sys
from pt2llm.kernels import cuda_ternary as c
args = sys.argv[1:]
if "--l2pf" in args:
    old = "  fetch(b0);\n\n  // the (alpha, mu)"
    assert old in c._SRC
    c._SRC = c._SRC.replace(old, """  fetch(b0);
  for (int blk = b0 + 1; blk < b1; ++blk) {
    if (okA && blk * 128 + 32 * t < K) asm volatile("prefetch.global.L2 [%0];" :: "l"(rowA + blk * 128));
    if (okB && blk * 128 + 32 * t < K) asm volatile("prefetch.global.L2 [%0];" :: "l"(rowB + blk * 128));
  }

  // the (alpha, mu)""")
    args.remove("--l2pf")
if "--no-cols" in args:
    old = "const bool cols = DEP && K < 0xFFFF;"
    assert old in c._SRC
    c._SRC = c._SRC.replace(old, "const bool cols = false;")
    args.remove("--no-cols")
if "--slots-minus" in args:
    i = args.index("--slots-minus"); f = int(args[i + 1]); del args[i:i + 2]
    tab = c.tuned_table()
    import copy
    t2 = copy.deepcopy(tab)
    for gpu in t2.values():
        for b in gpu.values():
            for st in b.values():
                st["slots"] = max(132, st["slots"] - 132 * f)
    for k in ("small", "large"):
        c.TUNING[k]["slots"] = max(132, c.TUNING[k]["slots"] - 132 * f)
    c.tuned_table = lambda: t2
if "--oproj-plain" in args:
    from pt2llm.kernels import dependent as dep
    prep = c.prepare
    def prepare(x2, layers, *a, **k):
        if len(layers) == 1 and layers[0][5] == 4096 and x2.shape[1] == 4096:
            with dep.dependent_launches(False):
                return prep(x2, layers, *a, **k)
        return prep(x2, layers, *a, **k)
    c.prepare = prepare
    args.remove("--oproj-plain")
sys.argv = ["ab.py"] + args
runpy.run_path("docs/results/e2e-fusion/ab.py", run_name="__main__")
