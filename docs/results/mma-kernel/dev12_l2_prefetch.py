"""Dev 12: L2 prefetch of the codes (cp.async.bulk.prefetch.L2, sm_90): no registers, no shared
memory. pfall: at the start each warp asks L2 for all its rows' codes of its split range (16
contiguous runs of per_split * 128 bytes); roll2 / roll4: in the loop, block it + 2 / it + 4.
Against the package kernel, paired (dev_variants.run). Run from the repository root on a GPU, at
commit 6902f32 (the source it patches).
"""
import os
import sys

sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "benchmarks"), os.path.dirname(os.path.abspath(__file__))]
from dev_variants import Variant, run  # noqa: E402

from pt2llm.kernels import cuda_ternary as ct  # noqa: E402

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

if __name__ == "__main__":
    run({"base": Variant(BASE), "pfall": Variant(SRC, ("-DPF_ALL",)), "roll2": Variant(SRC, ("-DPF_ROLL=2",)),
         "roll4": Variant(SRC, ("-DPF_ROLL=4",)), "all_roll4": Variant(SRC, ("-DPF_ALL", "-DPF_ROLL=4"))},
        "dev12.json", identical=True)
