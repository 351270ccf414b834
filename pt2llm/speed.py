"""Decoding on a static KV cache (`pt2llm generate`: greedy, or sampled by pt2llm.sampling),
and the prefill and decode speed of a causal LM on one CUDA GPU (what `pt2llm bench` reports).

Prefill: one forward pass over `batch` prompts of `prompt_len` random tokens (logits of the
last position only), timed with CUDA events, median of a few. Decode: greedy, one token
at a time into a static KV cache (transformers' StaticCache), the whole step (forward,
argmax, advancing position and mask) captured once as a CUDA graph and replayed, so the
GPU is not left waiting on Python; `graphs=False` runs the same step eagerly. The decode
step's attention is the split-key Triton kernel (pt2llm.attention, kernels/triton_attention.py;
`attention="model"` keeps the model's own, SDPA by default). With
`compile=True` the model's forward in that step goes through torch.compile first (Inductor,
no CUDA graphs of its own: the step's graph holds it), which fuses the small kernels
between the linears (norms, rotary embedding, the SiLU product); TernaryLinear and the
online Hadamard reach it as opaque custom ops, and the ternary linears that read one input
(q/k/v, gate/up) become one launch (kernels/ops.py, `backend`, which also folds the norms,
the SiLU product and the cache write with its rotary embedding into the kernels around them);
without it the step groups them itself (nn.grouped), runs each RMSNorm as one kernel
(nn.fused_norms) and each attention module's rotary embedding, cache write and attention as
one launch (attention.fused_decode). Prefill stays eager.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

from .kernels.dependent import dependent_launches
from .sampling import GREEDY, Sampling, next_tokens


def cache_arg(model) -> str:
    """The name under which model.forward takes its KV cache: "cache" in transformers that
    renamed it (5.24 warns on the old name, which 5.40 drops), else "past_key_values"."""
    import inspect
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (tied tensors once)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n


def _events_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return times


class Decoder:
    """A one-token decode step on a static cache, as a CUDA graph (or eager). The next token
    is the argmax, or drawn as `sampling` says (its noise from self.generator, which the
    graph replays advance)."""

    def __init__(self, model, batch: int, max_len: int, compile: bool = False, attention: str = "pt2llm",
                 sampling: Sampling = GREEDY):
        from transformers import StaticCache

        if attention not in ("pt2llm", "model"):
            raise ValueError(f"attention must be 'pt2llm' or 'model', got {attention!r}")
        dev = next(model.parameters()).device
        self.model, self.max_len, self.compiled = model, max_len, compile
        self._attn_before = None
        if attention == "pt2llm":  # the model's attention function until close(); prefill falls back to SDPA
            from . import attention as attn
            self._attn_before = attn.use(model)
        # the decode step's forward: compiled for one shape (batch x 1 token), not the prefill's
        if compile:  # Inductor after grouping the ternary linears that share an input (kernels/ops.py)
            from .kernels import ops
            self.forward = torch.compile(model.forward, dynamic=False, backend=ops.backend)
        else:
            self.forward = model.forward
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._cache_arg = cache_arg(model)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=dev)  # True: attend
        self.sampling = sampling
        self.generator = None if sampling.greedy else torch.Generator(device=dev).manual_seed(sampling.seed)
        self.seen = None  # [batch, V] bool, the tokens in each sequence so far (repetition penalty only)
        self.graph = None
        # q/k/v and gate/up in one launch each, each RMSNorm one kernel, and the attention with
        # its rotary embedding and cache write one launch, in the uncompiled step (torch.compile
        # groups and fuses them itself)
        self._grouping = contextlib.ExitStack()
        if not compile:
            from .nn import fused_norms, grouped
            self._grouping.enter_context(grouped(model))
            self._grouping.enter_context(fused_norms(model))
            if attention == "pt2llm":
                from .attention import fused_decode
                self._grouping.enter_context(fused_decode(model))

    def _choose(self, logits: torch.Tensor) -> None:
        self.ids.copy_(next_tokens(logits[:, -1], self.sampling, self.generator, self.seen))
        if self.seen is not None:
            self.seen.scatter_(1, self.ids, True)

    def reseed(self) -> None:
        """Start the sampling noise again from the seed (the next prefill draws the first)."""
        if self.generator is not None:
            self.generator.manual_seed(self.sampling.seed)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Fill the cache with the prompt (eager) and set up the first decode step."""
        self.cache.reset()
        n = prompt.shape[1]
        pos = torch.arange(n, device=prompt.device)
        out = self.model(input_ids=prompt, **{self._cache_arg: self.cache}, cache_position=pos,
                         position_ids=pos[None].expand(prompt.shape[0], -1), use_cache=True, logits_to_keep=1)
        if self.sampling.penalised:  # the prompt's tokens count as seen
            shape = (prompt.shape[0], out.logits.shape[-1])
            if self.seen is None or self.seen.shape != shape:
                self.seen = torch.zeros(shape, dtype=torch.bool, device=prompt.device)
            self.seen.zero_()
            self.seen.scatter_(1, prompt, True)
        self._choose(out.logits)
        self.pos.fill_(n)
        self.mask.zero_()
        self.mask[..., :n] = True

    @torch.no_grad()
    def _step(self) -> None:
        self.mask.index_fill_(-1, self.pos, True)
        # the weights are fixed here: in the compiled step each ternary launch may start early
        # (most follow another ternary launch there); the uncompiled step's follow other kernels,
        # where dependent launches measured 3 % slower (docs/results/e2e.md, session 24)
        with dependent_launches(self.compiled):
            out = self.forward(input_ids=self.ids, **{self._cache_arg: self.cache}, cache_position=self.pos,
                               position_ids=self.pos[None].expand(self.ids.shape[0], 1), attention_mask=self.mask,
                               use_cache=True)
        self._choose(out.logits)
        self.pos.add_(1)

    def capture(self) -> None:
        """Record one step as a CUDA graph (after warm-up steps on a side stream). Sampling
        needs the generator registered with the graph, so that each replay draws new noise
        (RuntimeError where this torch cannot)."""
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError("this torch cannot replay a sampling generator in a CUDA graph")
            graph.register_generator_state(self.generator)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The continuation [batch, new_tokens] (the tokens the timed loop produces)."""
        self.prefill(prompt)
        out = [self.ids.clone()]
        for _ in range(new_tokens - 1):
            self.step()
            out.append(self.ids.clone())
        return torch.cat(out, dim=1)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def close(self) -> None:
        """Give the model back its own attention function, ungrouped linears and its norms' and
        attention modules' own forward (the graph stays replayable)."""
        self._grouping.close()
        if self._attn_before is not None:
            from . import attention as attn
            attn.restore(self.model, self._attn_before)
            self._attn_before = None


