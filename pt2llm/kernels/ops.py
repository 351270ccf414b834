"""The GPU forward paths as torch custom ops, for torch.compile, and a compile backend that
groups the ternary linears reading one input into one launch, gives them the RMSNorm (and the
residual add) before them, and gives a gated MLP's down projection its SiLU product.

Under torch.compile, TernaryLinear and the online Hadamard call these ops instead of their
Python launchers (which dynamo cannot trace: NVRTC launches, Python-side caches). The
compiler sees one opaque op with a known output shape and fuses what lies around it (norms,
rotary embedding, attention glue); eager calls keep the plain launchers.

    torch.ops.pt2llm.ternary_linear(x, packed, alpha, mu, perm, bias, n_out, block_size)
    torch.ops.pt2llm.ternary_linear_glu(gate, up, packed, alpha, mu, perm, bias, n_out, block_size)
    torch.ops.pt2llm.ternary_linear_group(x, [packed], [alpha], [mu], [perm], [bias], [n_out], block_size)
    torch.ops.pt2llm.ternary_linear_norm(res, delta, weight, eps, [packed], ..., [n_out], block_size)
    torch.ops.pt2llm.hadamard_input(x, signs)
    torch.ops.pt2llm.decode_attention(query, key, value, mask, scale)
    torch.ops.pt2llm.decode_attention_append(query, key_new, value_new, cos, sin, key, value, index, mask,
                                             scale, advance)   # writes key, value (and index)

`backend` (torch.compile(fn, backend=ops.backend)) rewrites the captured graph before
Inductor: ternary_linear calls on the same input (a decoder layer's q/k/v, its gate/up) become
one ternary_linear_group call, which at decode sizes is one CUDA launch
(triton_ternary.linear_group). At M = 1 a 7B layer's q, k and v are each too short to fill
the GPU on their own (docs/results/e2e.md). Then a ternary_linear call on silu(a) * b (a gated
MLP's down projection) becomes ternary_linear_glu(a, b), which at decode sizes forms the
product as the CUDA kernel stages its activations: one kernel fewer a layer (`fuse_glu`). And
a call (or group) on transformers' RMSNorm of one fp16 row becomes ternary_linear_norm, which
takes the residual add before the norm as well: the kernel stages the norm, one kernel fewer
before q/k/v and one before gate/up (`fuse_norm`; docs/results/e2e.md, session 22). Last, a
decode step's static-cache write (transformers' StaticLayer.update: two index_copy_ and the
length counter's add_) and the rotary embedding of q and k go into the attention call
(`fuse_cache_write`, decode_attention_append): three kernels fewer a layer (session 23).
"""
# No `from __future__ import annotations` here: torch.library.custom_op reads the type hints
# to make each op's schema, and older torch (2.4) does not evaluate string annotations.
import operator
from typing import List, Optional

import torch


@torch.library.custom_op("pt2llm::ternary_linear", mutates_args=())
def ternary_linear(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                   perm: torch.Tensor, bias: Optional[torch.Tensor], n_out: int, block_size: int) -> torch.Tensor:
    """triton_ternary.linear (its default path for x's rows) as one op. It takes no inverse
    column order: at prefill sizes (the dequantize path) it is recomputed per call (an argsort
    of K entries), which TernaryLinear's eager path caches; the decode paths do not use it."""
    from .triton_ternary import linear
    return linear(x, packed, alpha, mu, perm, bias, n_out, block_size)


@ternary_linear.register_fake
def _(x, packed, alpha, mu, perm, bias, n_out, block_size):
    return x.new_empty(*x.shape[:-1], n_out)


@torch.library.custom_op("pt2llm::ternary_linear_glu", mutates_args=())
def ternary_linear_glu(gate: torch.Tensor, up: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor,
                       mu: torch.Tensor, perm: torch.Tensor, bias: Optional[torch.Tensor], n_out: int,
                       block_size: int) -> torch.Tensor:
    """ternary_linear(silu(gate) * up, ...) as one op (triton_ternary.linear_glu): at decode
    sizes the CUDA kernel forms the product as it reads its activations."""
    from .triton_ternary import linear_glu
    return linear_glu(gate, up, packed, alpha, mu, perm, bias, n_out, block_size)


@ternary_linear_glu.register_fake
def _(gate, up, packed, alpha, mu, perm, bias, n_out, block_size):
    return gate.new_empty(*gate.shape[:-1], n_out)


