"""The decode-attention kernel (kernels/triton_attention.py) against softmax attention in
float64, natively on CUDA and on the CPU through Triton's interpreter; and the "pt2llm"
attention function in a transformers model against SDPA."""
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from pt2llm import attention  # noqa: E402
from pt2llm.speed import cache_arg  # noqa: E402
from pt2llm.kernels import triton_attention as ta  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def _exact(q, k, v, mask, scale):
    """softmax(q kᵀ scale + mask) v in float64 with kv heads repeated; [B, 1, H, D]; a row
    with every key masked gives zeros."""
    B, H, _, D = q.shape
    rep = H // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = q.double() @ k.transpose(-1, -2) * scale                      # [B, H, 1, L]
    if mask is not None:
        add = torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask.double()
        s = s + add
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (w @ v).transpose(1, 2)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _inputs(B, H, Hkv, L, D, gen, dtype=torch.float16):
    q = torch.randn(B, H, 1, D, generator=gen).to(DEV, dtype)
    # a static cache is a slice of a bigger buffer: strided keys and values
    k = torch.randn(B, Hkv, L + 5, D, generator=gen).to(DEV, dtype)[:, :, 3:L + 3]
    v = torch.randn(B, Hkv, L + 5, D, generator=gen).to(DEV, dtype)[:, :, 3:L + 3]
    return q, k, v