def generate(model, prompt: torch.Tensor, max_new_tokens: int, eos: set[int] | frozenset = frozenset(), *,
             graphs: bool = True, compile: bool = False, attention: str = "pt2llm",
             check_every: int | None = None, streamer=None, sampling: Sampling = GREEDY, stop=None) -> dict:
    """Continuation of `prompt` [batch, n] through the decode step above (what `pt2llm
    generate` runs), greedy or as `sampling` says (the same seed gives the same tokens on the
    same device, graph or not): at most `max_new_tokens` tokens a sequence, stopping once every sequence
    has produced one of `eos` (a sequence's tokens after its first eos are cut off, to -1).
    On CUDA the step is a CUDA graph unless graphs=False (eager if capture fails); the tokens
    are checked for eos every `check_every` steps (by default 16 on CUDA, so the GPU is not
    synchronised each step, and 1 on the CPU). streamer: one sequence's streamer, as
    transformers' generate takes (e.g. TextStreamer): put() gets the prompt, then the new
    tokens at each check (up to the eos), and end() at the end.
    stop: for one sequence, a function of its new tokens so far (a list, up to any eos) that
    returns how many of them to keep where they should end there (a stop string: see
    `stop_strings`), else None; it is asked at each check, and the tokens after the count it
    gives are cut off as after an eos.
    Returns {"tokens": [batch, k] (k <= max_new_tokens, -1 after a sequence's eos),
    "prefill_s", "decode_s", "steps", "decode_mode"}; the times include the first step's
    compilation when compile=True."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if streamer is not None and prompt.shape[0] != 1:
        raise ValueError(f"a streamer takes one sequence, not a batch of {prompt.shape[0]}")
    if stop is not None and prompt.shape[0] != 1:
        raise ValueError(f"stop takes one sequence, not a batch of {prompt.shape[0]}")
    dev = prompt.device
    cuda = dev.type == "cuda"
    check_every = check_every or (16 if cuda else 1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dec = Decoder(model, prompt.shape[0], prompt.shape[1] + max_new_tokens, compile=compile, attention=attention,
                  sampling=sampling)
    try:
        how = "eager"
        if graphs and cuda and max_new_tokens > 1:
            dec.prefill(prompt[:, :1])  # the cache's buffers exist before capture (the real prefill resets them)
            try:
                dec.capture()
                how = "cuda-graph"
            except RuntimeError as e:
                how = f"eager (graph capture failed: {str(e).splitlines()[0][:120]})"
                dec.graph = None
        if compile:
            how += " + torch.compile"
        dec.reseed()  # capture's warm-up steps drew noise too
        sync()
        t0 = time.perf_counter()
        dec.prefill(prompt)
        out = torch.full((prompt.shape[0], max_new_tokens), -1, dtype=torch.long, device=dev)
        out[:, 0] = dec.ids[:, 0]
        sync()
        t1 = time.perf_counter()
        n, sent, stopped, steps = 1, 0, False, 0
        eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=dev)

        def upto_eos(a: int, b: int) -> list[int]:
            """Sequence 0's tokens a..b-1, up to and including its first eos among them."""
            new = out[0, a:b].tolist()
            cut = next((i for i, t in enumerate(new) if t in eos), None)
            return new if cut is None else new[:cut + 1]

        def finished() -> bool:
            """Whether every sequence has an eos or `stop` ends it; hands the streamer its new
            tokens (a sync point)."""
            nonlocal sent, n, stopped
            if stop is not None and not stopped:
                keep = stop(upto_eos(0, n))
                if keep is not None:
                    n, stopped = min(n, max(int(keep), 1)), True  # out[:, :n] is what is returned
            if streamer is not None and sent < n:
                streamer.put(torch.tensor(upto_eos(sent, n)))
                sent = n
            return stopped or (bool(eos) and bool(torch.isin(out[:, :n], eos_t).any(1).all()))

        if streamer is not None:
            streamer.put(prompt[0].cpu())
        while n < max_new_tokens and not finished():
            for _ in range(min(check_every, max_new_tokens - n)):
                dec.step()
                out[:, n] = dec.ids[:, 0]
                n += 1
                steps += 1
        if streamer is not None or stop is not None:
            finished()  # the last chunk: stop asked, the streamer handed what is left
        if streamer is not None:
            streamer.end()
        sync()
        t2 = time.perf_counter()
    finally:
        dec.close()
    out = out[:, :n]
    if eos:  # cut each sequence after its first eos
        hit = torch.isin(out, eos_t).long()
        out[(hit.cumsum(1) - hit) > 0] = -1
        k = int((out >= 0).sum(1).max())
        out = out[:, :k]
    return {"tokens": out.cpu(), "prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": steps, "decode_mode": how}


