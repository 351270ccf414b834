"""Which layers of a rotated ternary model cost the most: each decoder layer (and each kind of
linear across all layers) put back to the rotated float model's, WikiText-2 perplexity each."""
import json, sys, time
import torch
from pt2llm import checkpoint
from pt2llm.model import sources
from pt2llm.rotate import fold
from pt2llm.eval.perplexity import perplexity

qdir, fspec, out = sys.argv[1:4]
limit = int(sys.argv[4]) if len(sys.argv) > 4 else None
dev = "cuda" if torch.cuda.is_available() else "cpu"
Q, tok = checkpoint.load(qdir, device=dev)
seed = json.load(open(f"{qdir}/config.json"))["quantization_config"].get("seed", 0)
F, _, _ = sources.load_float(fspec, torch.float32, progress=False)
fold.rotate_model(F, seed)
F = F.to(dtype=next(Q.parameters()).dtype if dev == "cuda" else torch.float32).to(dev).eval()
rows = []
def ppl(name):
    t = time.time()
    r = perplexity(Q, tok, "wikitext2", device=dev, progress=False, limit_windows=limit)
    rows.append({"what": name, "ppl": r["ppl"], "windows": r["windows"]})
    print(json.dumps(rows[-1]), f"{time.time() - t:.1f}s", flush=True)
ql, fl = Q.model.layers, F.model.layers
r = perplexity(F, tok, "wikitext2", device=dev, progress=False, limit_windows=limit)
rows.append({"what": "rotated float model", "ppl": r["ppl"], "windows": r["windows"]}); print(rows[-1], flush=True)
ppl("ternary (all layers quantized)")
saved = list(ql)
for i in range(len(ql)):
    ql[i] = fl[i]; ppl(f"layer {i} float"); ql[i] = saved[i]
KINDS = {"q/k/v": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
         "gate/up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
for kind, names in KINDS.items():
    keep = []
    for i in range(len(ql)):
        for n in names:
            parent, _, child = n.rpartition(".")
            pq, pf = ql[i].get_submodule(parent), fl[i].get_submodule(parent)
            keep.append((pq, child, getattr(pq, child)))
            setattr(pq, child, getattr(pf, child))
    ppl(f"{kind} float in every layer")
    for pq, child, m in keep:
        setattr(pq, child, m)
for i in range(len(ql)):
    ql[i] = fl[i]
ppl("every layer float (the quantized model's lm_head)")
for i in range(len(ql)):
    ql[i] = saved[i]
ppl("ternary again (check)")
json.dump(rows, open(out, "w"), indent=1)
