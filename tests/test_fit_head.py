"""--fit-head: the 16-bit lm_head refit to the float logits, against least squares and in the driver."""
import json

import pytest
import torch

from pt2llm import checkpoint, cli, data
from pt2llm.model import driver, sources
from pt2llm.ternary.target import CrossAccumulator, float_target, float_target_map, logit_error


def _streams(seed=0, tokens=400, n=16):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    X[:, 2] *= 10
    Xf = 1.3 * X + 0.4 * torch.randn(tokens, n, generator=g, dtype=torch.float64)  # a shrunk, noisy stream
    W = torch.randn(50, n, generator=g, dtype=torch.float64)
    return X, Xf, W


def test_float_target_map_is_the_ridge_least_squares_fit_towards_w():
    X, Xf, W = _streams()
    acc = CrossAccumulator(X.shape[1])
    acc.add(X.float(), Xf.float())
    N, p = X.shape[0], 0.05
    M = float_target_map(acc.H, acc.D, p)
    torch.testing.assert_close(W.float() @ M.float(), float_target(W.float(), acc.H, acc.D, p), rtol=1e-4, atol=1e-4)
    # independent: argmin_V ||X V^T - Xf W^T||^2 + c ||V - W||^2, with c = N/2 * p * mean(diag H)
    # (H = 2/N X^T X), as one augmented least-squares problem in float64
    c = N / 2 * p * (2 / N * X.T @ X).diagonal().mean()
    A = torch.cat([X, c.sqrt() * torch.eye(X.shape[1], dtype=torch.float64)])
    B = torch.cat([Xf @ W.T, c.sqrt() * W.T])
    ref = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close((W @ M).double(), ref, rtol=1e-4, atol=1e-4)
    # undamped, it is the plain least-squares fit of the float outputs
    ref0 = torch.linalg.lstsq(X, Xf @ W.T).solution.T
    torch.testing.assert_close(W @ float_target_map(acc.H, acc.D, 0.0), ref0, rtol=1e-4, atol=1e-4)


def test_logit_error_is_the_summed_squared_error_of_the_mapped_weight():
    X, Xf, W = _streams(1)
    acc, accf = CrossAccumulator(X.shape[1]), CrossAccumulator(X.shape[1])
    acc.add(X.float(), Xf.float())
    accf.add(Xf.float(), Xf.float())
    N = X.shape[0]
    for M in (torch.eye(X.shape[1], dtype=torch.float64), float_target_map(acc.H, acc.D, 0.01)):
        direct = ((X @ M.T @ W.T - Xf @ W.T) ** 2).sum() * 2 / N  # rows: x -> W M x against W x~
        got = logit_error(W.T @ W, M, acc.H, acc.D, accf.H)
        assert got == pytest.approx(float(direct), rel=1e-4)
    fitted = logit_error(W.T @ W, float_target_map(acc.H, acc.D, 0.0), acc.H, acc.D, accf.H)
    assert fitted < 0.5 * logit_error(W.T @ W, torch.eye(X.shape[1], dtype=torch.float64), acc.H, acc.D, accf.H)


def test_fit_head_config():
    with pytest.raises(ValueError, match="--fit-head"):
        driver.QuantConfig(fit_head=True)  # GPTQ's own target keeps no float stream
    assert "fit_head" not in driver.QuantConfig(target="residual").to_dict()  # as before the option existed
    assert driver.QuantConfig(target="float", fit_head=True).to_dict()["fit_head"] is True


def _calib_logits(model, calib):
    with torch.no_grad():
        return torch.cat([model(input_ids=calib[i:i + 1], use_cache=False).logits[0].double()
                          for i in range(calib.shape[0])])


def test_driver_fit_head_lowers_the_calibration_logit_error_and_touches_nothing_else(tiny):
    kind, d = tiny
    fmodel, tok, _ = sources.load_float(str(d / "float"))
    calib = data.calibration_windows(str(d / "calib.txt"), tok, 4, 64, 0)
    target = _calib_logits(fmodel, calib)
    models, stats = [], driver.DriverStats()
    for fit in (False, True):
        model, _, _ = sources.load_float(str(d / "float"))
        driver.quantize_model(model, calib, driver.QuantConfig(target="residual", fit_head=fit), progress=False,
                              stats=stats if fit else None)
        models.append(model)
    plain, fitted = models
    for (n, a), (_, b) in zip(plain.named_parameters(), fitted.named_parameters()):
        if "lm_head" not in n:
            assert torch.equal(a, b), n  # the decoder, norms and embeddings are untouched
    for (n, a), (_, b) in zip(plain.named_buffers(), fitted.named_buffers()):
        assert torch.equal(a, b), n
    assert not torch.equal(fitted.lm_head.weight, plain.lm_head.weight)
    assert fitted.lm_head.weight is not fitted.model.embed_tokens.weight and not fitted.config.tie_word_embeddings
    if kind == "llama":  # the tiny Llama ties lm_head: untied, the embeddings kept
        assert plain.lm_head.weight is plain.model.embed_tokens.weight
    energy = (target ** 2).sum()
    err = [float(((_calib_logits(m, calib) - target) ** 2).sum() / energy) for m in models]
    assert err[1] < err[0]
    # the driver's own account of it, from its sums, matches the direct one
    assert stats.head["logit_error_before"] == pytest.approx(err[0], rel=2e-2)
    assert stats.head["logit_error_after"] == pytest.approx(err[1], rel=2e-2)


def test_cli_fit_head(tiny, tmp_path, capsys):
    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4", "--seqlen", "64",
            "--device", "cpu", "--no-progress", "--fit-head"]
    assert cli.main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "--fit-head" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    out, rep = tmp_path / "q", tmp_path / "rep.json"
    assert cli.main([*args, "--target", "residual", "--rotate", "hadamard", "--out", str(out),
                     "--report", str(rep)]) == 0
    assert "lm_head refit" in capsys.readouterr().err
    report = json.loads(rep.read_text())
    assert report["fit_head"]["logit_error_after"] < report["fit_head"]["logit_error_before"]
    assert report["config"]["fit_head"] is True
    model, _ = checkpoint.load(out)
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.usefixtures("one_thread")
def test_killed_fit_head_run_resumes_to_a_byte_identical_model(tiny, tmp_path):
    """The head is fitted on the streams after the last layer, which a resumed run rebuilds."""
    from tinymodels import quantize_killed_after_first_layer, sha256

    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4",
            "--seqlen", "64", "--device", "cpu", "--no-progress", "--target", "residual", "--fit-head"]
    assert cli.main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    quantize_killed_after_first_layer(args, out)
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert sha256(out / "model.safetensors") == sha256(tmp_path / "ref" / "model.safetensors")