def stop_strings(tokenizer, strings) -> "callable":
    """A `stop` for generate: the fewest new tokens whose text (decoded without special
    tokens) holds one of `strings`, or None while none does. The text is kept up to and
    including the stop string's tokens, as transformers' stop_strings does."""
    strings = [s for s in strings if s]
    if not strings:
        raise ValueError("stop strings must not be empty")

    def has(tokens) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in strings)

    def stop(tokens):
        if not has(tokens):
            return None
        lo, hi = 1, len(tokens)  # the fewest tokens whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if has(tokens[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return lo

    return stop


def measure(model, prompt_len: int = 128, new_tokens: int = 256, batch: int = 1, graphs: bool = True,
            seed: int = 0, compile: bool = False, attention: str = "pt2llm") -> dict:
    """Prefill and decode tokens/s and memory of `model` (on a CUDA device, in eval mode);
    compile: the decode step through torch.compile; attention: the decode step's attention,
    "pt2llm" (the Triton kernel) or "model" (see the module docstring)."""
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator(device=dev).manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=dev, generator=g)
    weights = model_bytes(model)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    with torch.no_grad():
        fwd = lambda: model(input_ids=prompt, use_cache=False, logits_to_keep=1)  # noqa: E731
        _events_ms(fwd, 2)  # warm-up: kernels compiled, allocator primed
        prefill_ms = statistics.median(_events_ms(fwd, 5))

    dec = Decoder(model, batch, prompt_len + new_tokens + 4, compile=compile, attention=attention)
    try:
        decode_ms, how = _decode_ms(dec, prompt, new_tokens, graphs, compile)
    finally:
        dec.close()
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_ms": round(prefill_ms, 3), "prefill_tokens_per_s": round(batch * prompt_len / prefill_ms * 1e3, 1),
            "decode_ms_per_token": round(decode_ms / new_tokens, 4),
            "decode_tokens_per_s": round(batch * new_tokens / decode_ms * 1e3, 1), "decode_mode": how,
            "attention": attention,
            "model_gib": round(weights / 2**30, 3), "model_gb": round(weights / 1e9, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3),
            "device": torch.cuda.get_device_name(dev)}


def _decode_ms(dec: Decoder, prompt: torch.Tensor, new_tokens: int, graphs: bool, compile: bool):
    """(median ms for new_tokens decode steps after the prompt, how the step ran)."""
    dec.prefill(prompt)
    how = "eager"
    if graphs:
        try:
            dec.capture()
            how = "cuda-graph"
        except RuntimeError as e:  # a model whose forward cannot be captured: say so, time it eagerly
            how = f"eager (graph capture failed: {str(e).splitlines()[0][:120]})"
            dec.graph = None
    if dec.graph is None:  # eager: warm up (compiles when compile=True) outside the timed runs
        for _ in range(2):
            dec.step()
    if compile:
        how += " + torch.compile"
    times = []
    for _ in range(3):
        dec.prefill(prompt)  # each run starts after the same prompt (outside the timed region)
        torch.cuda.synchronize()
        times += _events_ms(lambda: [dec.step() for _ in range(new_tokens)], 1)
    return statistics.median(times), how
