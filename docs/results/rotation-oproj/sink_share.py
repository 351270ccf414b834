"""Share of each linear's Hessian trace tr(sum x xᵀ) that the first token of each calibration
window holds, and the 8 largest tokens, on Qwen2.5-Coder-0.5B (float; `rot`: rotated as
`--rotate hadamard` does, seed 0), 4 C4 windows of 2048 tokens (seed 0). Checks whether an
attention-sink token dominates the Hessians (it does not: sink_share.out).
    PT2LLM_DATA_DIR=... python3 docs/results/rotation-oproj/sink_share.py qwen2.5-coder-0.5b rot"""
import sys

import torch

from pt2llm.model import sources
from pt2llm import data
from pt2llm.rotate import fold
torch.set_num_threads(2)
name = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b"
model, tok, _ = sources.load_float(name, progress=False)
rot = len(sys.argv) > 2 and sys.argv[2] == "rot"
if rot:
    fold.rotate_model(model, seed=0)
ids = data.calibration_windows("c4", tok, 4, 2048, 0)
energy = {}  # linear -> per window, each token's input energy |x|^2 ([1, 2048] tensors)


def hook(nm):
    def f(mod, inp):
        energy.setdefault(nm, []).append(inp[0].detach().float().pow(2).sum(-1))
    return f


layers = model.model.layers
for i in range(len(layers)):
    for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        layers[i].get_submodule(n).register_forward_pre_hook(hook(f"{i}.{n}"))
with torch.no_grad():
    for b in range(ids.shape[0]):
        model(ids[b:b+1])
for nm, es in energy.items():
    e = torch.cat(es)                         # [windows, tokens]
    tot = e.sum().item()
    print(f"{nm:24s} first-token share {e[:, 0].sum().item() / tot:6.3f}  top-8 tokens share "
          f"{e.flatten().topk(8).values.sum().item() / tot:6.3f}  max/median {e.max().item() / e.median().item():9.1f}")