@torch.library.custom_op("pt2llm::ternary_linear_norm", mutates_args=())
def ternary_linear_norm(res: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                        packed: List[torch.Tensor], alpha: List[torch.Tensor], mu: List[torch.Tensor],
                        perm: List[torch.Tensor], bias: List[Optional[torch.Tensor]], n_out: List[int],
                        block_size: int) -> List[torch.Tensor]:
    """The layers on transformers' RMSNorm of h = res + delta (or res), then h where delta is
    given (triton_ternary.linear_norm): at one row the CUDA kernel forms the norm (and the
    residual add) as it stages its activations."""
    from .triton_ternary import linear_norm
    return linear_norm(res, delta, weight, eps, list(zip(packed, alpha, mu, perm, bias, n_out)), block_size)


@ternary_linear_norm.register_fake
def _(res, delta, weight, eps, packed, alpha, mu, perm, bias, n_out, block_size):
    outs = [res.new_empty(*res.shape[:-1], n) for n in n_out]
    return outs + ([] if delta is None else [torch.empty_like(res)])


@torch.library.custom_op("pt2llm::hadamard_input", mutates_args=())
def hadamard_input(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x diag(signs) K_n as one op: rotate.online.hadamard_input_eager (the Triton kernel where
    it takes x, else the torch path)."""
    from ..rotate.online import hadamard_input_eager
    return hadamard_input_eager(x, signs)


@hadamard_input.register_fake
def _(x, signs):
    return torch.empty_like(x)


@torch.library.custom_op("pt2llm::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """triton_attention.decode (one query token over a static KV cache) as one op."""
    from .triton_attention import decode
    return decode(query, key, value, mask, scale)


@decode_attention.register_fake
def _(query, key, value, mask, scale):
    return query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])


@torch.library.custom_op("pt2llm::decode_attention_append", mutates_args=("key", "value", "index"))
def decode_attention_append(query: torch.Tensor, key_new: torch.Tensor, value_new: torch.Tensor,
                            cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], key: torch.Tensor,
                            value: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                            advance: bool) -> torch.Tensor:
    """triton_attention.decode_append (the rotary embedding where cos and sin are given, the
    static cache's write at index, the attention, and with `advance` index += 1) as one op."""
    from .triton_attention import decode_append
    return decode_append(query, key_new, value_new, cos, sin, key, value, index, mask, scale, advance)


@decode_attention_append.register_fake
def _(query, key_new, value_new, cos, sin, key, value, index, mask, scale, advance):
    return query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])


@torch.library.custom_op("pt2llm::ternary_linear_group", mutates_args=())
def ternary_linear_group(x: torch.Tensor, packed: List[torch.Tensor], alpha: List[torch.Tensor],
                         mu: List[torch.Tensor], perm: List[torch.Tensor], bias: List[Optional[torch.Tensor]],
                         n_out: List[int], block_size: int) -> List[torch.Tensor]:
    """triton_ternary.linear_group: the layers' outputs for the same x, in order."""
    from .triton_ternary import linear_group
    return linear_group(x, list(zip(packed, alpha, mu, perm, bias, n_out)), block_size)


@ternary_linear_group.register_fake
def _(x, packed, alpha, mu, perm, bias, n_out, block_size):
    return [x.new_empty(*x.shape[:-1], n) for n in n_out]


def _finish(gm: "torch.fx.GraphModule", made: int) -> int:
    """A pass's end: check and recompile the graph when it replaced anything; returns made."""
    if made:
        gm.graph.lint()
        gm.recompile()
    return made


def _linear_call(node, targets) -> bool:
    """Whether node calls one of the ternary linear ops `targets` with its 8 positional arguments."""
    return node.op == "call_function" and node.target in targets and len(node.args) == 8 and not node.kwargs


def group_linears(gm: "torch.fx.GraphModule", max_group: int = 3) -> int:
    """Replace ternary_linear calls that take the same input node (and block size) by
    ternary_linear_group calls of up to `max_group` layers, in graph order; returns how many
    group calls were made. A call whose arguments are not all defined before the group's
    first call stays as it is."""
    single = torch.ops.pt2llm.ternary_linear.default
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    by_input: dict = {}
    for node in gm.graph.nodes:
        if _linear_call(node, (single,)):
            by_input.setdefault((node.args[0], node.args[7]), []).append(node)

    def ready_before(node, first) -> bool:
        return all(order[a] < order[first] for a in node.all_input_nodes)

    made = 0
    for (x, block_size), nodes in by_input.items():
        while len(nodes) > 1:
            first = nodes[0]
            chunk = [first] + [n for n in nodes[1:] if ready_before(n, first)][:max_group - 1]
            nodes = [n for n in nodes if n not in chunk]
            if len(chunk) < 2:
                continue
            with gm.graph.inserting_before(first):
                group = gm.graph.call_function(
                    torch.ops.pt2llm.ternary_linear_group.default,
                    (x, *([n.args[i] for n in chunk] for i in range(1, 7)), block_size))
                items = [gm.graph.call_function(operator.getitem, (group, j)) for j in range(len(chunk))]
            for node, item in zip(chunk, items):
                item.meta.update(node.meta)
                node.replace_all_uses_with(item)
                gm.graph.erase_node(node)
            made += 1
    return _finish(gm, made)


