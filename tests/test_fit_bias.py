"""--fit-bias: GPTQ on centered statistics and a fitted bias, against least squares with an
intercept, and in the driver, the saved folder and a resumed run."""
import json

import pytest
import torch

from pt2llm import checkpoint, cli, data, ternary
from pt2llm.model import driver, sources
from pt2llm.ternary.bias import center, fitted_bias
from pt2llm.ternary.target import DriftAccumulator, float_target


def _streams(seed=0, tokens=500, n=12, out=7):
    """Inputs with a large common mean (the quantized stream X, the float stream Xf), a weight,
    its bias and a residual drift R with a mean of its own."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) + 3 * torch.randn(n, generator=g, dtype=torch.float64)
    Xf = 1.2 * X + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64) + 0.5
    R = 0.2 * torch.randn(tokens, out, generator=g, dtype=torch.float64) - 0.7
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    b0 = torch.randn(out, generator=g, dtype=torch.float64)
    return X, Xf, R, W, b0


def _acc(X, Xf, R, batches=3):
    acc = DriftAccumulator(X.shape[1], R.shape[1])
    for x, xf, r in zip(X.float().chunk(batches), Xf.float().chunk(batches), R.float().chunk(batches)):
        acc.add(x, xf, r)
    return acc


def test_accumulators_keep_the_means_of_their_streams():
    X, Xf, R, _, _ = _streams()
    acc = _acc(X, Xf, R)
    torch.testing.assert_close(acc.mean.double(), X.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.mean_float.double(), Xf.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.mean_drift.double(), R.mean(0), rtol=1e-5, atol=1e-5)
    plain = ternary.HessianAccumulator(X.shape[1])
    for x in X.float().chunk(4):
        plain.add(x)
    torch.testing.assert_close(plain.mean.double(), X.mean(0), rtol=1e-5, atol=1e-5)


def test_centered_target_and_bias_are_least_squares_with_an_intercept():
    """Undamped, W*c and b are the least-squares fit of [X 1] to Y = W Xf + b0 + R."""
    X, Xf, R, W, b0 = _streams()
    acc = _acc(X, Xf, R)
    Hc, Dc, Pc = center(acc.H, acc.mean, acc.D, acc.mean_float, acc.P, acc.mean_drift)
    Wc = float_target(W.float(), Hc, Dc, 0.0, Pc)
    b = fitted_bias(W, Wc, acc.mean, acc.mean_float, acc.mean_drift, b0)
    Y = Xf @ W.T + b0 + R
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(X.shape[0], 1, dtype=torch.float64)], 1), Y).solution
    torch.testing.assert_close(Wc.double(), sol[:-1].T, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(b.double(), sol[-1], rtol=2e-3, atol=2e-3)
    # and without centering the same fit has no intercept: a worse fit when the data have a mean
    W0 = float_target(W.float(), acc.H, acc.D, 0.0, acc.P).double()
    loss = lambda V, c: float(((X @ V.T + c - Y) ** 2).sum())
    assert loss(Wc.double(), b.double()) < 0.9 * loss(W0, 0.0)


def test_for_any_weight_the_fitted_bias_is_optimal_and_the_centered_form_is_exact():
    """For a fixed (quantized) V: b(V) minimises the loss over biases, and the loss differences
    between two weights are the quadratic form of the centered Hessian about W*c."""
    X, Xf, R, W, b0 = _streams(1)
    acc = _acc(X, Xf, R)
    Hc, Dc, Pc = center(acc.H, acc.mean, acc.D, acc.mean_float, acc.P, acc.mean_drift)
    Wc = float_target(W.float(), Hc, Dc, 0.0, Pc).double()
    Y = Xf @ W.T + b0 + R
    N = X.shape[0]
    loss = lambda V, c: float(((X @ V.T + c - Y) ** 2).sum()) * 2 / N
    g = torch.Generator().manual_seed(5)
    Vs = [W + 0.3 * torch.randn(W.shape, generator=g, dtype=torch.float64) for _ in range(2)]
    fits = []
    for V in Vs:
        b = fitted_bias(W, V, acc.mean, acc.mean_float, acc.mean_drift, b0).double()
        for _ in range(3):  # any other bias does worse
            assert loss(V, b) < loss(V, b + 0.05 * torch.randn(b.shape, generator=g, dtype=torch.float64))
        E = V - Wc
        fits.append((loss(V, b), float(((E @ Hc.double()) * E).sum())))
    assert fits[0][0] - fits[1][0] == pytest.approx(fits[0][1] - fits[1][1], rel=1e-3)


def test_gptq_on_the_centered_hessian_fits_inputs_with_a_common_mean_better():
    """A linear whose inputs share a large mean: quantizing about the mean with the bias beats
    GPTQ's own fit of the same codes budget."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2048, 256, generator=g) + 4 * torch.randn(256, generator=g)
    W = torch.randn(64, 256, generator=g)
    acc = ternary.HessianAccumulator(256)
    acc.add(X)
    q = ternary.make_quantizer("pt2")
    plain = ternary.quantize_weight(W, acc.H, q, reorder="hessian").dequantize()
    Hc, _, _ = center(acc.H, acc.mean)
    cen = ternary.quantize_weight(W, Hc, q, reorder="hessian").dequantize()
    b = fitted_bias(W, cen, acc.mean)
    err = lambda V, c: float(((X @ (V - W).T + c) ** 2).sum())
    assert err(cen, b) < 0.8 * err(plain, 0.0)


