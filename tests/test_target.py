"""--target float (asymmetric calibration): W* against least squares, and in the driver."""
import json

import pytest
import torch

from pt2llm import cli, data, ternary
from pt2llm.model import driver, sources
from pt2llm.nn import TernaryLinear
from pt2llm.ternary.target import CrossAccumulator, DriftAccumulator, float_target


def _streams(seed=0, tokens=300, n=24):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    X[:, 3] *= 20  # an outlier channel, as real activations have
    Xf = X + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    W = torch.randn(10, n, generator=g, dtype=torch.float64)
    return X, Xf, W


def test_accumulators_match_the_definitions_in_chunks():
    X, Xf, _ = _streams()
    acc, ref = CrossAccumulator(X.shape[1]), ternary.HessianAccumulator(X.shape[1])
    for a, b in ((0, 7), (7, 150), (150, 300)):  # running means over uneven chunks
        acc.add(X[a:b].float(), Xf[a:b].float())
        ref.add(X[a:b].float())
    N = X.shape[0]
    torch.testing.assert_close(acc.H, ref.H, rtol=0, atol=0)
    torch.testing.assert_close(acc.H.double(), 2 / N * X.T @ X, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.D.double(), 2 / N * (Xf - X).T @ X, rtol=1e-5, atol=1e-4)


def test_float_target_is_the_least_squares_fit_of_the_float_outputs():
    X, Xf, W = _streams()
    acc = CrossAccumulator(X.shape[1])
    acc.add(X.float(), Xf.float())
    Wt = float_target(W.float(), acc.H, acc.D, percdamp=0.0)
    # independent: argmin_V ||X V^T - Xf W^T|| by lstsq in float64
    ref = torch.linalg.lstsq(X, Xf @ W.T).solution.T
    torch.testing.assert_close(Wt.double(), ref, rtol=1e-4, atol=1e-4)
    # it fits the float outputs better than W itself does
    assert (X @ Wt.double().T - Xf @ W.T).norm() < 0.99 * (X @ W.T - Xf @ W.T).norm()


def test_float_target_is_w_when_the_streams_agree_even_damped():
    X, _, W = _streams(1)
    acc = CrossAccumulator(X.shape[1])
    acc.add(X.float(), X.float())
    assert acc.D.abs().max() == 0
    torch.testing.assert_close(float_target(W.float(), acc.H, acc.D, percdamp=0.01), W.float(), rtol=0, atol=0)


def _quantized(d, target: str, percdamp: float | None = None, **config):
    """The tiny test model in d, quantized in memory with QuantConfig(target=target, percdamp=percdamp, **config)."""
    model, tok, _ = sources.load_float(str(d / "float"))
    calib = data.calibration_windows(str(d / "calib.txt"), tok, 4, 64, 0)
    driver.quantize_model(model, calib, driver.QuantConfig(target=target, percdamp=percdamp, **config),
                          progress=False)
    return model


def test_driver_target_float(tiny):
    """Layer 0's first group sees the same inputs on both streams, so its codes equal the
    default run's; the float stream then makes later linears differ; the config is recorded."""
    _, d = tiny
    a, b = (_quantized(d, t, percdamp=0.01).model.layers for t in ("quantized", "float"))
    for n in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(a[0].self_attn, n).packed, getattr(b[0].self_attn, n).packed), n
    assert not torch.equal(a[1].mlp.down_proj.packed, b[1].mlp.down_proj.packed)
    assert driver.QuantConfig(target="float").to_dict()["target"] == "float"
    assert "target" not in driver.QuantConfig().to_dict()
    with pytest.raises(ValueError, match="target"):
        driver.QuantConfig(method="rtn", target="float")


def test_damping_defaults_to_the_papers_and_to_ten_percent_when_fitting_the_float_model():
    assert driver.QuantConfig().percdamp == driver.PAPER_DAMP == 0.01
    assert driver.QuantConfig(method="gptq").percdamp == 0.01
    for t in ("float", "residual"):
        assert driver.QuantConfig(target=t).percdamp == driver.TARGET_DAMP == 0.1
        assert driver.QuantConfig(target=t).to_dict()["percdamp"] == 0.1  # recorded as resolved
        assert driver.QuantConfig(target=t, percdamp=0.01).percdamp == 0.01  # an explicit value wins
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="percdamp"):
            driver.QuantConfig(percdamp=bad)


def test_target_damp_is_the_solves_own_damping_and_defaults_to_percdamp():
    for t in ("float", "residual"):
        c = driver.QuantConfig(target=t)
        assert c.target_damp is None and c.solve_damp == c.percdamp == 0.1
        assert "target_damp" not in c.to_dict()  # one damping, recorded as before the option existed
        c = driver.QuantConfig(target=t, percdamp=0.01, target_damp=0.3)
        assert (c.percdamp, c.solve_damp) == (0.01, 0.3)
        assert c.to_dict()["target_damp"] == 0.3
    with pytest.raises(ValueError, match="--target float"):
        driver.QuantConfig(target_damp=0.3)  # GPTQ's own target has no solve to damp
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="target-damp"):
            driver.QuantConfig(target="float", target_damp=bad)


