"""benchmarks/tune_cuda.tune at M = 1 on a 7B layer's four launches, as dependent launches and as plain
ones (docs/results/e2e-pdl/README.md, run 11).

    PYTHONPATH=$PWD python3 docs/results/e2e-pdl/tune_dep.py
"""
import json, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import tune_cuda
from pt2llm.kernels.dependent import dependent_launches
shapes = [tune_cuda.parse_shape(s) for s in ("4096+4096+4096x4096", "4096x4096", "11008+11008x4096", "4096x11008")]
out = {}
for dep in (True, False):
    with dependent_launches(dep):
        rows, _ = tune_cuda.tune(shapes, ms=(1,), reps=15)
    out["dependent" if dep else "plain"] = rows
print("TUNEDEP", json.dumps(out))
