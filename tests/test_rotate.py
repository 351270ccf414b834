"""Rotated models: the float transform is exact (same logits), rotated quantized models
save, load (both ways), resume, and every command takes them."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pt2llm
from pt2llm import cli, data
from pt2llm.model import driver, sources
from pt2llm.rotate import RotationError, fold, hadamard, online
from tinymodels import quantize, quantize_killed_after_first_layer, sha256


def _float(d):
    """The tiny float model with random norm weights and biases, so folding them is tested."""
    model, tok, _ = sources.load_float(str(d / "float"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model, tok


def _logits(model, tok):
    x = torch.randint(0, len(tok), (3, 23), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        return model(x).logits


def _close(out, ref, rel=2e-5):
    """Max abs difference within rel of the largest logit, and the difference's norm too."""
    assert ref.abs().max() > 0.5
    assert (out - ref).abs().max() <= rel * ref.abs().max(), (out - ref).abs().max()
    assert (out - ref).norm() <= rel * ref.norm()


def test_rotated_float_model_gives_the_same_logits(tiny):
    kind, d = tiny
    model, tok = _float(d)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (kind == "llama")
    ref = _logits(model, tok)
    emb = model.model.embed_tokens.weight.clone()
    record = fold.rotate_model(model, seed=0)
    out = _logits(model, tok)
    _close(out, ref)
    # it did rotate: embeddings changed, norms folded to 1, lm_head untied, o_proj and down_proj online
    assert (model.model.embed_tokens.weight - emb).abs().max() > 0.01
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in
               [model.model.norm] + [lay.input_layernorm for lay in model.model.layers])
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert record["untied_lm_head"] == tied and model.config.tie_word_embeddings is False
    assert record["online"] == [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.o_proj", "mlp.down_proj")]
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, online.RotatedLinear)
    assert isinstance(layer.self_attn.o_proj, online.RotatedLinear)
    assert layer.self_attn.o_proj.input_transform.size == layer.self_attn.o_proj.in_features
    # each part matters: with a wrong sign in either online transform the model is wrong
    for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
        with torch.no_grad():
            lin.input_transform.signs[0] *= -1
        assert (_logits(model, tok) - ref).abs().max() > 1e-3
        with torch.no_grad():
            lin.input_transform.signs[0] *= -1
        _close(_logits(model, tok), ref)


def test_a_second_rotation_and_other_models_are_refused(tiny):
    _, d = tiny
    model, _ = _float(d)
    fold.rotate_model(model)
    with pytest.raises(RotationError, match="already rotated"):
        fold.rotate_model(model)
    model, _ = _float(d)
    model.config.model_type = "gemma"
    with pytest.raises(RotationError, match="model types"):
        fold.rotate_model(model)