_SILU = (torch.nn.functional.silu, torch.ops.aten.silu.default)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def fuse_glu(gm: "torch.fx.GraphModule") -> int:
    """Replace ternary_linear(silu(a) * b, ...) (a gated MLP's down projection, a and b its
    gate and up outputs) by ternary_linear_glu(a, b, ...) where the product and the SiLU feed
    nothing else; returns how many calls were replaced."""
    single = torch.ops.pt2llm.ternary_linear.default
    made = 0
    for node in list(gm.graph.nodes):
        if not _linear_call(node, (single,)):
            continue
        prod = node.args[0]
        if not (isinstance(prod, torch.fx.Node) and prod.op == "call_function" and prod.target in _MUL
                and len(prod.args) == 2 and not prod.kwargs and len(prod.users) == 1):
            continue
        for act, other in (prod.args, prod.args[::-1]):
            if (isinstance(act, torch.fx.Node) and isinstance(other, torch.fx.Node) and act.op == "call_function"
                    and act.target in _SILU and len(act.args) == 1 and not act.kwargs.get("inplace", False)
                    and len(act.users) == 1):
                break
        else:
            continue
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(torch.ops.pt2llm.ternary_linear_glu.default,
                                           (act.args[0], other, *node.args[1:]))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(prod)
        gm.graph.erase_node(act)
        made += 1
    return _finish(gm, made)


