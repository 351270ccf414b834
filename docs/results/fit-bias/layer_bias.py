# layer-local: a fitted per-row bias. With a free bias b the output error of E = What - W is
# E (x - m) + (E m + b); b = -E m removes the mean part, leaving tr(E Hc E^T), Hc the centered H.
import torch, sys
from pt2llm.model import sources
from pt2llm import data
from pt2llm.ternary import gptq, refine as R
from pt2llm.model.driver import QuantConfig
from pt2llm.rotate import rotate_model
torch.set_num_threads(2)
alias = sys.argv[1]; layers = [int(s) for s in sys.argv[2].split(",")]
kinds = sys.argv[3].split(",")
model, tok, _ = sources.load_any(alias, dtype=torch.float32, progress=False)
rotate_model(model, seed=0)
calib = data.calibration_windows("c4", tok, 16, 512, 0)
names = [f"model.layers.{i}.{k}" for i in layers for k in kinds]
acc, sm = {}, {}
mods = dict(model.named_modules())
def hook(name):
    def f(mod, inp):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
        t = getattr(mod, "input_transform", None)
        if t is not None: x = t(x)
        acc[name] = acc.get(name, 0) + x.T @ x
        sm[name] = sm.get(name, 0) + x.sum(0)
    return f
for n in names: mods[n].register_forward_pre_hook(hook(n))
with torch.no_grad():
    for i in range(calib.shape[0]): model(calib[i:i+1])
cnt = calib.numel()
q = QuantConfig().quantizer()
for n in names:
    H = 2 * acc[n] / cnt; m = sm[n] / cnt
    Hc = H - 2 * torch.outer(m, m)
    W = mods[n].weight.detach().double()
    tot = ((W @ H) * W).sum()
    def run(Hq):
        r = gptq.quantize_weight(W.float(), Hq.float(), q, reorder="hessian", percdamp=0.1)
        r = R.refine(r, W.float(), Hq.float(), -1, 1, sweeps=4)
        return r.dequantize().double() - W
    err = lambda E, Hm: (((E @ Hm) * E).sum() / tot).item()
    E0 = run(H); E1 = run(Hc)
    frac = (2 * m @ m / torch.trace(H)).item()
    print(n, f"mean share of tr H {frac:.3f}", f"base {err(E0,H):.4f} +bias {err(E0,Hc):.4f} centered+bias {err(E1,Hc):.4f} ratio {err(E1,Hc)/err(E0,H):.3f}", flush=True)
