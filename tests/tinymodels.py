"""Tiny random Llama / Qwen2 models (hidden size 200: not a multiple of 128) with a BPE
tokenizer trained here, for tests that must not download anything."""
import hashlib
import os
import random
import signal
import subprocess
import sys

import torch
from transformers import PreTrainedTokenizerFast

from pt2llm import cli

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "matches in distant towns and rivers carry old boats past green hills").split()


def text(seed, n=6000):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(n))


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text(0, 3000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def quantize(d, out, *extra):
    args = ["quantize", str(d / "float"), "--out", str(out), "--calib", str(d / "calib.txt"),
            "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--no-progress", *extra]
    assert cli.main(args) == 0


def random_ternary(out_f, in_f, gen, bias=True, block=128, alpha=(0.05, 0.01), mu_std=0.01, bias_std=1.0):
    """A TernaryLinear (CPU) with random codes, column order and bias, alpha uniform in
    [alpha[1], alpha[0] + alpha[1]) and mu normal with std mu_std."""
    from pt2llm import pack
    from pt2llm.nn import TernaryLinear
    mod = TernaryLinear(in_f, out_f, bias, block_size=block)
    mod.packed.copy_(pack.pack_trit_rows(torch.randint(-1, 2, (out_f, in_f), generator=gen)))
    mod.alpha.copy_(torch.rand(mod.alpha.shape, generator=gen) * alpha[0] + alpha[1])
    mod.mu.copy_(torch.randn(mod.mu.shape, generator=gen) * mu_std)
    mod.perm.copy_(torch.randperm(in_f, generator=gen).to(mod.perm.dtype))
    if bias:
        mod.bias.copy_(torch.randn(out_f, generator=gen) * bias_std)
    return mod


def sha256(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()




def quantize_killed_after_first_layer(args, out):
    """Run `pt2llm ARGS --out OUT` in a child process that SIGKILLs itself once its first
    layer is persisted (the driver's fault injection). The child uses this process's torch
    thread count: another count sums in another order, and the resumed run must match bytes
    (callers take conftest's `one_thread` fixture: see there why)."""
    env = {**os.environ, "PT2LLM_FAULT_AFTER_LAYER": "0", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.run([sys.executable, "-m", "pt2llm", *args, "--out", str(out)], env=env,
                       capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr


def as_format_2(src, dst):
    """Copy a pt2llm folder rewritten the way format 2 stored it: every column order as
    int16/int32 [in], every online transform's signs as int8 ±1 [in] (format 3 packs them)."""
    import json
    import shutil

    from pt2llm import checkpoint, pack
    from pt2llm.nn import perm_dtype

    shutil.copytree(src, dst)
    st = {k: v.clone() for k, v in checkpoint.read_safetensors(dst / "model.safetensors").items()}
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["format_version"] == 3
    for name in qc["modules"]:
        n = st[f"{name}.packed"].shape[1]  # ternary codes: [ceil(out/5), in]
        st[f"{name}.perm"] = pack.unpack_perm(st[f"{name}.perm"], n).to(perm_dtype(n))
    for name in (cfg.get("pt2llm_rotation") or {}).get("online", []):
        b = st[f"{name}.input_transform.signs"]
        n = st[f"{name}.packed"].shape[1]
        st[f"{name}.input_transform.signs"] = pack.unpack_signs(b, n)
    qc["format_version"] = 2
    (dst / "config.json").write_text(json.dumps(cfg))
    checkpoint.write_safetensors(dst / "model.safetensors", st, {"format": "pt", "pt2llm_format_version": "2"})
    return dst