def _call(node, kind: str, targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == kind and node.target in targets


def _example(node):
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _rms_norm_chain(y):
    """(h, weight, eps, the chain's nodes from y back) where y is transformers' RMSNorm of h as
    dynamo captures it (Llama, Qwen2: h.to(float32); pow 2; mean(-1, keepdim); + eps; rsqrt;
    times h; .to(fp16); weight times that), each node used only by the next; else None."""
    if not (_call(y, "call_function", _MUL) and len(y.args) == 2 and not y.kwargs and len(y.users) == 1):
        return None
    for weight, t in (y.args, y.args[::-1]):
        if _call(t, "call_method", ("to",)) and len(t.users) == 1:
            break
    else:
        return None
    dtype = t.args[1] if len(t.args) == 2 else t.kwargs.get("dtype")
    hs = t.args[0]
    if dtype is not torch.float16 or not isinstance(weight, torch.fx.Node):
        return None
    if not (_call(hs, "call_function", _MUL) and len(hs.args) == 2 and len(hs.users) == 1):
        return None
    for f, r in (hs.args, hs.args[::-1]):
        if _call(r, "call_function", (torch.rsqrt,)) and len(r.users) == 1:
            break
    else:
        return None
    a = r.args[0]
    if not (_call(a, "call_function", (operator.add, torch.add)) and len(a.users) == 1 and isinstance(a.args[1], float)):
        return None
    v = a.args[0]
    if not (_call(v, "call_method", ("mean",)) and len(v.users) == 1 and tuple(v.args[1:]) == (-1,)
            and v.kwargs == {"keepdim": True}):
        return None
    p = v.args[0]
    if not (_call(p, "call_method", ("pow",)) and len(p.users) == 1 and p.args[1:] == (2,) and p.args[0] is f):
        return None
    if not (_call(f, "call_method", ("to",)) and f.args[1:] == (torch.float32,) and not f.kwargs
            and set(f.users) == {p, hs}):
        return None
    return f.args[0], weight, a.args[1], [y, t, hs, r, a, v, p, f]


def fuse_norm(gm: "torch.fx.GraphModule") -> int:
    """Replace a ternary_linear or ternary_linear_group call on transformers' RMSNorm of one
    fp16 row (decode at batch 1) by one ternary_linear_norm call, which takes the residual
    add before the norm as well where the norm reads one (h = a + b, h's other readers after
    the call); returns how many calls were replaced."""
    single = torch.ops.pt2llm.ternary_linear.default
    group = torch.ops.pt2llm.ternary_linear_group.default
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    made = 0
    for node in list(gm.graph.nodes):
        if not _linear_call(node, (single, group)):
            continue
        chain = _rms_norm_chain(node.args[0])
        if chain is None:
            continue
        h, weight, eps, nodes = chain
        hv, wv = _example(h), _example(weight)
        if not (isinstance(hv, torch.Tensor) and isinstance(wv, torch.Tensor) and hv.dtype == torch.float16
                and wv.dtype == torch.float16 and hv.numel() == hv.shape[-1] and tuple(wv.shape) == (hv.shape[-1],)):
            continue
        res, delta = h, None
        if (_call(h, "call_function", (operator.add, torch.add)) and len(h.args) == 2 and not h.kwargs
                and all(isinstance(_example(a), torch.Tensor) and _example(a).shape == hv.shape
                        and _example(a).dtype == hv.dtype for a in h.args)
                and all(order[u] > order[node] for u in h.users if u is not nodes[-1])):
            res, delta = h.args
        lists = node.args[1:7] if node.target is group else [[a] for a in node.args[1:7]]
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(torch.ops.pt2llm.ternary_linear_norm.default,
                                           (res, delta, weight, eps, *lists, node.args[7]))
            if node.target is single:
                item = gm.graph.call_function(operator.getitem, (fused, 0))
                item.meta.update(node.meta)
                node.replace_all_uses_with(item)
            else:
                node.replace_all_uses_with(fused)
            if delta is not None:
                h_new = gm.graph.call_function(operator.getitem, (fused, len(lists[-1])))
                h_new.meta.update(h.meta)
        gm.graph.erase_node(node)
        for n in nodes:
            gm.graph.erase_node(n)
        if delta is not None:
            h.replace_all_uses_with(h_new)
            gm.graph.erase_node(h)
        made += 1
    return _finish(gm, made)


def _rotary(e):
    """(x, cos, sin, the chain's nodes) where e is transformers' rotary embedding of x as dynamo
    captures it (Llama, Qwen2, Mistral: x * cos + cat((-x[..., D/2:], x[..., :D/2]), -1) * sin),
    each node used only inside the chain; else None."""
    if not (_call(e, "call_function", (operator.add, torch.add)) and len(e.args) == 2 and not e.kwargs
            and len(e.users) == 1):
        return None
    for a, b in (e.args, e.args[::-1]):
        if not (_call(a, "call_function", _MUL) and _call(b, "call_function", _MUL) and len(a.args) == 2
                and len(b.args) == 2 and len(a.users) == 1 and len(b.users) == 1):
            continue
        for x, cos in (a.args, a.args[::-1]):
            for cat, sin in (b.args, b.args[::-1]):
                nodes = _rotate_half(cat, x)
                if nodes is not None and isinstance(cos, torch.fx.Node) and isinstance(sin, torch.fx.Node):
                    if set(x.users) == {a, nodes[-2], nodes[-1]}:
                        return x, cos, sin, [e, a, b, *nodes]
    return None


def _rotate_half(cat, x):
    """[cat, neg, x2, x1] where cat is cat((-x[..., D/2:], x[..., :D/2]), dim=-1), each node
    used once; else None."""
    xv = _example(x)
    if not (_call(cat, "call_function", (torch.cat,)) and len(cat.users) == 1 and isinstance(xv, torch.Tensor)):
        return None
    parts = cat.args[0] if cat.args else None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (-1, xv.dim() - 1)):
        return None
    neg, x1 = parts
    if not (_call(neg, "call_function", (operator.neg, torch.neg)) and len(neg.users) == 1):
        return None
    x2, half = neg.args[0], xv.shape[-1] // 2
    if xv.shape[-1] % 2:
        return None
    for node, want in ((x1, slice(None, half, None)), (x2, slice(half, None, None))):
        if not (_call(node, "call_function", (operator.getitem,)) and node.args[0] is x and len(node.users) == 1):
            return None
        idx = node.args[1]
        if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and idx[1] == want):
            return None
    return [cat, neg, x2, x1]


