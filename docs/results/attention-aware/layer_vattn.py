# layer-local: v_proj quantized with the standard H vs the attention-aware per-kv-head H_g = Σ_{i∈g} (A_i X)ᵀ(A_i X)
import torch, sys, time
from pt2llm.model import sources
from pt2llm import data
from pt2llm.ternary import gptq, refine as R
from pt2llm.model.driver import QuantConfig
from pt2llm.rotate import rotate_model
torch.set_num_threads(2)
alias = sys.argv[1]; layers = [int(s) for s in sys.argv[2].split(",")]
ns, sl = int(sys.argv[3]) if len(sys.argv) > 3 else 16, 512
nh_out = ns; ns = 2 * ns
model, tok, _ = sources.load_any(alias, dtype=torch.float32, progress=False)
model.config._attn_implementation = "eager"
for l in model.model.layers: l.self_attn.config._attn_implementation = "eager"
rotate_model(model, seed=0)
cfg = model.config; nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads; hd = cfg.hidden_size // nh
grp = nh // nkv
calib = data.calibration_windows("c4", tok, ns, sl, 0)
mods = dict(model.named_modules())
xs = {}
def hook(l):
    def f(mod, inp): xs[l] = inp[0].detach()[0].double()
    return f
for l in layers: mods[f"model.layers.{l}.self_attn.v_proj"].register_forward_pre_hook(hook(l))
d = cfg.hidden_size
H = {l: torch.zeros(d, d, dtype=torch.float64) for l in layers}
Hg = {l: torch.zeros(nkv, d, d, dtype=torch.float64) for l in layers}
Ho = {l: torch.zeros(nkv, d, d, dtype=torch.float64) for l in layers}
with torch.no_grad():
    for s in range(ns):
        out = model(calib[s:s+1], output_attentions=True)
        for l in layers:
            X = xs[l]; A = out.attentions[l][0].double()  # [nh, T, T]
            AX = A @ X  # [nh, T, d]
            tgt = Hg if s < nh_out else Ho
            if s < nh_out: H[l] += X.T @ X
            for g in range(nkv):
                Y = AX[g*grp:(g+1)*grp].reshape(-1, d)
                tgt[l][g] += Y.T @ Y
q = QuantConfig().quantizer()
def quant(W, Hm):
    r = gptq.quantize_weight(W.float(), Hm.float(), q, reorder="hessian", percdamp=0.1)
    r = R.refine(r, W.float(), Hm.float(), -1, 1, sweeps=4)
    return r.dequantize().double()
for l in layers:
    W = mods[f"model.layers.{l}.self_attn.v_proj"].weight.detach().double()
    Ws = quant(W, H[l])
    Wa = torch.cat([quant(W[g*hd:(g+1)*hd], Hg[l][g]) for g in range(nkv)])
    Hsum = Hg[l].sum(0)
    Wsum = quant(W, Hsum)
    def err(What, HH=None):
        HH = Ho if HH is None else HH
        num = den = 0.0
        for g in range(nkv):
            E = (What - W)[g*hd:(g+1)*hd]; Wg = W[g*hd:(g+1)*hd]
            num += float(((E @ HH[l][g]) * E).sum()); den += float(((Wg @ HH[l][g]) * Wg).sum())
        return num / den
    def errH(What):
        E = What - W
        return float(((E @ H[l]) * E).sum() / ((W @ H[l]) * W).sum())
    print(f"in-sample std {err(Ws,Hg):.4f} per-head {err(Wa,Hg):.4f} summed {err(Wsum,Hg):.4f}"); print(f"HELD-OUT layer {l}: attn-out err std {err(Ws):.4f} per-head {err(Wa):.4f} (ratio {err(Wa)/err(Ws):.3f}) summed-H {err(Wsum):.4f} ({err(Wsum)/err(Ws):.3f}); plain-H err std {errH(Ws):.4f} per-head {errH(Wa):.4f}", flush=True)
