"""Dev 13 (session 17): the cluster's exit barrier with a relaxed arrival, against the package
kernel and an identical copy of it (base2, a noise check), paired (dev_variants.run). Run from the
repository root on a GPU, at commit 6902f32 (the source it patches; 0e7f075 adopted the change).
"""
import os
import sys

sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "benchmarks"), os.path.dirname(os.path.abspath(__file__))]
from dev_variants import Variant, run  # noqa: E402

from pt2llm.kernels import cuda_ternary as ct  # noqa: E402

BASE = ct._SRC
EXIT_OLD = "  cluster_sync();                  // no CTA leaves while another may still read its sums\n"
EXIT_NEW = """#ifdef RELAXED_EXIT
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\\n\\tbarrier.cluster.wait.aligned;" ::: "memory");
#else
  cluster_sync();
#endif
"""
assert BASE.count(EXIT_OLD) == 1
SRC = BASE.replace(EXIT_OLD, EXIT_NEW)

if __name__ == "__main__":
    run({"base": Variant(BASE), "relaxed": Variant(SRC, ("-DRELAXED_EXIT",)), "base2": Variant(BASE)},
        "dev13.json", identical=True)