def test_rotate_command_writes_a_loadable_rotated_folder(tiny, tmp_path, capsys):
    kind, d = tiny
    out = tmp_path / "rot"
    assert cli.main(["rotate", str(d / "float"), "--out", str(out), "--seed", "3", "--no-progress"]) == 0
    assert "rotated" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pt2llm_rotation"]["seed"] == 3 and cfg["tie_word_embeddings"] is False
    rotated, tok, source = sources.load_float(str(out))
    assert source.get("rotated") and isinstance(rotated.model.layers[1].mlp.down_proj, online.RotatedLinear)
    assert isinstance(rotated.model.layers[1].self_attn.o_proj, online.RotatedLinear)
    original, _, _ = sources.load_float(str(d / "float"))
    _close(_logits(rotated, tok), _logits(original, tok))
    # the signs are read from the folder, not invented: a different seed gives other signs
    other = fold.Plan.for_model(original, seed=4).down[1]
    assert torch.equal(rotated.model.layers[1].mlp.down_proj.input_transform.signs,
                       fold.Plan.for_model(original, seed=3).down[1])
    assert not torch.equal(rotated.model.layers[1].mlp.down_proj.input_transform.signs, other)
    assert torch.equal(rotated.model.layers[1].self_attn.o_proj.input_transform.signs,
                       fold.Plan.for_model(original, seed=3).attn[1])
    # quantizing the rotated folder is the same as quantizing with --rotate hadamard
    quantize(d, tmp_path / "q-unrotated", "--seed", "3")  # a control
    args = ["--calib", str(d / "calib.txt"), "--nsamples", "4", "--seqlen", "64", "--device", "cpu",
            "--no-progress", "--seed", "3"]
    assert cli.main(["quantize", str(out), "--out", str(tmp_path / "qa"), *args]) == 0
    assert cli.main(["quantize", str(d / "float"), "--out", str(tmp_path / "qb"), "--rotate", "hadamard", *args]) == 0
    a, b = (sha256(tmp_path / q / "model.safetensors") for q in ("qa", "qb"))
    assert a == b != sha256(tmp_path / "q-unrotated" / "model.safetensors")
    # and rotating it twice is refused with one line
    assert cli.main(["quantize", str(out), "--out", str(tmp_path / "qc"), "--rotate", "hadamard", *args]) == 2
    assert "already rotated" in capsys.readouterr().err
    # a quantized model cannot be rotated
    assert cli.main(["rotate", str(tmp_path / "q-unrotated"), "--out", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert "only float models" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_rotate_quantize_save_load_round_trip(tiny, tmp_path, capsys):
    kind, d = tiny
    out = tmp_path / "q"
    quantize(d, out, "--rotate", "hadamard")
    model, tok, _ = sources.load_float(str(d / "float"))
    float_logits = _logits(model, tok)
    calib = data.calibration_windows(str(d / "calib.txt"), tok, 4, 64, 0)
    mods = driver.quantize_model(model, calib, driver.QuantConfig(rotate="hadamard"), progress=False)
    assert len(mods) == 14
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, pt2llm.TernaryLinear) and isinstance(down.input_transform, online.OnlineHadamard)
    o = model.model.layers[1].self_attn.o_proj
    assert isinstance(o, pt2llm.TernaryLinear) and isinstance(o.input_transform, online.OnlineHadamard)
    ref = _logits(model, tok)
    a = _logits(pt2llm.load(out)[0], tok)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(hf.model.layers[1].mlp.down_proj.input_transform, online.OnlineHadamard)
    b = _logits(hf, tok)
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    torch.testing.assert_close(b, ref, rtol=0, atol=0)
    # without the online transform the quantized model computes something else
    hf.model.layers[1].mlp.down_proj.input_transform = None
    assert (_logits(hf, tok) - ref).abs().max() > 1e-3
    # a quantized model, not the float one (but not a broken one either)
    assert (ref - float_logits).abs().max() > 1e-3 and torch.isfinite(ref).all()
    qc = json.loads((out / "config.json").read_text())
    assert qc["quantization_config"]["rotate"] == "hadamard" and qc["pt2llm_rotation"]["method"] == "hadamard"
    # inspect, generate and eval take it
    assert cli.main(["inspect", str(out), "--json", str(tmp_path / "i.json")]) == 0
    assert "online transform" in capsys.readouterr().out
    rep = json.loads((tmp_path / "i.json").read_text())
    assert rep["rotation"]["online"] == qc["pt2llm_rotation"]["online"]
    row = next(r for r in rep["modules"] if r["module"] == "model.layers.1.mlp.down_proj")
    assert row["bytes"] == down.storage_bytes() + -(-down.in_features // 8)  # the signs (a bit each) are counted
    assert cli.main(["generate", str(out), "the quick", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the quick")


@pytest.mark.usefixtures("one_thread")
def test_killed_rotated_run_resumes_to_a_byte_identical_model(tiny, tmp_path):
    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4", "--seqlen", "64",
            "--device", "cpu", "--no-progress", "--rotate", "hadamard"]
    assert cli.main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    quantize_killed_after_first_layer(args, out)
    assert (tmp_path / ".out.work" / "layer-00000.safetensors").is_file()
    # a resume without rotation is another run
    assert cli.main([*args[:-2], "--out", str(out), "--resume"]) == 2
    # so is one whose layers were rotated with another set of online transforms (a run started
    # before o_proj had one records none: its layer files lack o_proj's signs)
    run = tmp_path / ".out.work" / "run.json"
    manifest = json.loads(run.read_text())
    assert manifest["rotation_online"] == ["self_attn.o_proj", "mlp.down_proj"]
    run.write_text(json.dumps({k: v for k, v in manifest.items() if k != "rotation_online"}))
    assert cli.main([*args, "--out", str(out), "--resume"]) == 2
    run.write_text(json.dumps(manifest))
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert sha256(out / "model.safetensors") == sha256(tmp_path / "ref" / "model.safetensors")


def test_hessian_of_an_online_transformed_linear_is_that_of_its_transformed_input():
    n = 328
    lin = torch.nn.Linear(n, 7, bias=False)
    signs = hadamard.random_signs(n, torch.Generator().manual_seed(1))
    layer = torch.nn.Sequential(online.RotatedLinear.wrap(lin, online.OnlineHadamard(n, signs)))
    inps = [torch.randn(1, 11, n, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    H = driver._group_hessian(layer, ["0"], inps, (), {})[0]
    x = torch.cat([t.reshape(-1, n) for t in inps]).double()
    xq = x @ hadamard.matrix(n, signs)
    torch.testing.assert_close(H.double(), 2 * xq.t() @ xq / x.shape[0], rtol=1e-4, atol=1e-5)
    assert (H.double() - 2 * x.t() @ x / x.shape[0]).abs().max() > 0.1


def test_quant_config_rejects_unknown_rotations():
    assert driver.QuantConfig(rotate="hadamard").to_dict()["rotate"] == "hadamard"
    with pytest.raises(ValueError, match="rotate"):
        driver.QuantConfig(rotate="random")


def test_online_transform_puts_given_signs_on_its_device():
    # the signs come from a CPU generator; a transform built for a layer on another device
    # must hold them there (on CUDA, CPU signs cost a copy per call, and the kernel's launch)
    signs = hadamard.random_signs(8, torch.Generator().manual_seed(0))
    t = online.OnlineHadamard(8, signs, device="meta")
    assert t.signs.device.type == "meta" and t.signs.dtype == torch.int8
    assert online.OnlineHadamard(8, signs).signs.device == signs.device
