"""`pt2llm generate`: decoding on a static cache (speed.generate), greedy or sampled, stopping at eos."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from pt2llm import cli, speed
from pt2llm.sampling import Sampling

from tinymodels import quantize, random_ternary


def _model(kind="llama", seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _hf(model, prompt, n, eos=None):
    """transformers' own greedy generate: new tokens, padded with -1 after a sequence ends."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=-1 if eos is not None else 0)[:, prompt.shape[1]:]
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tokens_match_transformers_generate(kind):
    model = _model(kind)
    prompt = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    r = speed.generate(model, prompt, 12)
    assert torch.equal(r["tokens"], _hf(model, prompt, 12))
    assert r["steps"] == 11 and r["decode_mode"] == "eager"


def test_stops_at_eos_like_transformers():
    model = _model()
    prompt = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    free = speed.generate(model, prompt, 20, check_every=3)["tokens"][0].tolist()
    eos = free[6]  # a token that first appears at step 6 or before: generation must end there
    first = free.index(eos)
    r = speed.generate(model, prompt, 20, {eos}, check_every=3)
    assert r["tokens"][0].tolist() == free[:first + 1]
    assert torch.equal(r["tokens"], _hf(model, prompt, 20, eos)[:, :first + 1])
    # checked every 3 steps: at most 2 steps past the eos were run, and none after the limit
    assert first <= r["steps"] <= first + 2


def test_sampling_repeats_with_its_seed_and_greedy_is_the_default():
    model = _model()
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(6))
    greedy = speed.generate(model, prompt, 12)["tokens"]
    assert torch.equal(speed.generate(model, prompt, 12, sampling=Sampling(0.0, seed=9))["tokens"], greedy)
    # top-k 1 draws the argmax at any temperature
    assert torch.equal(speed.generate(model, prompt, 12, sampling=Sampling(3.0, top_k=1))["tokens"], greedy)
    hot = Sampling(2.0, seed=1)
    a = speed.generate(model, prompt, 12, sampling=hot)["tokens"]
    assert torch.equal(a, speed.generate(model, prompt, 12, sampling=hot)["tokens"])
    assert not torch.equal(a, greedy)
    assert not torch.equal(a, speed.generate(model, prompt, 12, sampling=Sampling(2.0, seed=2))["tokens"])
    assert not torch.equal(a[0], a[1])  # each sequence draws its own tokens
    assert ((a >= 0) & (a < 100)).all()


def test_sampled_tokens_come_from_the_filtered_distribution():
    """Every sampled token is inside the model's top-k at its step: the filters apply in the loop."""
    model = _model(seed=1)
    prompt = torch.randint(0, 100, (1, 4), generator=torch.Generator().manual_seed(7))
    toks = speed.generate(model, prompt, 10, sampling=Sampling(5.0, top_k=3, seed=4))["tokens"][0]
    ids = prompt[0].tolist()
    for t in toks.tolist():
        logits = model(torch.tensor([ids])).logits[0, -1]
        assert t in logits.topk(3).indices.tolist()
        ids.append(t)


@pytest.mark.parametrize("penalty", [1.8, 0.5])
def test_repetition_penalty_matches_transformers_generate(penalty):
    """Greedy with a repetition penalty: transformers' generate(repetition_penalty=...) token
    for token, the prompt's tokens counted as seen; sampled, it repeats with its seed."""
    model = _model(seed=4)
    prompt = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(8))
    r = speed.generate(model, prompt, 14, sampling=Sampling(repetition_penalty=penalty))
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14, do_sample=False,
                          pad_token_id=0, repetition_penalty=penalty)[:, 6:]
    assert torch.equal(r["tokens"], want)
    assert not torch.equal(r["tokens"], speed.generate(model, prompt, 14)["tokens"])
    hot = Sampling(1.2, top_k=20, min_p=0.05, repetition_penalty=penalty, seed=2)
    assert torch.equal(speed.generate(model, prompt, 14, sampling=hot)["tokens"],
                       speed.generate(model, prompt, 14, sampling=hot)["tokens"])


def test_min_p_one_decodes_greedily():
    model = _model(seed=5)
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(9))
    assert torch.equal(speed.generate(model, prompt, 12, sampling=Sampling(4.0, min_p=1.0, seed=3))["tokens"],
                       speed.generate(model, prompt, 12)["tokens"])


