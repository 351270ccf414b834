# layer-local: does a full online Hadamard on o_proj's input (on top of the per-head offline one) lower its error?
import torch, time, sys
from pt2llm.model import sources
from pt2llm import data
from pt2llm.ternary import gptq, refine as R
from pt2llm.model.driver import QuantConfig
from pt2llm.rotate import rotate_model, hadamard
torch.set_num_threads(2)
alias = sys.argv[1]; layers = [int(s) for s in sys.argv[2].split(",")]
model, tok, _ = sources.load_any(alias, dtype=torch.float32, progress=False)
rotate_model(model, seed=0)
calib = data.calibration_windows("c4", tok, 16, 512, 0)
names = [f"model.layers.{i}.self_attn.o_proj" for i in layers]
acc = {}
def hook(name):
    def f(mod, inp):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
        acc[name] = acc.get(name, 0) + x.T @ x
    return f
mods = dict(model.named_modules())
for n in names: mods[n].register_forward_pre_hook(hook(n))
with torch.no_grad():
    for i in range(calib.shape[0]): model(calib[i:i+1])
cnt = calib.numel()
q = QuantConfig().quantizer()
gen = torch.Generator().manual_seed(123)
for n in names:
    H = (2 * acc[n] / cnt); W = mods[n].weight.detach().double()
    s = hadamard.random_signs(W.shape[1], gen)
    K = hadamard.transform(torch.eye(W.shape[1], dtype=torch.float64), s)  # x -> x K
    def run(W, H):
        r = gptq.quantize_weight(W.float(), H.float(), q, reorder="hessian", percdamp=0.1)
        r = R.refine(r, W.float(), H.float(), -1, 1, sweeps=4)
        E = r.dequantize().double() - W
        return (((E @ H) * E).sum() / (((W @ H) * W).sum())).item()
    # head energy spread
    d = torch.diagonal(H).reshape(-1, 64).sum(1)
    a = run(W, H); b = run(W @ K, K.T @ H @ K)
    print(n, f"head energy max/min {float(d.max()/d.min()):.1f}", f"per-head {a:.4f} full {b:.4f} ratio {b/a:.3f}", flush=True)
