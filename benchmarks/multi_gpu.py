"""`pt2llm quantize` on one GPU against `--devices cuda:0,cuda:1`: wall times, per-layer
times, speedup, and whether the two model.safetensors are byte-identical (sha256).

A Llama-2-7B-shaped model with random fp16 weights (built as benchmarks/quant_time.py
builds it, --layers of its 32 decoder layers) is saved as a local folder, with a word-level
tokenizer of 32000 words "w0".."w31999" and a calibration text of uniformly random words,
so the paper's 128 x 2048 calibration windows are random tokens. Both runs go through the
CLI in their own processes (same seed), as a user would run them; the per-layer figures
come from their --report files. Writes RESULTS/multi-gpu.json and .md with --results.

    python benchmarks/multi_gpu.py --results docs/results          # 2 GPUs, 2 layers, 128 x 2048
    python benchmarks/multi_gpu.py --device cpu --tiny             # end-to-end check on the CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from quant_time import LLAMA2_7B, build  # noqa: E402

from pt2llm.model.sources import sha256_file as sha256  # noqa: E402

TINY = dict(hidden_size=200, intermediate_size=328, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256)


def make_model(folder: Path, layers: int, tiny: bool, device: str) -> int:
    """The float model and its tokenizer in `folder`; returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    if tiny:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY, num_hidden_layers=layers))
        vocab = TINY["vocab_size"]
    else:
        model = build(layers, device if device.startswith("cuda") else "cpu")
        vocab = LLAMA2_7B["vocab_size"]
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the runs are other processes: give the build's memory back
    model.save_pretrained(folder)
    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    return vocab


def calibration_text(path: Path, vocab: int, tokens: int, seed: int) -> None:
    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(vocab)}" for _ in range(tokens)) + "\n")


