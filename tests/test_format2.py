"""Format 2 (5 rows a byte), loading format-1 folders, `pt2llm bench` and its decode loop."""
import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import pt2llm
from pt2llm import checkpoint, cli, pack
from pt2llm.speed import Decoder

from tinymodels import as_format_2, quantize as _quantize


def test_every_group_of_five_trits_round_trips_through_one_byte():
    groups = torch.tensor(list(itertools.product([-1, 0, 1], repeat=5))).T  # [5, 243]
    b = pack.pack_trit_rows(groups)
    assert b.shape == (1, 243) and len(set(b[0].tolist())) == 243
    assert torch.equal(pack.unpack_trit_rows(b, 5), groups.to(torch.int8))
    # digit i by multiplications alone (what the kernels compute): d_i = 3 (q 3^i mod 256) >> 8
    q = b[0].long()
    for i in range(5):
        assert torch.equal((3 * (q * 3**i % 256)) >> 8, groups[i] + 1)


@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 3), (5, 7), (6, 128), (37, 300), (128, 129)])
def test_rows_round_trip_any_shape(rows, cols, gen):
    t = torch.randint(-1, 2, (rows, cols), generator=gen)
    b = pack.pack_trit_rows(t)
    assert b.dtype == torch.uint8 and b.shape == (-(-rows // 5), cols)
    assert torch.equal(pack.unpack_trit_rows(b, rows), t.to(torch.int8))


def _as_format_1(src, dst):
    """Rewrite a folder the way pt2llm wrote it before format 2: codes 5 to a byte along rows
    (and, as in format 2, column orders as int16 indices)."""
    as_format_2(src, dst)
    st = {k: v.clone() for k, v in checkpoint.read_safetensors(dst / "model.safetensors").items()}  # not the mapped file
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    for name in qc["modules"]:
        key = f"{name}.packed"
        rows = st[f"{name}.alpha"].shape[0]
        st[key] = pack.pack_trits(pack.unpack_trit_rows(st[key], rows)).contiguous()
    qc["format_version"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    checkpoint.write_safetensors(dst / "model.safetensors", st, {"format": "pt", "pt2llm_format_version": "1"})
    return dst


def test_format_1_folders_load_repacked(tiny, tmp_path):
    _, d = tiny
    out = d / "fmt2-q"
    if not out.exists():
        _quantize(d, out)
    old = _as_format_1(out, tmp_path / "v1")
    assert checkpoint.FORMAT_VERSION >= 2
    new_model = pt2llm.load(out)[0]
    for model in (pt2llm.load(old)[0], AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)):
        a = dict(model.named_modules())
        for name, m in new_model.named_modules():
            if isinstance(m, pt2llm.TernaryLinear):
                assert a[name].packing == 2 and torch.equal(a[name].packed, m.packed), name
        x = torch.randint(0, new_model.config.vocab_size, (1, 9))
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, new_model(x).logits, rtol=0, atol=0)


def test_decode_loop_matches_generate():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prompt = torch.randint(0, 100, (2, 7))
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                         min_new_tokens=10, do_sample=False, pad_token_id=0)[:, 7:]
    assert torch.equal(Decoder(model, 2, 30).generate(prompt, 10), ref)


def test_compiled_decode_step_gives_the_same_tokens(monkeypatch):
    """`pt2llm bench --compile`: the decode step through torch.compile (ops.backend, then
    Inductor) decodes the same greedy tokens as the eager step."""
    from pt2llm.kernels import ops
    passes = []
    real = ops.group_linears
    monkeypatch.setattr(ops, "group_linears", lambda gm: passes.append(gm) or real(gm))
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prompt = torch.randint(0, 100, (1, 5))
    torch._dynamo.reset()
    dec = Decoder(model, 1, 20, compile=True)
    assert torch.equal(dec.generate(prompt, 8), Decoder(model, 1, 20).generate(prompt, 8))
    assert passes  # the step went through the compile backend


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_bench_without_cuda_is_a_user_error(capsys):
    assert cli.main(["bench", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pt2llm: error:") and "CUDA" in err and len(err.strip().splitlines()) == 1


def test_bench_options_are_checked(capsys):
    for args in (["bench", "m", "--prompt-len", "0"], ["bench", "m", "--new-tokens", "-3"], ["bench", "m", "--batch", "x"],
                 ["bench", "m", "--attention", "flash"]):
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        assert e.value.code == 2
        assert "pt2llm: error:" in capsys.readouterr().err