def test_driver_damps_the_target_solve_and_gptq_apart(tiny, monkeypatch):
    """With --target-damp, W*'s solve gets that damping and GPTQ (and refinement) keep --percdamp."""
    _, d = tiny
    solve, gptq, refined = [], [], []  # the damping each call got, one entry per linear
    real_target, real_gptq, real_refine = ternary.target.float_target, ternary.quantize_weight, ternary.refine.refine

    def target_spy(W, H, D, percdamp=0.01, P=None):
        solve.append(percdamp)
        return real_target(W, H, D, percdamp, P)

    def gptq_spy(*args, **kwargs):
        gptq.append(kwargs["percdamp"])
        return real_gptq(*args, **kwargs)

    def refine_spy(result, *args, **kwargs):
        refined.append(result.damp)
        return real_refine(result, *args, **kwargs)

    monkeypatch.setattr(ternary.target, "float_target", target_spy)
    monkeypatch.setattr(ternary, "quantize_weight", gptq_spy)
    monkeypatch.setattr(ternary.refine, "refine", refine_spy)
    model = _quantized(d, "residual", percdamp=0.02, target_damp=0.3, refine=1)
    n_linears = sum(isinstance(m, TernaryLinear) for m in model.modules())
    assert solve == [0.3] * n_linears and gptq == refined == [0.02] * n_linears
    solve.clear()
    gptq.clear()
    _quantized(d, "residual")
    assert set(solve) == set(gptq) == {driver.TARGET_DAMP}


def test_cli_leaves_damping_to_the_config(tiny, tmp_path):
    """No --percdamp on the command line: the folder records the target's default."""
    _, d = tiny
    out = tmp_path / "q"
    assert cli.main(["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "2",
                     "--seqlen", "32", "--device", "cpu", "--no-progress", "--target", "float",
                     "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["percdamp"] == 0.1
    assert "target_damp" not in cfg["quantization_config"]


def test_cli_target_damp(tiny, tmp_path, capsys):
    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "2", "--seqlen", "32",
            "--device", "cpu", "--no-progress", "--target-damp", "0.3"]
    assert cli.main([*args, "--out", str(tmp_path / "refused")]) == 2  # GPTQ's own target: nothing to damp
    assert "--target-damp" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert cli.main([*args, "--target", "residual", "--percdamp", "0.01", "--out", str(tmp_path / "q")]) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qc["percdamp"], qc["target_damp"]) == (0.01, 0.3)


@pytest.mark.usefixtures("one_thread")
def test_killed_float_target_run_resumes_to_a_byte_identical_model(tiny, tmp_path):
    """A resumed layer is loaded quantized, but the float stream must still pass through the
    float layer: the resumed run equals an uninterrupted one."""
    from tinymodels import quantize_killed_after_first_layer, sha256

    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4",
            "--seqlen", "64", "--device", "cpu", "--no-progress", "--target", "float"]
    assert cli.main([*args, "--out", str(tmp_path / "ref")]) == 0
    default = tmp_path / "default"
    assert cli.main([*args[:-2], "--out", str(default)]) == 0
    out = tmp_path / "out"
    quantize_killed_after_first_layer(args, out)
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert sha256(out / "model.safetensors") == sha256(tmp_path / "ref" / "model.safetensors")
    assert sha256(default / "model.safetensors") != sha256(out / "model.safetensors")


def test_drift_target_is_the_least_squares_fit_of_the_float_outputs_plus_the_drift():
    X, Xf, W = _streams(2)
    g = torch.Generator().manual_seed(3)
    R = torch.randn(X.shape[0], W.shape[0], generator=g, dtype=torch.float64) + 0.5 * X[:, :W.shape[0]]
    acc, ref = DriftAccumulator(X.shape[1], W.shape[0]), CrossAccumulator(X.shape[1])
    for a, b in ((0, 100), (100, 300)):
        acc.add(X[a:b].float(), Xf[a:b].float(), R[a:b].float())
        ref.add(X[a:b].float(), Xf[a:b].float())
    torch.testing.assert_close(acc.H, ref.H, rtol=0, atol=0)
    torch.testing.assert_close(acc.D, ref.D, rtol=0, atol=0)
    torch.testing.assert_close(acc.P.double(), 2 / X.shape[0] * R.T @ X, rtol=1e-5, atol=1e-4)
    Wt = float_target(W.float(), acc.H, acc.D, percdamp=0.0, P=acc.P)
    expect = torch.linalg.lstsq(X, Xf @ W.T + R).solution.T  # independent: argmin ||X V^T - (Xf W^T + R)||
    torch.testing.assert_close(Wt.double(), expect, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="drift"):
        acc.add(X[:5].float(), Xf[:5].float(), R[:4].float())


def test_driver_target_residual(tiny):
    """Layer 0 starts from the same stream in both models, so q/k/v/o (no drift yet before
    o_proj) equal the float target's; down_proj then also cancels the drift o_proj left."""
    _, d = tiny
    a, b = (_quantized(d, t).model.layers[0] for t in ("float", "residual"))
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(a.self_attn, n).packed, getattr(b.self_attn, n).packed), n
    assert not torch.equal(a.mlp.down_proj.packed, b.mlp.down_proj.packed)
    assert driver.QuantConfig(target="residual").to_dict()["target"] == "residual"
    with pytest.raises(ValueError, match="residual"):
        driver.QuantConfig(method="rtn", target="residual")
