"""transformers' own generate, greedy, on the Llama-2-7B-shaped model of benchmarks/e2e.py (random weights),
fp16 then ternary: its eager loop (dynamic cache) and cache_implementation="static" (which compiles the
decode step with CUDA graphs, torch.compile mode "reduce-overhead"). Wall time of the faster of two calls
after a first call; tokens/s = 256 new tokens / that time.

    PYTHONPATH=$PWD python3 docs/results/generate/hf_static.py 32 OUT.json [--pt2llm-backend] [--eager-only]   (repository root, GPU)

--pt2llm-backend adds rows with compile_config=CompileConfig(backend="pt2llm") (kernels/ops.backend).
"""
import sys, time, json, traceback
sys.path.insert(0, "benchmarks")
import torch, e2e
torch.manual_seed(0)
gen = torch.Generator(device="cuda").manual_seed(0)
layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
model = e2e.fp16_model(layers)
prompt = torch.randint(0, 32000, (1, 128), device="cuda", generator=gen)
N = 256
rows = []
def run(name, **kw):
    def call():
        torch.cuda.synchronize(); t = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, min_new_tokens=N,
                             do_sample=False, pad_token_id=0, **kw)
        torch.cuda.synchronize(); return out, time.perf_counter() - t
    try:
        t0 = time.perf_counter(); call(); first = time.perf_counter() - t0
        _, s = call(); _, s2 = call()
        rows.append({"what": name, "first_s": round(first, 1), "tokens_per_s": round(N / min(s, s2), 1)})
    except Exception as e:
        rows.append({"what": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        traceback.print_exc(limit=3)
    print(rows[-1], flush=True)
for m in ("fp16", "ternary"):
    if m == "ternary":
        e2e.ternarize(model, gen)
    run(f"{m} eager dynamic")
    if "--eager-only" in sys.argv:
        continue
    run(f"{m} static cache", cache_implementation="static")
    torch._dynamo.reset()
    if "--pt2llm-backend" in sys.argv:  # the same, compiled through pt2llm's backend (linears grouped)
        from transformers import CompileConfig
        import pt2llm.kernels.ops  # noqa: F401  (registers the backend "pt2llm")
        run(f"{m} static cache, compile_config backend pt2llm", cache_implementation="static",
            compile_config=CompileConfig(backend="pt2llm"))
        torch._dynamo.reset()
json.dump(rows, open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/hf.json", "w"), indent=1)