def test_fit_bias_config():
    with pytest.raises(ValueError, match="--fit-bias"):
        driver.QuantConfig(method="rtn", fit_bias=True)
    assert "fit_bias" not in driver.QuantConfig().to_dict()  # as before the option existed: old folders resume
    assert driver.QuantConfig(fit_bias=True).to_dict()["fit_bias"] is True


def _first_linear_outputs(model, calib, name="model.layers.0.self_attn.q_proj"):
    """The outputs of layer 0's q_proj on the calibration windows: its inputs are the same in the
    float and the quantized model (embeddings and a norm)."""
    got = []
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: got.append(o.detach().double().reshape(-1, o.shape[-1])))
    with torch.no_grad():
        for i in range(calib.shape[0]):
            model(input_ids=calib[i:i + 1], use_cache=False)
    h.remove()
    return torch.cat(got)


@pytest.mark.parametrize("target", ["quantized", "residual"])
def test_driver_fit_bias_matches_the_mean_output(tiny, target):
    """Every quantized linear gets a bias; the first one's mean output on the calibration
    tokens is the float linear's (to fp16), which it is not without the bias."""
    kind, d = tiny
    fmodel, tok, _ = sources.load_float(str(d / "float"))
    calib = data.calibration_windows(str(d / "calib.txt"), tok, 4, 64, 0)
    ref = _first_linear_outputs(fmodel, calib).mean(0)
    gaps = {}
    for fit in (False, True):
        model, _, _ = sources.load_float(str(d / "float"))
        driver.quantize_model(model, calib, driver.QuantConfig(target=target, fit_bias=fit), progress=False)
        mods = [m for m in model.modules() if isinstance(m, ternary_linear())]
        assert len(mods) == 14
        if fit:
            assert all(m.bias is not None for m in mods)
        gaps[fit] = float((_first_linear_outputs(model, calib).mean(0) - ref).abs().max())
    scale = float(ref.abs().max())
    assert gaps[True] < 2e-3 * scale + 1e-3  # fp16 rounding of the weights and of the bias
    assert gaps[False] > 5 * gaps[True]


def ternary_linear():
    from pt2llm.nn import TernaryLinear
    return TernaryLinear


def test_cli_fit_bias_saves_loads_and_counts_the_bias(tiny, tmp_path):
    from tinymodels import quantize
    kind, d = tiny
    quantize(d, tmp_path / "plain", "--rotate", "hadamard")
    quantize(d, tmp_path / "q", "--rotate", "hadamard", "--fit-bias")
    model, tok = checkpoint.load(tmp_path / "q")
    qc = checkpoint.read_quantization_config(tmp_path / "q")
    assert qc["fit_bias"] is True
    mods = {n: m for n, m in model.named_modules() if isinstance(m, ternary_linear())}
    assert set(mods) == set(qc["modules"]) and all(m.bias is not None for m in mods.values())
    assert mods["model.layers.0.self_attn.o_proj"].bias.abs().max() > 0  # a bias the float model did not have
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # the bits a weight count the biases: 16 bits per output row more than the same folder without them
    assert cli.main(["inspect", str(tmp_path / "plain"), "--json", str(tmp_path / "plain.json")]) == 0
    assert cli.main(["inspect", str(tmp_path / "q"), "--json", str(tmp_path / "q.json")]) == 0
    plain, fitted = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "q.json"))
    rows = sum(r["out"] for r in fitted["modules"])
    assert fitted["quantized_bytes"] - plain["quantized_bytes"] == 2 * rows


@pytest.mark.usefixtures("one_thread")
def test_killed_fit_bias_run_resumes_to_a_byte_identical_model(tiny, tmp_path):
    from tinymodels import quantize_killed_after_first_layer, sha256

    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4",
            "--seqlen", "64", "--device", "cpu", "--no-progress", "--target", "residual", "--fit-bias"]
    assert cli.main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    quantize_killed_after_first_layer(args, out)
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert sha256(out / "model.safetensors") == sha256(tmp_path / "ref" / "model.safetensors")
