"""transformers' eager generate loop (dynamic cache, greedy) on the Llama-2-7B-shaped model of
benchmarks/e2e.py (random weights): fp16, the ternary model with this tree's pt2llm, and the
ternary model with an older copy of the package (A/B), and this tree's ternary model inside
`pt2llm.nn.grouped` (q/k/v and gate/up computed together), in one process, their calls interleaved,
because this loop is bound by the host and the host's speed drifts by tens of percent within a
run. Each decode step's wall time is stamped by a stopping criterion; reported per model: the
10th percentile and the median step over all rounds, and tokens/s at each.

    git archive OLD_COMMIT pt2llm | tar -x -C /tmp/old   # then rename its ops' namespace:
    sed -i 's/pt2llm::/pt2llmold::/; s/"pt2llm"/"pt2llmold"/' /tmp/old/pt2llm/kernels/ops.py
    mv /tmp/old/pt2llm /tmp/old/pt2llm_old
    PYTHONPATH=$PWD:/tmp/old python3 docs/results/generate/hf_eager_ab.py OUT.json [ROUNDS] [NEW_TOKENS]
"""
import contextlib, importlib, json, statistics, sys, time
sys.path.insert(0, "benchmarks")
import torch, e2e
from transformers import StoppingCriteria, StoppingCriteriaList
from pt2llm.nn import grouped

out = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
new = int(sys.argv[3]) if len(sys.argv) > 3 else 128
torch.manual_seed(0)
gen = torch.Generator(device="cuda").manual_seed(0)
prompt = torch.randint(0, 32000, (1, 128), device="cuda", generator=gen)


def ternarize(model, package):
    nn, pack = importlib.import_module(f"{package}.nn"), importlib.import_module(f"{package}.pack")
    g = torch.Generator(device="cuda").manual_seed(1)
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                t = nn.TernaryLinear(lin.in_features, lin.out_features, False, device="cuda")
                t.packed.copy_(pack.pack_trit_rows(torch.randint(-1, 2, (lin.out_features, lin.in_features),
                                                                  device="cuda", generator=g, dtype=torch.int8)))
                t.alpha.copy_(torch.rand(t.alpha.shape, device="cuda", generator=g) * 0.02 + 0.005)
                t.mu.copy_(torch.randn(t.mu.shape, device="cuda", generator=g) * 0.002)
                t.perm.copy_(torch.randperm(lin.in_features, device="cuda", generator=g).to(t.perm.dtype))
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, t)
    torch.cuda.empty_cache()
    return model


models = {"fp16": e2e.fp16_model(32), "ternary, this tree": ternarize(e2e.fp16_model(32), "pt2llm")}
try:
    models["ternary, older copy"] = ternarize(e2e.fp16_model(32), "pt2llm_old")
except ImportError:
    print("no pt2llm_old on the path: A/B without the older copy", flush=True)


class Stamp(StoppingCriteria):
    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores, **kw):
        self.t.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


runs = {name: (model, contextlib.nullcontext) for name, model in models.items()}
runs["ternary, this tree, nn.grouped"] = (models["ternary, this tree"], lambda: grouped(models["ternary, this tree"]))
steps = {name: [] for name in runs}
for r in range(rounds + 1):  # round 0 warms up
    for name, (model, context) in runs.items():
        s = Stamp()
        with context():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([s]))
        if r:
            steps[name] += [(b - a) * 1e3 for a, b in zip(s.t, s.t[1:])]
rows = []
for name, d in steps.items():
    p10, med = statistics.quantiles(d, n=10)[0], statistics.median(d)
    rows.append({"model": name, "steps": len(d), "p10_ms": round(p10, 2), "median_ms": round(med, 2),
                 "tokens_per_s_p10": round(1e3 / p10, 1), "tokens_per_s_median": round(1e3 / med, 1)})
    print(rows[-1], flush=True)
json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "rounds": rounds, "new_tokens": new, "rows": rows}, open(out, "w"), indent=1)