def _cache_length(pos, n: int):
    """(counter, nodes) where pos = arange(n) + counter and counter.add_(n) follows, the
    counter read by nothing else (transformers' StaticLayer.update); else None."""
    if not (_call(pos, "call_function", (operator.add, torch.add)) and len(pos.args) == 2 and not pos.kwargs):
        return None
    for ar, counter in (pos.args, pos.args[::-1]):
        if (_call(ar, "call_function", (torch.arange,)) and tuple(ar.args) == (n,) and len(ar.users) == 1
                and isinstance(counter, torch.fx.Node)):
            break
    else:
        return None
    adds = [u for u in counter.users if u is not pos]
    if len(adds) != 1:
        return None
    add = adds[0]
    if not (_call(add, "call_method", ("add_",)) and add.args[1:] == (n,) and not add.kwargs and not add.users):
        return None
    cv = _example(counter)
    if not (isinstance(cv, torch.Tensor) and cv.numel() == 1 and cv.dtype == torch.int64):
        return None
    return counter, [add, pos, ar]


def fuse_cache_write(gm: "torch.fx.GraphModule") -> int:
    """Replace a decode step's static-cache write and attention (transformers' StaticLayer.update:
    key.index_copy_(2, pos, k), value.index_copy_(2, pos, v); then decode_attention over key and
    value) by one decode_attention_append call, which also takes the rotary embedding of the
    query and the key where both are transformers' and share cos and sin, and the cache's length
    counter where pos = arange(1) + counter and counter.add_(1) read it and nothing else does;
    returns how many calls were replaced. The cache tensors must be read by nothing but the
    write and the attention."""
    attn_ops = (torch.ops.pt2llm.decode_attention, torch.ops.pt2llm.decode_attention.default)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    made = 0
    for node in list(gm.graph.nodes):
        if not (_call(node, "call_function", attn_ops) and len(node.args) == 5 and not node.kwargs):
            continue
        q, key, value, mask, scale = node.args
        writes = []
        for cache in (key, value):
            users = [u for u in cache.users if u is not node] if isinstance(cache, torch.fx.Node) else []
            if not (len(users) == 1 and _call(users[0], "call_method", ("index_copy_",)) and not users[0].users
                    and len(users[0].args) == 4 and users[0].args[0] is cache and not users[0].kwargs):
                break
            writes.append(users[0])
        if len(writes) != 2 or key is value:
            continue
        (_, kd, pos, k_new), (_, vd, pos_v, v_new) = (w.args for w in writes)
        qv, kv, vv, cv = _example(q), _example(k_new), _example(v_new), _example(key)
        if not (pos is pos_v and all(isinstance(t, torch.Tensor) for t in (qv, kv, vv, cv))
                and cv.dim() == 4 and kd in (2, -2) and vd in (2, -2) and qv.dim() == 4 and qv.shape[2] == 1
                and tuple(kv.shape) == (cv.shape[0], cv.shape[1], 1, cv.shape[3]) and vv.shape == kv.shape
                and all(order[w] < order[node] for w in writes)):
            continue
        length = _cache_length(pos, 1) if set(pos.users) == set(writes) else None
        index, advance, dead = (length[0], True, length[1]) if length else (pos, False, [])
        rq, rk = _rotary(q), _rotary(k_new)
        rope = rq is not None and rk is not None and rq[1] is rk[1] and rq[2] is rk[2]
        if rope:
            (q, cos, sin, dead_q), (k_new, _, _, dead_k) = rq, rk
        else:
            cos = sin = None
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(torch.ops.pt2llm.decode_attention_append.default,
                                           (q, k_new, v_new, cos, sin, key, value, index, mask, scale, advance))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        for n in [node, *writes, *dead, *((dead_q + dead_k) if rope else [])]:
            gm.graph.erase_node(n)
        made += 1
    return _finish(gm, made)


def backend(gm: "torch.fx.GraphModule", example_inputs, inner: str = "inductor", mode: Optional[str] = None,
            options: Optional[dict] = None):
    """A torch.compile backend: group_linears, fuse_glu, fuse_norm and fuse_cache_write, then
    `inner` (Inductor by default). torch.compile's `mode` and `options` reach Inductor as they
    would without this backend ("reduce-overhead": CUDA graphs). Registered as "pt2llm":
    torch.compile(model, backend="pt2llm"), or in transformers, generate(...,
    cache_implementation="static", compile_config=CompileConfig(backend="pt2llm"))."""
    group_linears(gm)
    fuse_glu(gm)
    fuse_norm(gm)
    fuse_cache_write(gm)
    from torch._dynamo.backends.registry import lookup_backend
    compiler = lookup_backend(inner)
    if inner == "inductor" and (mode or options):
        import torch._inductor
        patches = {**(torch._inductor.list_mode_options(mode) if mode else {}), **(options or {})}
        return compiler(gm, example_inputs, config_patches=patches)
    return compiler(gm, example_inputs)


if "pt2llm" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(backend, name="pt2llm")
