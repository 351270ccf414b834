# One-off check (session 7): refit the 16-bit lm_head of a quantized folder by least squares, ridge towards
# the current head, so that its logits on the quantized final hidden states match the float model's; paired.
# Usage, from the project root: PT2LLM_DATA_DIR=../shared/data python docs/results/fit-head/headfit.py DIR MODEL NSAMPLES SEQLEN WINDOWS DAMPS
import sys, json, time, torch
from pt2llm import checkpoint, data
from pt2llm.model import sources
from pt2llm.eval.perplexity import perplexity
torch.set_num_threads(2)
qdir, spec, ns, sl, lim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
damps = [float(x) for x in sys.argv[6].split(",")]
qm, tok = checkpoint.load(qdir)
fm = sources.load_any(spec, dtype=torch.float32, progress=False)[0].eval()
calib = data.calibration_windows("c4", tok, ns, sl, 0)
d = qm.config.hidden_size
H = torch.zeros(d, d, dtype=torch.float64); C = torch.zeros(d, d, dtype=torch.float64)
t = time.time()
with torch.no_grad():
    for i in range(calib.shape[0]):
        x = calib[i:i+1]
        zq = qm(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states[-1][0].double()
        zf = fm(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states[-1][0].double()
        H += zq.T @ zq; C += zf.T @ zq
print("stats", time.time() - t, flush=True)
Wf = fm.get_output_embeddings().weight.detach().double()
Wq0 = qm.get_output_embeddings().weight.detach().clone()
res = {"base": perplexity(qm, tok, "wikitext2", seqlen=2048, limit_windows=lim, progress=False)["ppl"]}
print("base", res["base"], flush=True)
for damp in damps:
    Hd = H + damp * H.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    W0 = Wq0.double()
    W = W0 + torch.linalg.solve(Hd, (Wf @ C - W0 @ H).T).T   # ridge towards the current head
    with torch.no_grad():
        qm.get_output_embeddings().weight.copy_(W.to(Wq0.dtype))
    res[damp] = perplexity(qm, tok, "wikitext2", seqlen=2048, limit_windows=lim, progress=False)["ppl"]
    print(damp, res[damp], flush=True)
print(json.dumps(res))
