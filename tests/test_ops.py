"""The custom ops torch.compile sees (pt2llm/kernels/ops.py; the decode-attention op's own
tests are tests/test_attention.py): on the CPU through Triton's
interpreter, torch.library's own checks (schema, fake tensor, autograd registration) and a
compiled call equal to the eager kernel; on CUDA, a compiled TernaryLinear (with and without
an online Hadamard) against its eager forward, through the op."""
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from pt2llm.kernels import ops  # noqa: E402
from pt2llm.kernels import triton_ternary as tt  # noqa: E402
from pt2llm.rotate import hadamard  # noqa: E402
from pt2llm.rotate.online import OnlineHadamard  # noqa: E402
from tinymodels import random_ternary  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def _layer(out_f, in_f, gen, bias=True):
    return random_ternary(out_f, in_f, gen, bias).to(DEV)


def _args(mod, x):
    return (x, mod.packed, mod.alpha, mod.mu, mod.perm, mod.bias, mod.out_features, mod.block_size)


@pytest.mark.parametrize("bias", [True, False])
def test_ternary_linear_op_passes_torch_library_checks(bias):
    gen = torch.Generator().manual_seed(1)
    mod = _layer(37, 300, gen, bias)
    x = torch.randn(2, 3, 300, generator=gen).half().to(DEV)
    torch.library.opcheck(torch.ops.pt2llm.ternary_linear.default, _args(mod, x),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiled_op_gives_the_eager_kernels_output():
    gen = torch.Generator().manual_seed(2)
    mod = _layer(40, 256, gen)
    x = torch.randn(5, 256, generator=gen).half().to(DEV)
    f = torch.compile(lambda x: ops.ternary_linear(*_args(mod, x)) * 2, backend="aot_eager", fullgraph=True)
    y = f(x)
    ref = tt.linear(*_args(mod, x)) * 2
    assert y.shape == (5, 40) and y.dtype == torch.float16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_hadamard_op_passes_torch_library_checks():
    gen = torch.Generator().manual_seed(3)
    signs = hadamard.random_signs(896, gen).to(DEV)
    x = torch.randn(4, 896, generator=gen).half().to(DEV)
    torch.library.opcheck(torch.ops.pt2llm.hadamard_input.default, (x, signs),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.skipif(not CUDA, reason="TernaryLinear takes the kernels (and so the op) on CUDA only")
@pytest.mark.parametrize("rotated", [False, True])
def test_compiled_ternary_linear_goes_through_the_op_and_matches_eager(rotated):
    gen = torch.Generator().manual_seed(4)
    mod = _layer(1000, 1408, gen)
    if rotated:
        mod.input_transform = OnlineHadamard(1408, hadamard.random_signs(1408, gen), device=DEV)
    counter = CompileCounterWithBackend("inductor")
    f = torch.compile(mod, backend=counter, fullgraph=True)
    for m in (1, 8, 200):
        x = torch.randn(m, 1408, generator=gen).half().to(DEV)
        torch.testing.assert_close(f(x), mod(x), rtol=1e-3, atol=1e-3)
    assert counter.frame_count >= 1
    # the graph dynamo built calls the op (not the Python launchers, which it cannot trace)
    graph = "\n".join(str(g.graph) for g in counter.graphs)
    assert "pt2llm.ternary_linear" in graph
    assert ("pt2llm.hadamard_input" in graph) == rotated


@pytest.mark.parametrize("n", [1400, 200])
def test_compiled_online_transform_of_any_width(n):
    """Widths the Triton transform does not take: 1400 = 175 x 8 has a random small factor, made
    by a seeded generator that dynamo cannot trace (so the op runs it), 200 a Paley one (traced)."""
    gen = torch.Generator().manual_seed(6)
    mod = OnlineHadamard(n, hadamard.random_signs(n, gen), device=DEV)
    hadamard._factor_on.cache_clear()
    torch._dynamo.reset()
    f = torch.compile(mod, backend="aot_eager", fullgraph=True)
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(3, n, generator=gen).to(DEV, dtype)
        tol = 1e-5 if dtype == torch.float32 else 2e-3  # a traced path may round apart from eager (GPU)
        torch.testing.assert_close(f(x), mod(x), rtol=tol, atol=tol)
    torch._dynamo.reset()


@pytest.mark.skipif(not CUDA, reason="torch.compile's CUDA graphs need CUDA")
@pytest.mark.parametrize("rotated", [False, True])
def test_reduce_overhead_compile_with_the_caches_empty(rotated):
    """mode="reduce-overhead" (CUDA graph trees, what transformers' static-cache generate
    compiles with) runs its first call with the stream's allocations routed to the tree's pool;
    the kernels' lasting tensors (split-K counters for a new stream, the online transform's
    factors) made then must stay out of that pool, or the tree refuses to record."""
    from pt2llm.kernels import cuda_ternary
    gen = torch.Generator().manual_seed(5)
    mod = _layer(1000, 1400, gen)  # 1400 = 175 x 8: the torch path, with a random factor of order 175
    if rotated:
        mod.input_transform = OnlineHadamard(1400, hadamard.random_signs(1400, gen), device=DEV)
    x = torch.randn(1, 1400, generator=gen).half().to(DEV)
    ref = mod(x).clone()
    torch._dynamo.reset()
    cuda_ternary._counters.cache_clear()  # emptied after the eager call, which fills them
    hadamard._factor_on.cache_clear()
    hadamard._sylvester_on.cache_clear()
    f = torch.compile(mod, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, recording, replays
        y = f(x)
        torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3)
    torch._dynamo.reset()


def test_group_op_passes_torch_library_checks():
    gen = torch.Generator().manual_seed(5)
    mods = [_layer(n, 256, gen, bias=b) for n, b in ((40, True), (13, False), (13, True))]
    x = torch.randn(3, 256, generator=gen).half().to(DEV)
    args = (x, *([getattr(m, a) for m in mods] for a in ("packed", "alpha", "mu", "perm", "bias")),
            [m.out_features for m in mods], 128)
    torch.library.opcheck(torch.ops.pt2llm.ternary_linear_group.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_backend_groups_the_linears_that_read_one_input():
    """ops.backend puts q/k/v-like calls on one input into one group call (at most three), leaves
    a call on another input alone, and the compiled function gives the eager outputs."""
    import functools

    gen = torch.Generator().manual_seed(6)
    q, k, v, g, o = (_layer(n, 256, gen, bias=n != 13) for n in (40, 13, 13, 37, 40))
    w = _layer(20, 40, gen)

    def fn(x):
        a, b, c, d = (ops.ternary_linear(*_args(m, x)) for m in (q, k, v, g))
        e = ops.ternary_linear(*_args(w, a))  # another input: not grouped
        return a, b, c, d, e, ops.ternary_linear(*_args(o, x))

    graphs = []

    def spy(gm, inputs):
        made = ops.group_linears(gm)
        graphs.append((made, str(gm.graph)))
        return gm.forward

    x = torch.randn(2, 256, generator=gen).half().to(DEV)
    ref = fn(x)
    out = torch.compile(fn, backend=spy, fullgraph=True)(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (made, graph), = graphs
    assert made == 2  # q/k/v and then g/o: groups of at most three, in graph order
    assert graph.count("pt2llm.ternary_linear_group.default") == 2
    assert graph.count("pt2llm.ternary_linear.default") == 1  # w, on a's output
    # the backend as torch.compile takes it, with a backend inside other than Inductor
    out = torch.compile(fn, backend=functools.partial(ops.backend, inner="aot_eager"), fullgraph=True)(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_glu_op_passes_torch_library_checks():
    gen = torch.Generator().manual_seed(10)
    mod = _layer(37, 300, gen)
    g, u = (torch.randn(2, 300, generator=gen).half().to(DEV) for _ in range(2))
    args = (g, u, *_args(mod, g)[1:])
    torch.library.opcheck(torch.ops.pt2llm.ternary_linear_glu.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_backend_gives_a_down_projection_its_silu_product():
    """fuse_glu: ternary_linear(silu(g) * u) becomes one ternary_linear_glu(g, u) call, with the
    factors either way round; a product or a SiLU that feeds anything else, a product without a
    SiLU and an in-place SiLU stay as they are. The compiled function gives the eager outputs (on
    the CPU the op computes the product first, bit for bit; the CUDA kernel rounds it once)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(11)
    gate, up = (_layer(300, 256, gen, bias=False) for _ in range(2))
    down = _layer(40, 300, gen)

    def lin(m, x):
        return ops.ternary_linear(*_args(m, x))

    def fn(x):
        g, u = lin(gate, x), lin(up, x)
        a = lin(down, F.silu(g) * u)               # fused
        b = lin(down, u * F.silu(g))               # fused: the factors the other way round
        s = F.silu(u)
        c = lin(down, s * g) + s[:, :40]           # the SiLU feeds another op: kept
        p = F.silu(g) * g
        d = lin(down, p) + p[:, :40]               # the product feeds another op: kept
        e = lin(down, g * u)                       # no SiLU: kept
        return a, b, c, d, e

    graphs = []

    def spy(gm, inputs):
        graphs.append((ops.group_linears(gm), ops.fuse_glu(gm), str(gm.graph)))
        return gm.forward

    x = torch.randn(3, 256, generator=gen).half().to(DEV)
    ref = fn(x)
    torch._dynamo.reset()
    out = torch.compile(fn, backend=spy, fullgraph=True)(x)
    tol = 0 if DEV == "cpu" else 2e-3
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    (grouped, fused, graph), = graphs
    assert (grouped, fused) == (1, 2)
    assert graph.count("pt2llm.ternary_linear_glu.default") == 2
    assert graph.count("pt2llm.ternary_linear.default") == 3  # c, d and e
    # an in-place SiLU is left alone
    for inplace, want in ((False, 1), (True, 0)):
        gm = torch.fx.symbolic_trace(lambda g, u: lin(down, F.silu(g, inplace=inplace) * u))
        assert ops.fuse_glu(gm) == want
    torch._dynamo.reset()


def test_backend_gives_the_linears_after_an_rms_norm_the_norm_and_the_residual_add():
    """fuse_norm: q/k/v-like calls on transformers' RMSNorm (the Llama module itself) of
    h = res + delta become one ternary_linear_norm(res, delta, ...) call that also gives h to
    h's later readers; a norm of the model's input (no add) is fused without one; a norm with
    another reader, or of more than one row, is not. The compiled function gives
    the eager outputs (on the CPU bit for bit: the op's norm is the module's arithmetic)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(12)
    q, k, v = (_layer(n, 256, gen, bias=n != 13) for n in (40, 13, 13))
    o = _layer(256, 40, gen)
    norm = LlamaRMSNorm(256, eps=1e-5).to(DEV).half()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256, generator=gen) + 0.5)

    def lin(m, x):
        return ops.ternary_linear(*_args(m, x))

    def fn(res, delta):
        x = norm(res)                       # no add before it: fused without one
        a = lin(o, lin(q, x))
        h = res + delta + a                 # the first add is not the norm's input
        y = norm(h)                         # fused with the add: h's other reader comes later
        qq, kk, vv = lin(q, y), lin(k, y), lin(v, y)
        h2 = h + lin(o, qq)
        early = h2 * 3                      # a reader of h2 before the call: the add stays
        w = lin(q, norm(h2))
        h3 = h2 + lin(o, w)
        z = norm(h3)
        return qq, kk, vv, early, lin(k, z) + z[..., :13]   # z has another reader: kept

    graphs = []
    norm_op = torch.ops.pt2llm.ternary_linear_norm.default

    def spy(gm, inputs):
        made = (ops.group_linears(gm), ops.fuse_norm(gm))
        adds = [n.args[1] is not None for n in gm.graph.nodes if n.target is norm_op]
        graphs.append((*made, adds))
        return gm.forward

    for rows, dtype, want in ((1, torch.float16, 3), (2, torch.float16, 0)):
        res = torch.randn(1, rows, 256, generator=gen).to(DEV, dtype)
        delta = torch.randn(1, rows, 256, generator=gen).to(DEV, dtype)
        with torch.no_grad():
            ref = fn(res, delta)
            torch._dynamo.reset()
            graphs.clear()
            out = torch.compile(fn, backend=spy, fullgraph=True)(res, delta)
        tol = 0 if DEV == "cpu" else 2e-3
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        (grouped, fused, adds), = graphs
        assert (grouped, fused) == (1, want), rows
        assert adds == ([False, True, False] if want else [])
    torch._dynamo.reset()


def test_norm_op_passes_torch_library_checks():
    gen = torch.Generator().manual_seed(13)
    mods = [_layer(n, 256, gen, bias=b) for n, b in ((40, True), (13, False))]
    res, delta = (torch.randn(1, 256, generator=gen).half().to(DEV) for _ in range(2))
    weight = (torch.rand(256, generator=gen) + 0.5).half().to(DEV)
    lists = [[getattr(m, a) for m in mods] for a in ("packed", "alpha", "mu", "perm", "bias")]
    for d in (delta, None):
        torch.library.opcheck(torch.ops.pt2llm.ternary_linear_norm.default,
                              (res, d, weight, 1e-5, *lists, [m.out_features for m in mods], 128),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_backend_is_registered_and_hands_mode_and_options_to_inductor(monkeypatch):
    """torch.compile(backend="pt2llm", mode=...) calls ops.backend with mode / options; they reach
    Inductor as config patches, as they would without the grouping pass."""
    from torch._dynamo.backends import registry
    assert "pt2llm" in torch._dynamo.list_backends(exclude_tags=())
    seen = []

    def fake_inductor(gm, inputs, **kw):
        seen.append(kw)
        return gm.forward

    monkeypatch.setattr(registry, "lookup_backend", lambda name: fake_inductor)
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    ops.backend(gm, [torch.zeros(1)])
    ops.backend(gm, [torch.zeros(1)], mode="reduce-overhead")
    ops.backend(gm, [torch.zeros(1)], options={"max_autotune": True})
    assert seen == [{}, {"config_patches": {"triton.cudagraphs": True}},
                    {"config_patches": {"max_autotune": True}}]


def test_decode_attention_op_passes_torch_library_checks():
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 1, 32, generator=gen).half().to(DEV)
    k, v = (torch.randn(1, 2, 40, 32, generator=gen).half().to(DEV) for _ in range(2))
    mask = (torch.arange(40) < 25)[None, None, None].to(DEV)
    torch.library.opcheck(torch.ops.pt2llm.decode_attention.default, (q, k, v, mask, 0.2),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_decode_attention_append_op_passes_torch_library_checks():
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 1, 32, generator=gen).half().to(DEV)
    kn, vn = (torch.randn(1, 2, 1, 32, generator=gen).half().to(DEV) for _ in range(2))
    cos, sin = (torch.rand(1, 1, 1, 32, generator=gen).half().to(DEV) for _ in range(2))
    k, v = (torch.randn(1, 2, 40, 32, generator=gen).half().to(DEV) for _ in range(2))
    mask = (torch.arange(40) < 25)[None, None, None].to(DEV)
    for rope in ((cos, sin), (None, None)):
        torch.library.opcheck(torch.ops.pt2llm.decode_attention_append.default,
                              (q, kn, vn, *rope, k, v, torch.tensor([24], device=DEV), mask, 0.2, True),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _rotary(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


def test_backend_folds_the_cache_write_and_the_rotary_embedding_into_the_attention():
    """fuse_cache_write on transformers' StaticLayer.update arithmetic before the decode
    attention op: the rotary embedding of q and k, the cache's length counter (pos = arange(1)
    + counter; counter.add_(1)) and both index_copy_ writes become one decode_attention_append
    call. A counter read elsewhere stays where it is (the call gets pos, no advance); a rotated
    query with another reader keeps its rotary embedding; a cache read elsewhere keeps the
    whole step. The compiled function leaves the same caches and counter and gives the eager
    output."""
    gen = torch.Generator().manual_seed(5)
    attn = torch.ops.pt2llm.decode_attention

    def step(q, k, v, cos, sin, keys, values, counter, mask, variant):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        qe, ke = _rotary(q, cos, sin), _rotary(k, cos, sin)
        pos = torch.arange(1, device=q.device) + counter
        counter.add_(1)
        keys.index_copy_(2, pos, ke)
        values.index_copy_(2, pos, v)
        out = attn(qe, keys, values, mask, 0.25)
        if variant == "counter":
            return out, counter * 2
        if variant == "query":
            return out, qe * 2
        if variant == "cache":
            return out, keys.sum()
        return out, out

    seen = []
    fused_op = torch.ops.pt2llm.decode_attention_append.default

    def spy(gm, inputs):
        made = ops.fuse_cache_write(gm)
        calls = [n for n in gm.graph.nodes if n.target is fused_op]
        seen.append((made, [(c.args[3] is not None, c.args[10]) for c in calls],
                     sum(n.target == "index_copy_" for n in gm.graph.nodes)))
        return gm.forward

    B, H, Hkv, L, D = 2, 4, 2, 40, 16
    q = torch.randn(B, H, 1, D, generator=gen).half().to(DEV)
    k, v = (torch.randn(B, Hkv, 1, D, generator=gen).half().to(DEV) for _ in range(2))
    ang = torch.rand(B, 1, D // 2, generator=gen) * 3
    cos, sin = (torch.cat((f(ang), f(ang)), -1).half().to(DEV) for f in (torch.cos, torch.sin))
    cache = [torch.randn(B, Hkv, L, D, generator=gen).half().to(DEV) for _ in range(2)]
    mask = (torch.arange(L) <= 7)[None, None, None].expand(B, 1, 1, L).to(DEV)
    want = {"plain": (1, [(True, True)], 0), "counter": (1, [(True, False)], 0),
            "query": (1, [(False, True)], 0), "cache": (0, [], 2)}
    for variant, expect in want.items():
        states = [[t.clone() for t in cache] + [torch.tensor(7, device=DEV)] for _ in range(2)]
        with torch.no_grad():
            ref = step(q, k, v, cos, sin, *states[0], mask, variant)
            torch._dynamo.reset()
            seen.clear()
            got = torch.compile(step, backend=spy, fullgraph=True)(q, k, v, cos, sin, *states[1], mask, variant)
        assert seen == [expect], variant
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)
        for a, b in zip(states[1], states[0]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        assert int(states[1][2]) == 8
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_a_compiled_decode_step_writes_its_cache_in_the_attention(monkeypatch, arch):
    """speed.Decoder with compile=True (ops.backend, Inductor) on a tiny Llama, Qwen2 and Mistral (GQA,
    q/k/v biases): every layer's cache write, rotary embedding and length counter go into the
    attention call (fuse_cache_write), and the step decodes the tokens of the uncompiled step
    on the model's own attention, with caches and counters alike. On the CPU the kernels run
    in Triton's interpreter (the attention function's CUDA check is lifted)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from pt2llm import attention
    from pt2llm.kernels import triton_attention as ta
    from pt2llm.speed import Decoder
    if not CUDA:
        monkeypatch.setattr(attention, "takes", lambda q, k, dropout, kw: ta.supported(q, k) and not dropout)
    made = []
    real = ops.fuse_cache_write
    monkeypatch.setattr(ops, "fuse_cache_write", lambda gm: made.append(real(gm)) or made[-1])
    torch.manual_seed(0)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](
        vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)
    if arch == "mistral":
        cfg.sliding_window = None   # with a window, StaticCache makes sliding layers: not fused
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).to(DEV).eval()
    prompt = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(3)).to(DEV)
    ref = Decoder(model, 2, 24, attention="model")
    want = ref.generate(prompt, 8)
    torch._dynamo.reset()
    dec = Decoder(model, 2, 24, compile=True)
    got = dec.generate(prompt, 8)
    dec.close()
    torch._dynamo.reset()
    assert made == [2]
    assert torch.equal(got, want)
    for a, b in zip(dec.cache.layers, ref.cache.layers):
        assert int(a.cumulative_length) == int(b.cumulative_length) == 7 + 7
        torch.testing.assert_close(a.keys, b.keys, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(a.values, b.values, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not CUDA, reason="the compiled path uses the GPU kernels")
@pytest.mark.parametrize("rotate", ["hadamard", "none"])
def test_a_compiled_qwen2_runs_its_linears_in_groups(tmp_path, rotate):
    """End to end through `pt2llm quantize` and `pt2llm.load` on a two-layer Qwen2 of
    Qwen2.5-0.5B's widths (q/k/v biases, GQA; rotated: online Hadamards on o_proj and
    down_proj): compiled with ops.backend, each layer's q/k/v and gate/up become one group
    call that takes its RMSNorm (and the residual add before it), down_proj takes the SiLU
    product where no transform comes between (unrotated), and one decoding position's logits
    match the eager model's."""
    from torch._dynamo.backends.registry import lookup_backend
    from transformers import AutoModelForCausalLM, Qwen2Config

    import pt2llm
    from tinymodels import quantize, text, tokenizer

    torch.manual_seed(0)
    tok = tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "float")
    tok.save_pretrained(tmp_path / "float")
    (tmp_path / "calib.txt").write_text(text(1))
    quantize(tmp_path, tmp_path / "q", "--method", "rtn", "--rotate", rotate)
    model, _ = pt2llm.load(tmp_path / "q", device="cuda")
    made, fused, normed = [], [], []

    def backend(gm, example_inputs):
        made.append(ops.group_linears(gm))
        fused.append(ops.fuse_glu(gm))
        normed.append(ops.fuse_norm(gm))
        return lookup_backend("inductor")(gm, example_inputs)

    ids = torch.randint(3, len(tok), (1, 1), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        torch._dynamo.reset()
        got = torch.compile(model.forward, backend=backend, fullgraph=True)(input_ids=ids, use_cache=False).logits
    assert made == [4]  # two layers: q/k/v and gate/up each
    assert fused == [0 if rotate == "hadamard" else 2]
    assert normed == [4]  # each layer's two norms (and the residual add before all but the first)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
