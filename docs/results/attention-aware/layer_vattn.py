# layer-local: v_proj quantized with GPTQ's H against the attention-aware H_g = Σ_{i∈g} (A_i X)ᵀ(A_i X)
# per kv head g (and summed over heads), fitted on NFIT C4 windows and measured on NFIT others.
# usage: layer_vattn.py MODEL LAYERS [NFIT]
import sys

import torch

from pt2llm import data
from pt2llm.model import sources
from pt2llm.model.driver import QuantConfig
from pt2llm.rotate import rotate_model
from pt2llm.ternary import gptq, refine as R

torch.set_num_threads(2)
alias, layers = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
nfit = int(sys.argv[3]) if len(sys.argv) > 3 else 16
model, tok, _ = sources.load_any(alias, dtype=torch.float32, progress=False)
model.config._attn_implementation = "eager"  # the layers share this config: attentions come back
rotate_model(model, seed=0)
cfg = model.config
nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
hd, grp = d // nh, nh // nkv
calib = data.calibration_windows("c4", tok, 2 * nfit, 512, 0)
mods = dict(model.named_modules())
xs = {}
for l in layers:
    mods[f"model.layers.{l}.self_attn.v_proj"].register_forward_pre_hook(
        lambda mod, inp, l=l: xs.__setitem__(l, inp[0].detach()[0].double()))
H = {l: torch.zeros(d, d, dtype=torch.float64) for l in layers}            # GPTQ's, fit windows
Hfit = {l: torch.zeros(nkv, d, d, dtype=torch.float64) for l in layers}    # attention-aware, fit windows
Hout = {l: torch.zeros(nkv, d, d, dtype=torch.float64) for l in layers}    # attention-aware, held out
with torch.no_grad():
    for s in range(2 * nfit):
        out = model(calib[s:s + 1], output_attentions=True)
        for l in layers:
            X, A = xs[l], out.attentions[l][0].double()  # [T, d], [nh, T, T]
            if s < nfit:
                H[l] += X.T @ X
            AX = A @ X
            for g in range(nkv):
                Y = AX[g * grp:(g + 1) * grp].reshape(-1, d)
                (Hfit if s < nfit else Hout)[l][g] += Y.T @ Y
q = QuantConfig().quantizer()


def quant(W, Hm):
    r = gptq.quantize_weight(W.float(), Hm.float(), q, reorder="hessian", percdamp=0.1)
    r = R.refine(r, W.float(), Hm.float(), -1, 1, sweeps=4)
    return r.dequantize().double()


def rel(E, W, Hm):
    return float(((E @ Hm) * E).sum()), float(((W @ Hm) * W).sum())


for l in layers:
    W = mods[f"model.layers.{l}.self_attn.v_proj"].weight.detach().double()
    Ws = quant(W, H[l])
    Wa = torch.cat([quant(W[g * hd:(g + 1) * hd], Hfit[l][g]) for g in range(nkv)])
    Wsum = quant(W, Hfit[l].sum(0))

    def err(What, Hg):  # attention output's relative error, Σ_g over kv heads
        parts = [rel((What - W)[g * hd:(g + 1) * hd], W[g * hd:(g + 1) * hd], Hg[l][g]) for g in range(nkv)]
        return sum(p[0] for p in parts) / sum(p[1] for p in parts)

    def errH(What):  # GPTQ's relative error
        num, den = rel(What - W, W, H[l])
        return num / den

    print(f"in-sample std {err(Ws, Hfit):.4f} per-head {err(Wa, Hfit):.4f} summed {err(Wsum, Hfit):.4f}")
    print(f"HELD-OUT layer {l}: attn-out err std {err(Ws, Hout):.4f} per-head {err(Wa, Hout):.4f} "
          f"(ratio {err(Wa, Hout) / err(Ws, Hout):.3f}) summed-H {err(Wsum, Hout):.4f} "
          f"({err(Wsum, Hout) / err(Ws, Hout):.3f}); plain-H err std {errH(Ws):.4f} per-head {errH(Wa):.4f}",
          flush=True)
