# layer-level experiments on real Qwen linears (CPU): GPTQ PT2 (Hessian order), refine, free bias, re-GPTQ
import torch, time, sys
from pt2llm.model import sources
from pt2llm import data
from pt2llm.ternary import gptq, refine as R, atq
from pt2llm.model.driver import QuantConfig
torch.set_num_threads(2)
torch.manual_seed(0)
model, tok, _ = sources.load_any("qwen2.5-coder-0.5b", dtype=torch.float32, progress=False)
calib = data.calibration_windows("c4", tok, 16, 512, 0)
want = sys.argv[1].split(",")
acc = {}
mean = {}
def hook(name):
    def f(mod, inp):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
        acc[name] = acc.get(name, 0) + x.T @ x
        mean[name] = mean.get(name, 0) + x.sum(0)
    return f
cnt = 0
for n, m in model.named_modules():
    if n in want:
        m.register_forward_pre_hook(hook(n))
with torch.no_grad():
    for i in range(calib.shape[0]):
        model(calib[i:i+1]); cnt += calib.shape[1]
mods = dict(model.named_modules())
q = QuantConfig().quantizer()
for n in want:
    H = (2 * acc[n] / cnt).float(); mvec = (mean[n] / cnt).float()
    W = mods[n].weight.detach().float()
    def rel(What):
        E = (What - W).double(); Hd = H.double()
        return (((E @ Hd) * E).sum() / (((W.double() @ Hd) * W.double()).sum())).item()
    def bias_gain(What):
        # loss with the optimal free bias: subtract (E m)^2 * (2) per row ... H = 2E[xx^T]; mean m
        E = (What - W).double(); Hd = H.double()
        Em = E @ mvec.double()
        L = ((E @ Hd) * E).sum(1)
        return ((L - 2 * Em**2).sum() / (((W.double() @ Hd) * W.double()).sum())).item()
    t = time.time()
    r0 = gptq.quantize_weight(W, H, q, reorder="hessian")
    t0 = time.time() - t
    out = {"gptq": rel(r0.dequantize()), "gptq+bias": bias_gain(r0.dequantize())}
    t = time.time()
    r4 = R.refine(r0, W, H, -1, 1, sweeps=4)
    out["ref4"] = rel(r4.dequantize()); out["ref4+bias"] = bias_gain(r4.dequantize())
    t4 = time.time() - t
    r8 = R.refine(r4, W, H, -1, 1, sweeps=4)
    out["ref8"] = rel(r8.dequantize())
    # re-GPTQ with the refined grid fixed, same order, then refine 4
    st = {"b": 0}
    def fit(Wb, Hb, a=r4.scale, o=r4.offset):
        b = st["b"]; st["b"] += 1
        return a[:, b].float(), o[:, b].float()
    fq = gptq.BlockQuantizer(fit=fit, lo=-1, hi=1)
    rg = gptq.quantize_weight(W, H, fq, reorder=r4.perm)
    out["regptq"] = rel(rg.dequantize())
    rg4 = R.refine(rg, W, H, -1, 1, sweeps=4)
    out["regptq+ref4"] = rel(rg4.dequantize())
    print(n, tuple(W.shape), f"gptq {t0:.1f}s ref4 {t4:.1f}s", " ".join(f"{k}={v:.4f}" for k, v in out.items()), flush=True)
