"""What each CLI command does (cli.py only parses)."""
from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from pathlib import Path

import torch

from . import checkpoint, data, pack
from .model import distributed, driver, sources
from .rotate.fold import ONLINE as ROTATION_ONLINE


def _device(arg: str | None) -> str:
    if arg:
        if arg.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {arg}: CUDA is not available on this machine")
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def _json_default(o):
    return str(o)


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def is_user_error(e: Exception) -> bool:
    return isinstance(e, (sources.SourceError, data.DataError, checkpoint.CheckpointError,
                          driver.DriverError, ValueError, OSError))


def _peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _check_context(model, tokens: int, what: str, whose: str) -> None:
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and tokens > ctx:
        raise ValueError(f"{what} is longer than {whose} context ({ctx} tokens)")


def quantize(args) -> int:
    """One device, or several (`--devices`, or torchrun's environment): see model/distributed.py."""
    spec = getattr(args, "devices", None)
    if spec is not None and args.device is not None:
        raise ValueError("give --device or --devices, not both")
    devices = distributed.parse_devices(spec) if spec is not None else None
    env = distributed.torchrun_env()
    if env is not None and env.world > 1:  # started by torchrun: this process is one rank
        device = distributed.torchrun_device(env, devices, args.device)
        distributed.quiet_unless_main(env.rank)
        with distributed.torchrun_group(env, device) as dist:
            return _quantize(args, device, dist)
    if devices is not None and len(devices) > 1:
        # what fails the same way on every rank fails here, once, before the processes start
        _config(args)
        checkpoint.check_writable(Path(args.out), args.overwrite)
        if args.model in sources.ALIASES:  # fetched once, not by every rank at the same time
            sources.fetch_alias(args.model, progress=not args.no_progress)
        return distributed.launch(devices, _quantize_rank, args, is_user_error=is_user_error,
                                  debug=getattr(args, "debug", False))
    return _quantize(args, devices[0] if devices else _device(args.device), None)


def _quantize_rank(args, dist) -> int:
    """One rank of `quantize --devices` (a process spawned by distributed.launch)."""
    return _quantize(args, dist.device, dist)


def _config(args) -> driver.QuantConfig:
    """The quantize command's QuantConfig (raises ValueError on a bad combination)."""
    return driver.QuantConfig(method=args.method, bits=args.bits, block_size=args.block_size,
                              itf=not args.no_itf, aga=not args.no_aga, reorder=args.reorder,
                              max_iters=args.max_iters, percdamp=args.percdamp, seed=args.seed,
                              rotate=args.rotate, target=args.target, refine=args.refine,
                              target_damp=args.target_damp, fit_head=args.fit_head)