def test_stop_cuts_the_text_where_it_says_and_the_streamer_gets_no_more():
    model = _model(seed=3)
    prompt = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(6))
    free = speed.generate(model, prompt, 20)["tokens"][0].tolist()
    seq = free[9:11]  # "stop once these two tokens have come": the first place they do
    at = next(i for i in range(len(free) - 1) if free[i:i + 2] == seq) + 2

    def stop(tokens):
        return next((i + 2 for i in range(len(tokens) - 1) if tokens[i:i + 2] == seq), None)

    s = _Collect()
    r = speed.generate(model, prompt, 20, check_every=4, streamer=s, stop=stop)
    assert r["tokens"][0].tolist() == free[:at]
    assert [t for chunk in s.puts[1:] for t in chunk] == free[:at]
    assert at - 1 <= r["steps"] <= at + 2  # checked every 4 steps: at most 3 past the stop
    with pytest.raises(ValueError, match="one sequence"):
        speed.generate(model, prompt.repeat(2, 1), 3, stop=stop)


def test_stop_strings_keep_the_fewest_tokens_that_hold_the_text():
    class Tok:  # token t decodes to the letter chr(97 + t % 26)
        def decode(self, tokens, skip_special_tokens=True):
            return "".join(chr(97 + t % 26) for t in tokens)

    stop = speed.stop_strings(Tok(), ["cd", "zz"])
    assert stop([0, 1, 2, 3, 4]) == 4  # "abcde": "cd" ends at the 4th token
    assert stop([0, 1, 2]) is None
    assert stop([25, 25, 2, 3]) == 2
    with pytest.raises(ValueError):
        speed.stop_strings(Tok(), [""])


def test_batch_pads_each_sequence_after_its_own_eos():
    model = _model(seed=2)
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(5))
    free = speed.generate(model, prompt, 16)["tokens"]
    # an eos that one sequence reaches before the other
    pick = next(t for t in free[0].tolist() if t not in free[1].tolist()[:8])
    r = speed.generate(model, prompt, 16, {pick}, check_every=4)["tokens"]
    i = free[0].tolist().index(pick)
    assert r[0, :i + 1].tolist() == free[0, :i + 1].tolist() and (r[0, i + 1:] == -1).all()
    j = free[1].tolist().index(pick) if pick in free[1].tolist() else 16
    assert r[1, :j + 1].tolist() == free[1, :j + 1].tolist()[:r.shape[1]]


class _Collect:
    """A streamer that records what it is given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        assert not self.ended
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("stop", [False, True])
def test_streamer_gets_the_prompt_then_every_new_token_once(stop):
    model = _model(seed=3)
    prompt = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(6))
    free = speed.generate(model, prompt, 14)["tokens"][0].tolist()
    eos = {free[8]} if stop else set()
    s = _Collect()
    r = speed.generate(model, prompt, 14, eos, check_every=4, streamer=s)
    assert s.ended and s.puts[0] == prompt[0].tolist()
    streamed = [t for chunk in s.puts[1:] for t in chunk]
    assert streamed == r["tokens"][0].tolist()  # up to and including the eos, nothing after it
    assert len(s.puts) > 2  # in chunks, not all at the end
    with pytest.raises(ValueError, match="one sequence"):
        speed.generate(model, prompt.repeat(2, 1), 3, streamer=_Collect())


def test_one_token_and_bad_counts():
    model = _model()
    prompt = torch.randint(0, 100, (1, 4))
    r = speed.generate(model, prompt, 1)
    assert r["tokens"].shape == (1, 1) and r["steps"] == 0
    assert torch.equal(r["tokens"], _hf(model, prompt, 1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        speed.generate(model, prompt, 0)


def test_the_model_keeps_its_attention():
    model = _model()
    before = model.config._attn_implementation
    speed.generate(model, torch.randint(0, 100, (1, 4)), 3)
    assert model.config._attn_implementation == before


def _ternarize(model, gen):
    """Every decoder linear -> a TernaryLinear with random codes, alpha, mu and column order."""
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                t = random_ternary(lin.out_features, lin.in_features, gen, bias=lin.bias is not None,
                                   alpha=(0.05, 0.02), mu_std=0.005)
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, t)
    return model


def _cuda_model(layers=2, ternary_seed=None):
    """A random fp16 Llama on CUDA, wide enough for the CUDA kernel (K a multiple of 32); its
    decoder linears ternary (random, _ternarize) when ternary_seed is given."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if ternary_seed is not None:
        _ternarize(model, torch.Generator().manual_seed(ternary_seed))
    return model.half().cuda()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph step needs CUDA")
