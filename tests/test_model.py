"""Tiny random Llama and Qwen2 (hidden size not a multiple of 128) through the CLI."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import pt2llm
from pt2llm import cli, data
from pt2llm.model import driver, sources
from tinymodels import quantize as _quantize
from tinymodels import sha256 as _sha
from tinymodels import text as _text

def test_quantize_save_load_both_ways_and_logits_match(tiny, capsys):
    kind, d = tiny
    out = d / "q"
    _quantize(d, out)
    # the same quantization in memory
    model, tok, _ = sources.load_float(str(d / "float"))
    calib = data.calibration_windows(str(d / "calib.txt"), tok, 4, 64, 0)
    mods = driver.quantize_model(model, calib, driver.QuantConfig(), progress=False)
    assert len(mods) == 2 * 7
    if kind == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    x = torch.randint(0, len(tok), (2, 17))
    with torch.no_grad():
        ref = model(x).logits
        a = pt2llm.load(out)[0](x).logits
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert isinstance(hf.model.layers[1].mlp.down_proj, pt2llm.TernaryLinear)
        b = hf(x).logits
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    torch.testing.assert_close(b, ref, rtol=0, atol=0)


def test_same_seed_gives_byte_identical_safetensors(tiny):
    _, d = tiny
    _quantize(d, d / "r1")
    _quantize(d, d / "r2")
    assert _sha(d / "r1" / "model.safetensors") == _sha(d / "r2" / "model.safetensors")
    _quantize(d, d / "r3", "--seed", "1")
    assert _sha(d / "r1" / "model.safetensors") != _sha(d / "r3" / "model.safetensors")


@pytest.mark.parametrize("extra", [["--method", "rtn"], ["--method", "gptq", "--bits", "3"],
                                   ["--no-itf", "--no-aga", "--reorder", "hessian"], ["--reorder", "random"]])
def test_methods_and_ablations_load_back(tiny, extra):
    _, d = tiny
    out = d / ("m-" + "-".join(e.strip("-") for e in extra))
    _quantize(d, out, *extra)
    model, tok = pt2llm.load(out)
    qc = model.config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    assert qc["method"] == (extra[1] if extra[0] == "--method" else "pt2")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, len(tok), (1, 9))).logits).all()


def test_inspect_generate_and_eval_commands(tiny, capsys, tmp_path, monkeypatch):
    _, d = tiny
    out = d / "cmds"
    _quantize(d, out)
    assert cli.main(["inspect", str(out), "--json", str(tmp_path / "i.json")]) == 0
    text = capsys.readouterr().out
    assert "bits per weight" in text
    import json
    rep = json.loads((tmp_path / "i.json").read_text())
    assert 1.85 < rep["bits_per_weight"] < 2.0 and rep["quantized_modules"] == 14
    assert cli.main(["generate", str(out), "the quick", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the quick")
    monkeypatch.setattr(data, "eval_text", lambda name: _text(7, 3000))
    assert cli.main(["eval", str(d / "float"), str(out), "--ppl", "wikitext2", "--seqlen", "64",
                     "--limit-windows", "3", "--device", "cpu", "--no-progress",
                     "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [r["quantized"] for r in res] == [False, True]
    assert all(r["wikitext2"]["windows"] == 3 for r in res)


def test_synthetic_calibration(tiny):
    _, d = tiny
    args = ["quantize", str(d / "float"), "--out", str(d / "syn"), "--calib", "synthetic",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--no-progress"]
    assert cli.main(args) == 0
    assert (d / "syn" / "model.safetensors").is_file()


def test_user_errors_exit_2_without_leftovers(tiny, capsys, tmp_path):
    _, d = tiny
    bad = [
        (["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist"),
        (["quantize", str(d / "float"), "--out", str(tmp_path / "o"), "--calib", str(tmp_path / "none.txt"),
          "--seqlen", "64"], "neither"),
        (["quantize", str(d / "float"), "--out", str(tmp_path / "o"), "--calib", str(d / "calib.txt"),
          "--nsamples", "1000", "--seqlen", "64"], "tokens"),
        (["quantize", str(d / "float"), "--out", str(tmp_path / "o"), "--method", "gptq", "--bits", "9"], "2..8"),
        (["quantize", str(d / "float"), "--out", str(tmp_path / "o"), "--seqlen", "4096",
          "--calib", str(d / "calib.txt")], "context"),
        (["quantize", str(d / "float"), "--out", str(d / "float")], "already exists"),
    ]
    for args, msg in bad:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", str(d / "float"), "--out", str(tmp_path / "o"), "--block-size", "0"])
    assert e.value.code == 2


def test_folder_models_are_streamed_one_layer_at_a_time(tiny):
    import json
    from pt2llm.model.stream import LayerStream
    _, d = tiny
    ls = LayerStream(d / "float")
    assert all(p.is_meta for layer in ls.layers for p in layer.parameters())
    assert not any(p.is_meta for p in ls.model.get_input_embeddings().parameters())
    ls.load_layer(0)
    assert not any(p.is_meta for p in ls.layers[0].parameters())
    assert all(p.is_meta for p in ls.layers[1].parameters())
    ref = AutoModelForCausalLM.from_pretrained(d / "float")
    for (n, a), (_, b) in zip(ls.layers[0].state_dict().items(), ref.model.layers[0].state_dict().items()):
        assert torch.equal(a, b), n
    _quantize(d, d / "streamed")
    qc = json.loads((d / "streamed" / "config.json").read_text())["quantization_config"]
    assert qc["source_model"]["streamed"] is True