def _quantize(args, device: str, dist) -> int:
    main = dist is None or dist.is_main  # only rank 0 writes and prints
    progress = not args.no_progress and main
    cfg = _config(args)
    out = Path(args.out)
    checkpoint.check_writable(out, args.overwrite)
    t0 = time.perf_counter()
    use_data = cfg.method != "rtn"
    # find the calibration text before spending minutes on loading the model
    text = data.calibration_text(args.calib) if use_data and args.calib != "synthetic" and main else None
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model, tok, source, layer_loader = sources.load_for_quantization(
        args.model, dtype, progress=progress, stream=args.calib != "synthetic")
    _check_context(model, args.seqlen, f"--seqlen {args.seqlen}", "the model's")
    calib = torch.empty(0, 0, dtype=torch.long)
    if use_data and main:
        calib = data.calibration_windows(args.calib, tok, args.nsamples, args.seqlen, args.seed,
                                         model=model, device=device, text=text)
    if dist is not None:  # rank 0's windows, so every rank sees the very same tokens
        calib = dist.broadcast_object(calib)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stats = driver.DriverStats()
    calib_info = None if cfg.method == "rtn" else {"source": args.calib, "nsamples": args.nsamples,
                                                  "seqlen": args.seqlen, "seed": args.seed}
    manifest = {"model": args.model, "config": cfg.to_dict(), "calibration": calib_info,
                "calibration_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest(), "device": device}
    if cfg.rotate != "none":  # which linears take an online transform: layers of another set do not mix
        manifest["rotation_online"] = list(ROTATION_ONLINE)
    if main:
        work = checkpoint.WorkDir(out, manifest, resume=args.resume, overwrite=args.overwrite)
    else:  # reads the layers rank 0 says are finished (--resume), writes nothing
        work = distributed.WorkReader(out)
    try:
        modules = driver.quantize_model(model, calib, cfg, device=device, progress=progress,
                                        stats=stats, work=work, layer_loader=layer_loader, dist=dist)
    except KeyboardInterrupt:
        if main:
            print(f"pt2llm: interrupted; {work.finished()} finished layers are kept in {work.path}: "
                  f"rerun the same command with --resume to continue", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException:
        if main and work.finished() == 0:
            work.remove()
        raise
    if not main:
        return 0
    qc = {**cfg.to_dict(), "calibration": calib_info, "source_model": source, "modules": modules}
    checkpoint.save(model, tok, out, qc, overwrite=args.overwrite, work=work)
    work.remove()
    wall = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    gpu = f", peak GPU {peak_gpu:.2f} GiB" if peak_gpu is not None else ""
    where = device if dist is None else f"{dist.world} devices ({', '.join(dist.devices)})"
    print(f"quantized {len(modules)} linears ({cfg.method}) in {wall:.1f} s on {where}: "
          f"peak host {_peak_host_gib():.2f} GiB{gpu}; saved {out}", file=sys.stderr)
    for name, damp, rebuilt in stats.damping_raised:
        print(f"  note: {name}: damping raised to {damp:g}, inverse rebuilt {rebuilt}x", file=sys.stderr)
    if stats.head is not None:
        print(f"  lm_head refit: calibration logit error {stats.head['logit_error_before']:.4f} -> "
              f"{stats.head['logit_error_after']:.4f} of the float logits' energy", file=sys.stderr)
    if args.report:
        rep = {"model": args.model, "out": str(out), "device": device,
               "devices": [device] if dist is None else dist.devices,
               "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
               "wall_seconds": round(wall, 2), "stage_seconds": {k: round(v, 2) for k, v in stats.seconds.items()},
               "peak_host_gib": round(_peak_host_gib(), 3),
               "peak_gpu_gib": None if peak_gpu is None else round(peak_gpu, 3),
               "config": qc, "per_layer": stats.layers}
        if stats.head is not None:
            rep["fit_head"] = stats.head
        if dist is not None:  # who quantized what (rank 0's peak memory and host figures above)
            rep["ranks"] = stats.ranks
            rep["owners"] = stats.owners
        dump_json(rep, args.report)
    return 0


def rotate(args) -> int:
    from .rotate import fold, folder

    out = Path(args.out)
    checkpoint.check_writable(out, args.overwrite)
    model, tok, _ = sources.load_float(args.model, torch.float32, progress=not args.no_progress)
    record = fold.rotate_model(model, args.seed)
    folder.save(model, tok, out, overwrite=args.overwrite)
    untied = "; lm_head untied from the embeddings" if record["untied_lm_head"] else ""
    print(f"rotated {args.model} (random Hadamard, seed {args.seed}; {len(record['online'])} online transforms "
          f"on down_proj{untied}); saved {out}", file=sys.stderr)
    return 0


def generate(args) -> int:
    """Decoding on a static cache (speed.generate: a CUDA graph of the step on a GPU), greedy
    or sampled, the text streamed to stdout as it comes."""
    from . import speed
    from .sampling import Sampling

    how = Sampling(args.temperature, args.top_k, args.top_p, args.seed, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty)  # checked before the model loads
    if how.greedy and (args.top_k or args.top_p < 1 or args.min_p > 0):
        raise ValueError("--top-k, --top-p and --min-p choose among tokens to sample: give a --temperature above 0 "
                         "as well")
    if any(not s for s in args.stop):
        raise ValueError("--stop takes a non-empty text")
    device = _device(args.device)
    model, tok, _ = sources.load_any(args.model, progress=not args.no_progress, device=device)
    if args.chat:  # the prompt as a user's message, in the tokenizer's chat template
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"--chat: {args.model}'s tokenizer has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenization")
    _check_context(model, ids.shape[1] + args.max_new_tokens,
                   f"the prompt ({ids.shape[1]} tokens) + --max-new-tokens", "the model's")
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = tok.eos_token_id if eos is None else eos
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    from transformers import TextStreamer
    # prints the prompt (not with --chat: only the reply), then each chunk of new tokens
    streamer = TextStreamer(tok, skip_prompt=args.chat, skip_special_tokens=True)
    stop = speed.stop_strings(tok, args.stop) if args.stop else None
    r = speed.generate(model.eval(), ids, args.max_new_tokens, eos, compile=args.compile, streamer=streamer,
                       sampling=how, stop=stop)
    new = [t for t in r["tokens"][0].tolist() if t >= 0]
    steps = r["steps"]
    rate = f", {steps / r['decode_s']:.1f} tokens/s" if steps and r["decode_s"] > 0 else ""
    print(f"prefill {ids.shape[1]} tokens in {r['prefill_s'] * 1e3:.1f} ms; {len(new)} new tokens "
          f"({steps} decode steps in {r['decode_s'] * 1e3:.1f} ms{rate}; {device}, {r['decode_mode']}, "
          f"{how.describe()})",
          file=sys.stderr)
    return 0


def inspect_dir(path) -> dict:
    """Bits per quantized weight, sizes and a per-module table, from the safetensors header."""
    from safetensors import safe_open

    path = Path(path)
    qc = checkpoint.read_quantization_config(path)
    st = path / "model.safetensors"
    if not st.is_file():
        raise checkpoint.CheckpointError(f"{path} has no model.safetensors")
    sizes = {}
    with safe_open(str(st), framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            shape = sl.get_shape()
            n = 1
            for s in shape:
                n *= s
            sizes[k] = (shape, n * _dtype_bytes(sl.get_dtype()), sl.get_dtype())
    rows, qbytes, qweights = [], 0, 0
    for name in qc["modules"]:
        parts = [sizes[f"{name}.{b}"] for b in ("packed", "alpha", "mu", "perm")]
        out_f, in_f = parts[1][0][0], _in_features(name, sizes, qc)
        nbytes = sum(p[1] for p in parts) + sizes.get(f"{name}.input_transform.signs", (0, 0))[1]
        rows.append({"module": name, "out": out_f, "in": in_f, "bytes": nbytes,
                     "bits_per_weight": 8 * nbytes / (out_f * in_f)})
        qbytes += nbytes
        qweights += out_f * in_f
    total = sum(v[1] for v in sizes.values())
    return {"dir": str(path), "method": qc.get("method"), "block_size": qc.get("block_size"),
            "quantized_modules": len(rows), "quantized_weights": qweights, "quantized_bytes": qbytes,
            "bits_per_weight": 8 * qbytes / max(qweights, 1), "file_bytes": st.stat().st_size,
            "other_bytes": total - qbytes, "modules": rows,
            "rotation": checkpoint.read_config(path).get("pt2llm_rotation")}


def _in_features(name: str, sizes: dict, qc: dict) -> int:
    """A quantized linear's input width from the stored shapes: the length of its column
    order up to format 2; in format 3 (perm a bit stream) the one width that fits the packed
    perm, codes and per-block scales together (unique for any ternary layer, and for uint-k
    codes wider than 128 inputs)."""
    perm_shape, _, perm_dtype = sizes[f"{name}.perm"]
    if perm_dtype != "U8":
        return perm_shape[0]
    (out_f, nb), codes_shape = sizes[f"{name}.alpha"][0], list(sizes[f"{name}.packed"][0])
    bs = qc["block_size"]
    bits = qc.get("bits") if qc.get("method") == "gptq" else None

    def codes(n):
        return [out_f, pack.packed_bits_width(n, bits)] if bits else [pack.packed_trit_width(out_f), n]

    fits = [n for n in range(max(1, (nb - 1) * bs + 1), nb * bs + 1)
            if pack.packed_perm_width(n) == perm_shape[0] and codes(n) == codes_shape]
    if len(fits) != 1:
        raise checkpoint.CheckpointError(f"{name}: the stored shapes do not determine its input width "
                                         f"(candidates {fits[:5]})")
    return fits[0]


def _dtype_bytes(name: str) -> int:
    return {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "F32": 4, "I32": 4,
            "U32": 4, "F64": 8, "I64": 8, "U64": 8}[name]


def inspect(args) -> int:
    rep = inspect_dir(args.dir)
    print(f"{'module':<40} {'out x in':>13} {'bits/w':>7} {'bytes':>10}")
    for r in rep["modules"]:
        print(f"{r['module']:<40} {str(r['out']) + 'x' + str(r['in']):>13} {r['bits_per_weight']:>7.3f} {r['bytes']:>10}")
    print(f"method {rep['method']}, block {rep['block_size']}: {rep['quantized_modules']} quantized linears, "
          f"{rep['quantized_weights']:,} weights in {rep['quantized_bytes']:,} bytes = "
          f"{rep['bits_per_weight']:.3f} bits per weight (codes + alpha/mu + column order)")
    print(f"model.safetensors: {rep['file_bytes'] / 2**20:.1f} MiB "
          f"(of which {rep['other_bytes'] / 2**20:.1f} MiB unquantized: embeddings, norms, lm_head, biases)")
    if rep["rotation"]:
        rot = rep["rotation"]
        print(f"rotated: random Hadamard (seed {rot.get('seed')}), online transform on the input of "
              f"{len(rot['online'])} modules (their signs counted in bits per weight)"
              + ("; lm_head untied from the embeddings" if rot.get("untied_lm_head") else ""))
    if args.json:
        dump_json(rep, args.json)
    return 0


def eval(args) -> int:  # noqa: A001 (the command's name)
    from .eval import evaluate
    from .eval import tasks as zero_shot

    device = _device(args.device)
    ppl = args.ppl if args.ppl is not None else ("none" if args.tasks else "wikitext2,c4")
    sets = [] if ppl == "none" else [s for s in ppl.split(",") if s]
    for s in sets:
        if s not in data.EVAL_SETS:
            raise ValueError(f"--ppl {s!r}: expected a comma-separated list of {', '.join(data.EVAL_SETS)}, or none")
    names = zero_shot.parse_tasks(args.tasks) if args.tasks else []
    if not sets and not names:
        raise ValueError("nothing to evaluate: give --ppl and/or --tasks")
    results = []
    for spec in args.models:
        model, tok, source = sources.load_any(spec, progress=not args.no_progress, device=device)
        if sets:
            _check_context(model, args.seqlen, f"--seqlen {args.seqlen}", spec + "'s")
        row = {"model": spec, "quantized": bool(source.get("quantized")), "device": device}
        row.update(evaluate(model, tok, sets, names, seqlen=args.seqlen, limit_windows=args.limit_windows,
                            limit=args.limit, batch_size=args.batch_size, device=device,
                            progress=not args.no_progress))
        results.append(row)
        del model
    print(format_table(results, sets, names))
    if sets:
        n = {s: results[0][s]["windows"] for s in sets}
        print("perplexity windows of %d tokens: %s" % (args.seqlen, ", ".join(f"{s} {n[s]}" for s in sets)))
    if names:
        print("tasks: %s over %s documents; mean of %s" % (
            ", ".join(f"{t} {zero_shot.MEAN_METRIC[t]}" for t in names),
            ", ".join(str(results[0]["tasks"][t]["n"]) for t in names),
            "the seven" if "mean" in results[0]["tasks"] else "-"))
    if args.json:
        dump_json({"seqlen": args.seqlen, "limit": args.limit, "results": results}, args.json)
    return 0


def format_table(results: list[dict], sets: list[str], names: list[str]) -> str:
    """One line per model: perplexities, then each task's mean metric, then the mean."""
    from .eval.tasks import MEAN_METRIC

    cols = list(sets) + list(names) + (["mean"] if results and "mean" in results[0].get("tasks", {}) else [])
    width = max(len("model"), *(len(r["model"]) for r in results))
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>13}" for c in cols)]
    for r in results:
        cells = [_fmt(r[s]["ppl"]) for s in sets]
        cells += [f"{100 * r['tasks'][t][MEAN_METRIC[t]]:.2f}" for t in names]
        if "mean" in cols:
            cells.append(f"{100 * r['tasks']['mean']['value']:.2f}")
        lines.append(f"{r['model']:<{width}}  " + "  ".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def bench(args) -> int:
    from . import speed

    device = _device(args.device or "cuda")
    if not device.startswith("cuda"):
        raise ValueError(f"--device {device}: pt2llm bench times CUDA kernels and needs a CUDA device")
    model, _, source = sources.load_any(args.model, progress=not args.no_progress, device=device)
    _check_context(model, args.prompt_len + args.new_tokens,
                   f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens}", "the model's")
    r = speed.measure(model.eval(), args.prompt_len, args.new_tokens, args.batch, graphs=not args.no_graphs,
                      compile=args.compile, attention=args.attention)
    r = {"model": args.model, "quantized": bool(source.get("quantized")), **r}
    print(f"{args.model} on {r['device']}: prefill {r['prefill_tokens_per_s']:.0f} tokens/s "
          f"({args.batch} x {args.prompt_len} in {r['prefill_ms']:.1f} ms), decode {r['decode_tokens_per_s']:.1f} "
          f"tokens/s ({r['decode_mode']}), model {r['model_gib']:.2f} GiB on the GPU, peak {r['peak_gib']:.2f} GiB")
    if args.json:
        dump_json(r, args.json)
    return 0