def quantize(folder: Path, calib: Path, out: Path, where: list[str], a) -> dict:
    """One `pt2llm quantize` process (its ranks in its process group); its wall time and report."""
    report = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "pt2llm", "quantize", str(folder), "--out", str(out), "--calib", str(calib),
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed), "--method", a.method,
           "--no-progress", "--report", str(report), *where]
    print("$", shlex.join(["python", *cmd[1:]]), file=sys.stderr, flush=True)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, start_new_session=True)  # its own process group: a timeout stops every rank
    try:
        rc = p.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise SystemExit(f"timed out after {a.timeout} s: {shlex.join(cmd)}") from None
    wall = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"exit status {rc}: {shlex.join(cmd)}")
    rep = json.loads(report.read_text())
    per_layer = [x["seconds"] for x in rep["per_layer"]]
    return {"devices": rep["devices"], "process_wall_seconds": round(wall, 2), "wall_seconds": rep["wall_seconds"],
            "per_layer_seconds": per_layer, "mean_layer_seconds": round(sum(per_layer) / len(per_layer), 3),
            "fixed_seconds": round(rep["wall_seconds"] - sum(per_layer), 2),
            "stage_seconds": rep["stage_seconds"], "peak_gpu_gib_rank0": rep["peak_gpu_gib"],
            "ranks": rep.get("ranks"), "owners": rep.get("owners"),
            "sha256": sha256(out / "model.safetensors")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default=None, help="the several-device run (default cuda:0,cuda:1; cpu,cpu with --device cpu)")
    ap.add_argument("--device", default=None, help="the one-device run (default: the first of --devices)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 32 (default 2)")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128; 4 with --tiny)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; 64 with --tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="pt2", choices=["pt2", "gptq", "rtn"])
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama (hidden 200) instead of the 7B shape")
    ap.add_argument("--timeout", type=int, default=240, help="seconds allowed to each run (default 240)")
    ap.add_argument("--results", metavar="DIR", help="write DIR/multi-gpu.json and DIR/multi-gpu.md")
    ap.add_argument("--keep", metavar="DIR", help="build in DIR and keep it (default: a temporary folder)")
    a = ap.parse_args()
    if a.devices is None:
        a.devices = "cpu,cpu" if a.device == "cpu" else "cuda:0,cuda:1"
    a.device = a.device or a.devices.split(",")[0]
    a.nsamples = a.nsamples or (4 if a.tiny else 128)
    a.seqlen = a.seqlen or (64 if a.tiny else 2048)
    cuda = a.device.startswith("cuda")

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="pt2llm-multi-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        folder, calib = work / "float", work / "calib.txt"
        vocab = make_model(folder, a.layers, a.tiny, a.device)
        calibration_text(calib, vocab, int(a.nsamples * a.seqlen * 1.1) + a.seqlen, a.seed)
        for f in folder.iterdir():  # into the page cache, so the first run does not pay for the disk
            f.read_bytes()
        setup = time.perf_counter() - t
        for d in ("one", "many"):
            shutil.rmtree(work / d, ignore_errors=True)
        one = quantize(folder, calib, work / "one", ["--device", a.device], a)
        many = quantize(folder, calib, work / "many", ["--devices", a.devices], a)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    n = len(many["devices"])
    res = {"device_name": torch.cuda.get_device_name(0) if cuda else "cpu", "date": datetime.date.today().isoformat(),
           "command": shlex.join(["python", "benchmarks/multi_gpu.py", *sys.argv[1:]]), "torch": torch.__version__,
           "commit": _commit(), "model": "tiny Llama (hidden 200)" if a.tiny else "Llama-2-7B shape, random fp16 weights",
           "layers": a.layers, "method": a.method, "calibration": f"{a.nsamples} x {a.seqlen} random tokens, seed {a.seed}",
           "setup_seconds": round(setup, 1), "one_device": one, "several_devices": many,
           "speedup_process_wall": round(one["process_wall_seconds"] / many["process_wall_seconds"], 3),
           "speedup_wall": round(one["wall_seconds"] / many["wall_seconds"], 3),
           "speedup_per_layer": round(one["mean_layer_seconds"] / many["mean_layer_seconds"], 3),
           "sha256_match": one["sha256"] == many["sha256"]}
    for r in (one, many):
        r["extrapolated_32_layers_minutes"] = round((r["fixed_seconds"] + 32 * r["mean_layer_seconds"]) / 60, 2)
    md = markdown(res, n)
    print(md)
    if a.results:
        out = Path(a.results)
        out.mkdir(parents=True, exist_ok=True)
        (out / "multi-gpu.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "multi-gpu.md").write_text(md)
    if not res["sha256_match"]:
        print("the two model.safetensors differ", file=sys.stderr)
        raise SystemExit(1)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown(res: dict, n: int) -> str:
    one, many = res["one_device"], res["several_devices"]
    rows = [("one device", one), (f"{n} devices", many)]
    lines = [f"# Quantization on {n} devices ({res['device_name']}, {res['date']})", "",
             f"{res['model']}, {res['layers']} of 32 decoder layers, `{res['method']}`, calibration "
             f"{res['calibration']}. Command: `{res['command']}` (commit {res['commit']}, torch {res['torch']}).", "",
             "| run | process wall (s) | command wall (s) | per layer (s) | fixed (s) | 32 layers, extrapolated (min) "
             "| peak GPU, rank 0 (GiB) |", "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} ({', '.join(r['devices'])}) | {r['process_wall_seconds']} | {r['wall_seconds']} | "
                     f"{' + '.join(str(x) for x in r['per_layer_seconds'])} | {r['fixed_seconds']} | "
                     f"{r['extrapolated_32_layers_minutes']} | {r['peak_gpu_gib_rank0']} |")
    lines += ["", f"Speedup: {res['speedup_per_layer']}x per layer, {res['speedup_wall']}x on the command's wall "
              f"time, {res['speedup_process_wall']}x on the whole process (start-up, {n} model loads and process "
              f"group included).", "",
              f"model.safetensors sha256: one device `{one['sha256'][:16]}...`, {n} devices `{many['sha256'][:16]}...`: "
              f"**{'identical' if res['sha256_match'] else 'DIFFERENT'}**.", "",
              "Stage seconds (rank 0): one device " + _stages(one) + "; " + f"{n} devices " + _stages(many) + ".", ""]
    if many["ranks"]:
        lines.append("Per rank (its own quantization math, and its waits for the others' results):")
        lines.append("")
        for i, r in enumerate(many["ranks"]):
            mine = sorted({k.rsplit(".", 1)[-1] for k, v in many["owners"].items() if v == i})
            lines.append(f"- rank {i} ({r['device']}): {r['linears']} linears ({', '.join(mine)}), quantize "
                         f"{r['quantize_seconds']} s, waiting/receiving {r['share_seconds']} s")
        lines.append("")
    lines += ["Every rank runs all calibration forward passes (Hessians are computed, not reduced, so the result is "
              "exact); only the quantization math of each sub-layer group's linears is shared out, so a group's "
              "time is that of its largest linear (down_proj, alone in its group, bounds the gain).", ""]
    return "\n".join(lines)


def _stages(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items())


if __name__ == "__main__":
    main()