@pytest.mark.parametrize("ternary", [False, True])
def test_cuda_graph_tokens_match_eager(ternary):
    # ternary: the CUDA mma kernel (M = 1) launched by cuda_ternary's Launcher, replayed in the graph
    model = _cuda_model(ternary_seed=0 if ternary else None)
    prompt = torch.randint(0, 100, (1, 6), device="cuda")
    g = speed.generate(model, prompt, 24, check_every=5)
    e = speed.generate(model, prompt, 24, graphs=False)
    assert g["decode_mode"] == "cuda-graph" and e["decode_mode"] == "eager"
    assert torch.equal(g["tokens"], e["tokens"])
    eos = g["tokens"][0, 9].item()
    first = g["tokens"][0].tolist().index(eos)
    stop = speed.generate(model, prompt, 24, {eos}, check_every=5)
    assert stop["tokens"][0].tolist() == g["tokens"][0, :first + 1].tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph step needs CUDA")
def test_the_compiled_steps_ternary_launches_are_dependent_ones(monkeypatch):
    """speed.Decoder's compiled step prepares the CUDA kernel's launches as programmatic
    dependent launches (sm_90; kernels/dependent.py); the uncompiled step's, the prefill's and,
    with PT2LLM_PDL=0, every launch are plain ones; the compiled step's tokens are the same
    either way."""
    from pt2llm.kernels import cuda_ternary as ct
    from pt2llm.kernels import triton_ternary as tt

    model = _cuda_model(ternary_seed=0)
    prompt = torch.randint(0, 100, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    made, prepare = [], ct.prepare

    def recording(*a, **k):
        launch = prepare(*a, **k)
        made.append((a[0].shape[0], launch.launcher.dependent))
        return launch

    monkeypatch.setattr(ct, "prepare", recording)
    runs = {}
    for name, compile, pdl in (("eager", False, "1"), ("compiled", True, "1"), ("compiled, off", True, "0")):
        monkeypatch.setenv("PT2LLM_PDL", pdl)
        made.clear()
        tt.forget_launches()
        runs[name] = speed.generate(model, prompt, 16, check_every=4, compile=compile)
        assert made and runs[name]["decode_mode"].startswith("cuda-graph")
        # the compiled steps' launches (one row) are dependent; the prefills' (the prompt's six
        # rows, and the one-token prefill before the graph's capture) are not
        if name == "compiled" and ct.dependent_possible(prompt):
            assert (1, True) in made and (1, False) in made and {d for m, d in made if m == 6} == {False}
        else:
            assert not any(d for _, d in made), name
    assert torch.equal(runs["compiled"]["tokens"], runs["compiled, off"]["tokens"])
    tt.forget_launches()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph step needs CUDA")
def test_cuda_graph_samples_like_eager():
    """The graph replays draw the eager step's noise: the same seed, the same tokens."""
    model = _cuda_model()
    prompt = torch.randint(0, 100, (2, 6), device="cuda")
    how = Sampling(1.5, top_k=50, top_p=0.9, seed=3)
    g = speed.generate(model, prompt, 24, check_every=5, sampling=how)
    assert g["decode_mode"] == "cuda-graph"
    assert torch.equal(g["tokens"], speed.generate(model, prompt, 24, check_every=5, sampling=how)["tokens"])
    e = speed.generate(model, prompt, 24, graphs=False, sampling=how)
    assert torch.equal(g["tokens"], e["tokens"])
    assert not torch.equal(g["tokens"], speed.generate(model, prompt, 24)["tokens"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph step needs CUDA")
def test_cuda_graph_penalises_repeats_like_eager():
    """The tokens seen, which the repetition penalty reads, are updated inside the graph."""
    model = _cuda_model()
    prompt = torch.randint(0, 100, (2, 6), device="cuda")
    for how in (Sampling(repetition_penalty=2.0), Sampling(1.3, min_p=0.05, repetition_penalty=1.5, seed=1)):
        g = speed.generate(model, prompt, 24, check_every=5, sampling=how)
        assert g["decode_mode"] == "cuda-graph"
        assert torch.equal(g["tokens"], speed.generate(model, prompt, 24, graphs=False, sampling=how)["tokens"])
    assert not torch.equal(g["tokens"], speed.generate(model, prompt, 24, check_every=5)["tokens"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile's CUDA graphs need CUDA")
def test_transformers_static_cache_generate_runs_a_ternary_model():
    """transformers' generate(cache_implementation="static") compiles the decode step with CUDA
    graphs (mode="reduce-overhead"); a ternary model must run there as the fp16 one does."""
    model = _cuda_model(ternary_seed=0)
    prompt = torch.randint(0, 100, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    torch._dynamo.reset()
    try:
        kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False, pad_token_id=0)
        static = [model.generate(prompt, cache_implementation="static", **kw) for _ in range(2)]
    finally:
        torch._dynamo.reset()
    assert static[0].shape == (1, 22) and torch.equal(static[0], static[1])
    assert torch.equal(static[0][:, 6:10], _hf(model, prompt, 4))  # the first tokens as the eager loop's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers compiles its static-cache step on CUDA")
def test_transformers_static_cache_generate_through_the_pt2llm_backend(monkeypatch):
    """transformers' generate(cache_implementation="static") with the "pt2llm" attention
    function and compile backend: each layer's cache write, length counter and rotary
    embedding go into the attention launch (ops.fuse_cache_write) in transformers' own
    compiled step, and the first tokens are the eager loop's."""
    from transformers.generation.configuration_utils import CompileConfig

    from pt2llm import attention
    from pt2llm.kernels import ops
    made = []
    real = ops.fuse_cache_write
    monkeypatch.setattr(ops, "fuse_cache_write", lambda gm: made.append(real(gm)) or made[-1])
    model = _cuda_model(ternary_seed=0)
    prompt = torch.randint(0, 100, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    want = _hf(model, prompt, 4)
    before = attention.use(model)
    torch._dynamo.reset()
    try:
        got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, cache_implementation="static",
                             compile_config=CompileConfig(backend="pt2llm"))
    finally:
        torch._dynamo.reset()
        attention.restore(model, before)
    assert made and max(made) == 2                   # both layers, in the compiled decode step
    assert torch.equal(got[:, 6:10], want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_command_prints_text_and_speed(tiny, capsys, device):
    _, d = tiny
    out_dir = d / "gen-q"
    if not out_dir.exists():
        quantize(d, out_dir)
    for model in (d / "float", out_dir):
        assert cli.main(["generate", str(model), "the quick", "--max-new-tokens", "6", "--device", device,
                         "--no-progress"]) == 0
        out, err = capsys.readouterr()
        assert out.strip().startswith("the quick")
        assert "prefill" in err and "new tokens" in err and device in err
        assert ("cuda-graph" in err) == (device == "cuda")


def test_command_refuses_more_than_the_context(tiny, capsys):
    _, d = tiny
    assert cli.main(["generate", str(d / "float"), "the quick", "--max-new-tokens", "100000", "--device", "cpu"]) != 0
    assert "context" in capsys.readouterr().err


def test_chat_uses_the_template_and_prints_only_the_reply(tiny, capsys, tmp_path):
    from transformers import AutoTokenizer
    _, d = tiny
    assert cli.main(["generate", str(d / "float"), "hello", "--chat", "--device", "cpu"]) != 0
    assert "no chat template" in capsys.readouterr().err
    import shutil
    chat = tmp_path / "chat"
    shutil.copytree(d / "float", chat)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = ("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<<assistant>>{% endif %}")
    tok.save_pretrained(chat)
    assert cli.main(["generate", str(chat), "the quick", "--chat", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "<<user>>" not in out and "<<assistant>>" not in out  # the reply only
    assert "new tokens" in err
    n = len(tok("<<user>> the quick\n<<assistant>>", add_special_tokens=False).input_ids)
    assert f"prefill {n} tokens" in err  # the templated prompt, without a second BOS


def test_command_samples_with_a_seed(tiny, capsys):
    _, d = tiny
    run = ["generate", str(d / "float"), "the quick", "--max-new-tokens", "8", "--device", "cpu", "--no-progress"]
    outs = []
    for seed in ("1", "1", "2"):
        assert cli.main(run + ["--temperature", "1.5", "--top-p", "0.95", "--seed", seed]) == 0
        out, err = capsys.readouterr()
        assert f"sampled (temperature 1.5, top-p 0.95, seed {seed})" in err
        outs.append(out)
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert cli.main(run) == 0
    assert "greedy" in capsys.readouterr().err


def test_command_stops_at_a_stop_text_and_penalises_repeats(tiny, capsys):
    _, d = tiny
    run = ["generate", str(d / "float"), "the quick", "--max-new-tokens", "24", "--device", "cpu", "--no-progress"]
    assert cli.main(run) == 0
    free = capsys.readouterr().out
    new = free[len("the quick"):]
    pick = new.strip()[4:7]  # a piece of the continuation
    assert len(pick) == 3
    assert cli.main(run + ["--stop", pick, "--stop", "no such text"]) == 0
    out, err = capsys.readouterr()
    assert out.rstrip("\n").endswith(pick) and free.startswith(out.rstrip("\n"))
    assert out.count(pick) == 1 + "the quick".count(pick)
    assert cli.main(run + ["--repetition-penalty", "1.5"]) == 0
    out, err = capsys.readouterr()
    assert "greedy (repetition penalty 1.5)" in err


@pytest.mark.parametrize("bad, says", [(["--top-k", "5"], "--temperature"), (["--temperature", "-1"], "temperature"),
                                       (["--temperature", "1", "--top-p", "0"], "top_p"),
                                       (["--min-p", "0.1"], "--temperature"),
                                       (["--repetition-penalty", "0"], "repetition_penalty"),
                                       (["--stop", ""], "--stop")])
def test_command_refuses_bad_sampling(tiny, capsys, bad, says):
    _, d = tiny
    assert cli.main(["generate", str(d / "float"), "the quick", "--device", "cpu"] + bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("pt2llm: error:") and says in err


def test_sibling_groups_are_the_linears_that_read_one_input():
    from pt2llm import nn as pnn
    from pt2llm.rotate import online
    model = _ternarize(_model(), torch.Generator().manual_seed(1))
    groups = pnn.sibling_groups(model)
    names = {id(m): n for n, m in model.named_modules()}
    assert sorted(tuple(names[id(m)].rsplit(".", 1)[1] for m in g) for g in groups) == \
        [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    attn = model.model.layers[0].self_attn
    attn.k_proj.input_transform = online.OnlineHadamard(attn.k_proj.in_features)  # no longer one input
    assert len(pnn.sibling_groups(model)) == 3
    x = torch.randn(1, 3, 64)
    with pnn.grouped(model) as gs:
        assert len(gs) == 3 and model.model.layers[1].mlp.up_proj.siblings is gs[-1]
        y = model.model.layers[1].self_attn.q_proj(x)  # on the CPU: the reference path, as without
    assert all(m.siblings is None for g in groups for m in g)
    assert torch.equal(y, model.model.layers[1].self_attn.q_proj(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grouped launch needs CUDA")
def test_siblings_compute_together_once_and_hand_out_each_output(monkeypatch):
    from pt2llm import nn as pnn
    from pt2llm.kernels import triton_ternary as tt
    model = _cuda_model(layers=1, ternary_seed=2)
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    calls, group = [], tt.linear_group
    monkeypatch.setattr(tt, "linear_group", lambda *a: calls.append(1) or group(*a))
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.float16)
    want = group(x, [m.layer() for m in (q, k, v)], 128)
    with pnn.grouped(model):
        got = [v(x), q(x), k(x)]  # any order: the first computes all three
        assert len(calls) == 1
        assert all(torch.equal(a, b) for a, b in zip(got, [want[2], want[0], want[1]]))
        k(x)
        k(x)  # k's output was handed out already: computed afresh
        assert len(calls) == 3
        q(x)  # kept from the last computation
        assert len(calls) == 3
        y = torch.randn(1, 1, 256, device="cuda", dtype=torch.float16)
        q(y)
        assert len(calls) == 4
        assert torch.equal(k(y.clone()), group(y, [m.layer() for m in (q, k, v)], 128)[1])  # an equal copy:
        assert len(calls) == 5  # another tensor, computed afresh
        q(y)
        assert len(calls) == 6
        y.mul_(2)  # changed in place since: computed afresh
        assert torch.equal(k(y), group(y, [m.layer() for m in (q, k, v)], 128)[1]) and len(calls) == 7
        for m in (q, k, v):  # each alone: the same up to the split-K sum's rounding
            alone = tt.linear(y, *m.layer(), 128)
            assert float((m(y).float() - alone.float()).norm() / alone.float().norm()) < 1e-3
        assert len(calls) == 8  # q and v were kept; k computed again (its kept output was handed out)
    assert q.siblings is None
