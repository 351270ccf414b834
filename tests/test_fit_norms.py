"""--fit-norms: the norm weights refitted to the float outputs of the quantized linears that
read them, against least squares and in the driver."""
import json

import pytest
import torch

from pt2llm import checkpoint, cli, data
from pt2llm.model import driver, sources
from pt2llm.ternary.target import CrossAccumulator, input_scales


def _problem(seed=0, tokens=300, n=12):
    """Two linears reading one input: quantized weights (ternary values times a row scale), the
    float weights they came from, and a quantized and a float input stream."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    X[:, 4] *= 8  # an outlier channel
    Xf = 1.1 * X + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    pairs = []
    for rows in (7, 5):
        W = torch.randn(rows, n, generator=g, dtype=torch.float64)
        Wq = W.sign() * (W.abs() > 0.5) * W.abs().mean(dim=1, keepdim=True)
        pairs.append((Wq, W))
    return X, Xf, pairs


def _lstsq_scales(X, Xf, pairs, ridge):
    """Independent: argmin_s Σ_ℓ ||X diag(s) Ŵ_ℓᵀ − X̃ W_ℓᵀ||² · 2/N + ridge ||s − 1||², one
    augmented least-squares problem in float64 over every (token, linear, output) row."""
    N, n = X.shape
    rows, rhs = [], []
    for Wq, W in pairs:
        # output i of token t: Σ_k Ŵ[i, k] X[t, k] s_k, against (X̃ Wᵀ)[t, i]
        rows.append((X[:, None, :] * Wq[None, :, :]).reshape(-1, n) * (2 / N) ** 0.5)
        rhs.append((Xf @ W.T).reshape(-1) * (2 / N) ** 0.5)
    rows.append(ridge ** 0.5 * torch.eye(n, dtype=torch.float64))
    rhs.append(ridge ** 0.5 * torch.ones(n, dtype=torch.float64))
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)[:, None]).solution[:, 0]


def _objective(X, Xf, pairs, s):
    return sum(float(((X * s) @ Wq.T - Xf @ W.T).pow(2).sum()) for Wq, W in pairs)


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_input_scales_are_the_least_squares_fit_of_the_float_outputs(damp):
    X, Xf, pairs = _problem()
    acc = CrossAccumulator(X.shape[1])
    for a, b in ((0, 120), (120, 300)):
        acc.add(X[a:b].float(), Xf[a:b].float())
    s = input_scales(pairs, acc.H, acc.D, damp)
    A = sum((Wq.T @ Wq) for Wq, _ in pairs) * (2 / X.shape[0] * X.T @ X)
    ridge = damp * float(A.diagonal().mean())
    torch.testing.assert_close(s.double(), _lstsq_scales(X, Xf, pairs, ridge), rtol=1e-4, atol=1e-4)
    ones = torch.ones(X.shape[1], dtype=torch.float64)
    assert _objective(X, Xf, pairs, s.double()) < 0.9 * _objective(X, Xf, pairs, ones)


def test_input_scales_are_one_when_nothing_is_quantized_and_the_streams_agree():
    X, _, pairs = _problem(1)
    acc = CrossAccumulator(X.shape[1])
    acc.add(X.float(), X.float())
    s = input_scales([(W, W) for _, W in pairs], acc.H, acc.D, 0.01)
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-5)


def test_fit_norms_config():
    with pytest.raises(ValueError, match="--fit-norms"):
        driver.QuantConfig(fit_norms=True)  # GPTQ's own target keeps no float stream
    assert "fit_norms" not in driver.QuantConfig(target="residual").to_dict()  # as before the option existed
    assert driver.QuantConfig(target="float", fit_norms=True).to_dict()["fit_norms"] is True


def _group_error(model, fmodel, calib):
    """Σ over the calibration windows of layer 0's q/k/v outputs against the float model's
    (both read the same embeddings: layer 0 has no drift before it)."""
    outs = {}
    for m, key in ((model, "q"), (fmodel, "f")):
        got = []
        hooks = [getattr(m.model.layers[0].self_attn, n).register_forward_hook(
            lambda mod, i, o: got.append(o.double())) for n in ("q_proj", "k_proj", "v_proj")]
        with torch.no_grad():
            for i in range(calib.shape[0]):
                m(input_ids=calib[i:i + 1], use_cache=False)
        for h in hooks:
            h.remove()
        outs[key] = got
    return sum(float((a - b).pow(2).sum()) for a, b in zip(outs["q"], outs["f"]))


def test_driver_fit_norms_lowers_layer_zeros_error_and_changes_only_norms_after_it(tiny):
    """Layer 0's q/k/v are quantized before their norm is refitted, so their codes are the
    same with the option; the refitted norm then brings their outputs closer to the float
    model's. Nothing else but norms and the linears quantized after a refit changes."""
    _, d = tiny
    fmodel, tok, _ = sources.load_float(str(d / "float"))
    calib = data.calibration_windows(str(d / "calib.txt"), tok, 4, 64, 0)
    models, stats = [], driver.DriverStats()
    for fit in (False, True):
        model, _, _ = sources.load_float(str(d / "float"))
        driver.quantize_model(model, calib, driver.QuantConfig(target="residual", fit_norms=fit), progress=False,
                              stats=stats if fit else None)
        models.append(model)
    plain, fitted = models
    a, b = plain.model.layers[0], fitted.model.layers[0]
    for n in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(a.self_attn, n).packed, getattr(b.self_attn, n).packed), n
    assert not torch.equal(a.input_layernorm.weight, b.input_layernorm.weight)
    assert not torch.equal(a.post_attention_layernorm.weight, b.post_attention_layernorm.weight)
    assert torch.equal(plain.model.norm.weight, fitted.model.norm.weight)
    assert torch.equal(plain.model.embed_tokens.weight, fitted.model.embed_tokens.weight)
    assert _group_error(fitted, fmodel, calib) < 0.98 * _group_error(plain, fmodel, calib)
    assert [r["norm"] for r in stats.norms] == [f"model.layers.{i}.{n}" for i in range(2)
                                                for n in ("input_layernorm", "post_attention_layernorm")]


def test_cli_fit_norms(tiny, tmp_path, capsys):
    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4", "--seqlen", "64",
            "--device", "cpu", "--no-progress", "--fit-norms"]
    assert cli.main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "--fit-norms" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    out, rep = tmp_path / "q", tmp_path / "rep.json"
    assert cli.main([*args, "--target", "residual", "--rotate", "hadamard", "--out", str(out),
                     "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["config"]["fit_norms"] is True and len(report["fit_norms"]) == 4
    model, _ = checkpoint.load(out)
    assert not torch.equal(model.model.layers[1].input_layernorm.weight,
                           torch.ones_like(model.model.layers[1].input_layernorm.weight))  # rotation left ones


@pytest.mark.usefixtures("one_thread")
def test_killed_fit_norms_run_resumes_to_a_byte_identical_model(tiny, tmp_path):
    """The refitted norms are part of each persisted layer, so a resumed run reads them back."""
    from tinymodels import quantize_killed_after_first_layer, sha256

    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4",
            "--seqlen", "64", "--device", "cpu", "--no-progress", "--target", "residual", "--fit-norms"]
    assert cli.main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    quantize_killed_after_first_layer(args, out)
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert sha256(out / "model.safetensors") == sha256(tmp_path / "ref" / "model.safetensors")