@pytest.mark.parametrize("B,H,Hkv,L,D", [(1, 4, 4, 100, 64), (2, 6, 2, 77, 128), (1, 3, 1, 33, 80), (3, 2, 2, 300, 32)])
@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
def test_decode_matches_softmax_attention(B, H, Hkv, L, D, kind, gen):
    q, k, v = _inputs(B, H, Hkv, L, D, gen)
    lens = torch.tensor([L, max(1, L // 3), 5][:B])      # keys each sequence attends to (a static cache's prefix)
    keep = torch.arange(L)[None, :] < lens[:, None]
    if kind == "none":
        mask = None
    elif kind == "bool":
        mask = keep[:, None, None, :].to(DEV)
    else:
        mask = torch.where(keep, 0.0, -math.inf)[:, None, None, :].to(DEV, torch.float16)
    scale = 1 / math.sqrt(D)
    out = ta.decode(q, k, v, mask, scale)
    assert out.shape == (B, 1, H, D) and out.dtype == q.dtype and out.is_contiguous()
    ref = _exact(q, k, v, mask, scale)
    assert _rel(out, ref) < 2e-3
    # the masked tail is not read: garbage there changes nothing
    if mask is not None:
        k2, v2 = k.clone(), v.clone()
        tail = ~keep[:, None, :, None].to(DEV).expand_as(k2)
        k2[tail], v2[tail] = float("nan"), float("nan")
        assert torch.equal(ta.decode(q, k2, v2, mask, scale), out)


def test_cache_arg_follows_the_forward_signature():
    """speed.cache_arg: the KV cache's keyword as model.forward names it (transformers 5.24
    renamed past_key_values to cache and warns on the old name)."""
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            return input_ids

    assert cache_arg(Old()) == "past_key_values" and cache_arg(New()) == "cache"


def test_split_count_and_chunks_cover_every_key():
    for bh, L in [(32, 388), (1, 5), (512, 4096), (7, 100000), (10**5, 50)]:
        s = ta.split_count(bh, L)
        assert 1 <= s <= ta.MAX_SPLITS and (s - 1) * ta.BLOCK_N < L
        assert s == 1 or bh * s <= ta.MAX_PROGRAMS
    assert ta.split_count(32, 388) == -(-388 // ta.BLOCK_N)     # one tile a program at decode sizes
    # one chunk per split actually launched: a split count that leaves the last chunk empty is cut
    gen = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 1, 1, 3 * ta.BLOCK_N + 7, 16, gen)
    assert _rel(ta.decode(q, k, v, None, 0.25), _exact(q, k, v, None, 0.25)) < 2e-3


def test_each_launch_leaves_the_arrival_counters_at_zero(gen):
    """The program that arrives last merges its (sequence, head)'s chunks and resets the count,
    so launch after launch merges the right chunks; on CUDA, more (sequence, head) pairs than
    the default counters hold get counters of their own."""
    q, k, v = _inputs(2, 4, 2, 100, 32, gen)
    for _ in range(2):
        assert _rel(ta.decode(q, k, v, None, 0.2), _exact(q, k, v, None, 0.2)) < 2e-3
        assert not ta._counters(q.device, 8).any()
    if DEV == "cuda":
        q, k, v = _inputs(300, 32, 8, 40, 32, gen)   # 9600 pairs: more than MAX_PROGRAMS
        assert _rel(ta.decode(q, k, v, None, 0.2), _exact(q, k, v, None, 0.2)) < 2e-3
        assert not ta._counters(q.device, 300 * 32).any()


def test_all_masked_sequence_gives_zeros(gen):
    q, k, v = _inputs(2, 2, 2, 50, 64, gen)
    mask = torch.zeros(2, 1, 1, 50, dtype=torch.bool, device=DEV)
    mask[0, ..., :10] = True
    out = ta.decode(q, k, v, mask, 0.125)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[1]) == 0
    assert _rel(out[0], _exact(q[:1], k[:1], v[:1], mask[:1], 0.125)[0]) < 2e-3


def test_bf16(gen):
    q, k, v = _inputs(1, 4, 2, 70, 64, gen, torch.bfloat16)
    out = ta.decode(q, k, v, None, 0.125)
    assert out.dtype == torch.bfloat16
    assert _rel(out, _exact(q, k, v, None, 0.125)) < 1e-2


def test_bad_mask_shape_is_refused(gen):
    q, k, v = _inputs(1, 2, 2, 40, 32, gen)
    with pytest.raises(ValueError, match="mask"):
        ta.decode(q, k, v, torch.ones(1, 1, 2, 40, dtype=torch.bool, device=DEV), 0.1)


def _rotary_exact(x, cos, sin):
    """transformers' x cos + rotate_half(x) sin in float64, rounded to x's dtype."""
    h = x.shape[-1] // 2
    xd = x.double()
    return (xd * cos.double() + torch.cat((-xd[..., h:], xd[..., :h]), -1) * sin.double()).to(x.dtype)


@pytest.mark.parametrize("B,H,Hkv,L,D", [(1, 4, 4, 100, 64), (2, 6, 2, 77, 128), (3, 2, 1, 40, 32)])
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
def test_decode_append_writes_the_cache_then_attends(B, H, Hkv, L, D, rope, kind, gen):
    """decode_append against its parts done apart: the rotary embedding of query and key in
    float64, the new key and value written into the cache at index (StaticCache's index_copy_),
    then softmax attention over the cache in float64. Positions at the first key, inside a
    chunk, at a chunk's start and at the last key; every other cache row untouched; the index
    counter advanced by one with `advance`, left alone without; the arrival counters at 0."""
    q, k, v = _inputs(B, H, Hkv, L, D, gen)
    kn, vn = (torch.randn(B, Hkv, 1, D, generator=gen).to(DEV, torch.float16) for _ in range(2))
    ang = torch.rand(B, 1, 1, D // 2, generator=gen) * 6
    cos, sin = (torch.cat((f(ang), f(ang)), -1).to(DEV, torch.float16) for f in (torch.cos, torch.sin))
    per = -(-L // ta.split_count(B * H, L))
    chunk = -(-per // ta.BLOCK_N) * ta.BLOCK_N             # the kernel's chunk of keys
    for at in sorted({0, 5, chunk, L - 1}):
        keep = (torch.arange(L) <= at)[None, :].expand(B, L)
        mask = None if kind == "none" else (keep[:, None, None, :].to(DEV) if kind == "bool" else
                                            torch.where(keep, 0.0, -math.inf)[:, None, None, :].to(DEV, torch.float16))
        for advance in (True, False):
            key, value = k.clone(), v.clone()
            index = torch.tensor([at], device=DEV)
            out = ta.decode_append(q, kn, vn, cos if rope else None, sin if rope else None, key, value, index,
                                   mask, 0.2, advance)
            qr, kr = (_rotary_exact(t, cos, sin) for t in (q, kn)) if rope else (q, kn)
            want_k, want_v = k.clone(), v.clone()
            want_k[:, :, at], want_v[:, :, at] = kr[:, :, 0], vn[:, :, 0]
            assert int(index) == at + advance
            torch.testing.assert_close(key, want_k, rtol=1e-3, atol=1e-3)
            assert torch.equal(value, want_v)
            rows = torch.arange(L) != at
            assert torch.equal(key[:, :, rows], k[:, :, rows])
            assert _rel(out, _exact(qr, want_k, want_v, mask, 0.2)) < 2e-3
            assert not ta._counters(q.device, B * H + 1).any()


def test_decode_append_rounds_the_rotated_query_as_the_unfused_step(gen):
    """The rotated query is rounded to fp16 once, as the unfused step's q_embed tensor is, before
    the scores: with sin = 0 the rotation is q cos, exact in fp32, so the launch with cos and
    sin gives what the launch without them gives on q cos and k cos rounded to fp16 (the
    sharp scale makes a skipped rounding visible in the output)."""
    B, H, Hkv, L, D = 2, 4, 2, 40, 64
    q, k, v = _inputs(B, H, Hkv, L, D, gen)
    kn, vn = (torch.randn(B, Hkv, 1, D, generator=gen).to(DEV, torch.float16) for _ in range(2))
    cos = (torch.rand(B, 1, 1, D, generator=gen) + 0.5).to(DEV, torch.float16)
    sin = torch.zeros_like(cos)
    outs, keys = [], []
    for rope in (True, False):
        key, value, index = k.clone(), v.clone(), torch.tensor([9], device=DEV)
        if rope:
            args = (q, kn, vn, cos, sin)
        else:
            args = ((q.float() * cos.float()).half(), (kn.float() * cos.float()).half(), vn, None, None)
        outs.append(ta.decode_append(*args, key, value, index, None, 2.0, True))
        keys.append(key)
    assert torch.equal(keys[0], keys[1])
    assert _rel(outs[0], outs[1]) < 1e-5


def test_decode_append_refuses_what_it_cannot_write(gen):
    q, k, v = _inputs(1, 4, 2, 40, 32, gen)
    kn = torch.randn(1, 2, 1, 32, generator=gen).to(DEV, torch.float16)
    idx = torch.tensor([3], device=DEV)
    with pytest.raises(ValueError, match="new key"):
        ta.decode_append(q, kn[:, :1], kn, None, None, k, v, idx, None, 0.1, True)
    with pytest.raises(ValueError, match="int64"):
        ta.decode_append(q, kn, kn, None, None, k, v, idx.int(), None, 0.1, True)
    with pytest.raises(ValueError, match="cos and sin"):
        ta.decode_append(q, kn, kn, kn[0, :1], None, k, v, idx, None, 0.1, True)
    with pytest.raises(ValueError, match="unit last stride"):
        ta.decode_append(q, kn, kn, None, None, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, idx,
                         None, 0.1, True)


def test_model_decode_with_pt2llm_attention_matches_sdpa(monkeypatch):
    """A tiny Qwen2 (grouped-query attention) decodes the same tokens and near-identical
    logits with the "pt2llm" attention function as with SDPA, through a static cache and a
    bool mask as speed.Decoder passes them. On the CPU the kernel runs in the interpreter
    (the function's CUDA check is lifted)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, StaticCache
    if not CUDA:
        monkeypatch.setattr(attention, "takes", lambda q, k, dropout, kw: ta.supported(q, k) and not dropout)
    calls = []
    real = ta.decode
    monkeypatch.setattr(ta, "decode", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    dtype = torch.float16
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(DEV).eval()

    def decode_logits(steps=6, prompt_len=9, max_len=24):
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        ids = torch.arange(3, 3 + prompt_len, device=DEV)[None]
        pos = torch.arange(prompt_len, device=DEV)
        out = model(input_ids=ids, **{cache_arg(model): cache}, cache_position=pos, use_cache=True)
        mask = torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device=DEV)
        mask[..., :prompt_len] = True
        tok, logits = out.logits[:, -1:].argmax(-1), []
        for p in range(prompt_len, prompt_len + steps):
            mask[..., p] = True
            o = model(input_ids=tok, **{cache_arg(model): cache}, cache_position=torch.tensor([p], device=DEV),
                      position_ids=torch.tensor([[p]], device=DEV), attention_mask=mask, use_cache=True)
            logits.append(o.logits[:, -1].float())
            tok = o.logits[:, -1:].argmax(-1)
        return torch.cat(logits)

    with torch.no_grad():
        ref = decode_logits()
        before = attention.use(model)
        assert model.config._attn_implementation == attention.NAME
        got = decode_logits()
        attention.restore(model, before)
    assert model.config._attn_implementation == before
    assert len(calls) == 2 * 6                                # every layer of every decode step, prefill not
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert _rel(got, ref) < 5e-3


def test_decoder_switches_attention_and_close_gives_it_back():
    """speed.Decoder runs its steps on the "pt2llm" attention function (on the CPU it hands
    every call to SDPA: the same tokens as the model's own) and close() restores the model's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pt2llm.speed import Decoder
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    before = model.config._attn_implementation
    prompt = torch.randint(0, 100, (1, 6))
    ref = Decoder(model, 1, 20, attention="model").generate(prompt, 6)
    assert model.config._attn_implementation == before
    dec = Decoder(model, 1, 20)
    assert model.config._attn_implementation == attention.NAME
    assert torch.equal(dec.generate(prompt, 6), ref)
    dec.close()
    assert model.config._attn_implementation == before
    with pytest.raises(ValueError, match="attention"):
        Decoder(model, 1, 20, attention="flash")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_uncompiled_decoder_steps_through_one_append_launch(monkeypatch, arch):
    """speed.Decoder's uncompiled step on a tiny Llama, Qwen2 (GQA, q/k/v biases) and Mistral: each
    layer's one-token step goes to decode_append (attention.fused_decode: the rotary embedding,
    the static cache's write and length, the attention), and the tokens, caches and lengths
    are those of the model's own attention; close() gives the modules their forward back. On
    the CPU the kernel runs in Triton's interpreter (the device check is lifted)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from pt2llm.speed import Decoder
    if not CUDA:
        monkeypatch.setattr(attention, "_runs_here", lambda h: True)
    calls = []
    real = ta.decode_append
    monkeypatch.setattr(ta, "decode_append", lambda *a: calls.append(a[-1]) or real(*a))
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
    assert calls == []
    dec = Decoder(model, 2, 24)
    got = dec.generate(prompt, 8)
    mods = [m for m in model.modules() if type(m).__name__ in attention.ATTENTIONS]
    assert len(mods) == 2 and all("forward" in m.__dict__ for m in mods)
    dec.close()
    assert not any("forward" in m.__dict__ for m in mods)
    assert calls == [True] * (2 * 7)                      # two layers, seven decode steps, advancing
    assert torch.equal(got, want)
    for a, b in zip(dec.cache.layers, ref.cache.layers):
        assert int(a.cumulative_length) == int(b.cumulative_length) == 14
        torch.testing.assert_close(a.keys, b.keys, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(a.values, b.values, rtol=2e-3, atol=2e-3)


def test_fused_decode_leaves_other_steps_to_the_module(monkeypatch):
    """Inside attention.fused_decode, what decode_append would not do exactly as transformers
    does runs the module's own forward: a prefill (many tokens), a dynamic cache, a sliding
    window (Qwen2's on the module, Mistral's in its cache's layers), the model's own attention
    function; the logits equal those outside it. A static
    cache's one-token step with the "pt2llm" function is the control: it takes the kernel."""
    from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, Qwen2Config, StaticCache

    if not CUDA:
        monkeypatch.setattr(attention, "_runs_here", lambda h: True)
    calls = []
    real = ta.decode_append
    monkeypatch.setattr(ta, "decode_append", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).to(DEV).eval()
    ids = torch.randint(0, 120, (1, 6), generator=torch.Generator().manual_seed(2)).to(DEV)
    before = attention.use(model)

    def run(cache, sliding=False):
        for m in model.modules():
            if type(m).__name__ in attention.ATTENTIONS:
                m.sliding_window = 4 if sliding else None
        pos = torch.arange(6, device=DEV)
        first = model(input_ids=ids, **{cache_arg(model): cache}, cache_position=pos, use_cache=True).logits
        nxt = model(input_ids=ids[:, :1], **{cache_arg(model): cache}, cache_position=pos[-1:] + 1,
                    position_ids=pos[None, -1:] + 1, use_cache=True).logits
        return first, nxt

    with torch.no_grad():
        for make, sliding in ((lambda: DynamicCache(config=model.config), False),
                              (lambda: StaticCache(config=model.config, max_cache_len=12), True)):
            plain = run(make(), sliding)
            with attention.fused_decode(model):
                fused = run(make(), sliding)
            for a, b in zip(fused, plain):
                assert torch.equal(a, b)
        assert calls == []
        mistral = AutoModelForCausalLM.from_config(MistralConfig(
            vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, sliding_window=8), dtype=torch.float16).to(DEV).eval()
        attention.use(mistral)
        with attention.fused_decode(mistral):               # a static cache of sliding-window layers
            cache = StaticCache(config=mistral.config, max_cache_len=12)
            mistral(input_ids=ids, **{cache_arg(mistral): cache}, use_cache=True)
            mistral(input_ids=ids[:, :1], **{cache_arg(mistral): cache}, use_cache=True)
        assert calls == []
        with attention.fused_decode(model):                 # the control: a static cache's step
            run(StaticCache(config=model.config, max_cache_len=12))
        assert calls == [1, 1]                               # one a layer, the decode step only
        attention.restore(model, before)
        with attention.fused_decode(model):
            run(StaticCache(config=model.config, max_cache_len=12))
    assert calls == [1, 1]


@pytest.mark.skipif(not CUDA, reason="a CUDA graph of the decode step")
def test_decode_step_captured_as_a_cuda_graph_uses_the_kernel():
    """`pt2llm bench`'s decode loop on CUDA: the step, with the kernel in every layer, captured
    as a CUDA graph and replayed, decodes what the eager step with SDPA decodes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pt2llm.speed import Decoder
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).cuda().eval()
    prompt = torch.randint(0, 100, (1, 9), device="cuda")
    ref = Decoder(model, 1, 30, attention="model").generate(prompt, 10)
    dec = Decoder(model, 1, 30)
    dec.prefill(prompt)
    dec.capture()
    assert torch.equal(dec.generate(prompt, 10), ref)
    dec.close()
