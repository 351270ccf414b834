"""--refine (ternary/refine.py): the joint grid against least squares, coordinate descent
against brute force, refine against GPTQ and against the global optimum, and in the driver."""
import itertools

import pytest
import torch

from pt2llm import data, ternary
from pt2llm.model import driver, sources
from pt2llm.ternary import refine as R


def _problem(seed=0, n=6, m=20, tokens=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, m, generator=g, dtype=torch.float64)
    X[:, 2] *= 8                                      # an outlier channel
    X = X + 0.5 * X[:, :1]                            # correlated inputs: H far from diagonal
    W = torch.randn(n, m, generator=g, dtype=torch.float64)
    return X, W, 2 * X.T @ X / tokens


def _design(c, k):
    """Z [2 nb, m] for one row's codes c [m]: rows c masked to block b, then 1 masked to block b."""
    m = c.shape[0]
    nb = -(-m // k)
    Z = torch.zeros(2 * nb, m, dtype=torch.float64)
    for b in range(nb):
        Z[b, b * k:(b + 1) * k] = c[b * k:(b + 1) * k]
        Z[nb + b, b * k:(b + 1) * k] = 1
    return Z


def _lstsq_grid(X, w, c, k):
    """argmin_theta ||(theta Z - w) X^T|| by lstsq, float64: the independent computation."""
    Z = _design(c, k)
    theta = torch.linalg.lstsq((Z @ X.T).T, (w @ X.T)[:, None], driver="gelsd").solution[:, 0]
    nb = Z.shape[0] // 2
    return theta[:nb], theta[nb:]


@pytest.mark.parametrize("k", [8, 7])  # blocks that do and do not divide the 20 columns
def test_refit_grid_is_the_least_squares_grid_of_all_blocks(k):
    X, W, H = _problem()
    g = torch.Generator().manual_seed(1)
    C = torch.randint(-1, 2, W.shape, generator=g).double()
    alpha, mu = R.refit_grid(W, C, H, k)
    for r in range(W.shape[0]):
        a_ref, m_ref = _lstsq_grid(X, W[r], C[r], k)
        torch.testing.assert_close(alpha[r], a_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mu[r], m_ref, rtol=1e-4, atol=1e-5)


def test_refit_grid_is_well_posed_when_a_block_has_no_nonzero_code():
    X, W, H = _problem(2)
    C = torch.ones_like(W)
    C[:, :8] = 0                                   # block 0: alpha cannot be told from mu
    prev = torch.full((W.shape[0], 3), 0.5, dtype=torch.float64)
    alpha, mu = R.refit_grid(W, C, H, 8, prev)
    assert torch.isfinite(alpha).all() and torch.isfinite(mu).all()
    torch.testing.assert_close(alpha[:, 0], prev[:, 0], rtol=0, atol=1e-6)  # the ridge keeps it
    # block 0's values are then just mu, still the least-squares ones (the optimum is unchanged)
    What = R.expand(alpha, 8, 20) * C + R.expand(mu, 8, 20)
    Zs = [torch.linalg.lstsq((_design(C[r], 8) @ X.T).T, (W[r] @ X.T)[:, None], driver="gelsd").solution[:, 0]
          for r in range(W.shape[0])]
    ref = torch.stack([z @ _design(C[r], 8) for r, z in enumerate(Zs)])
    torch.testing.assert_close(R.layer_loss(What, W, H), R.layer_loss(ref, W, H), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("lo,hi", [(-1, 1), (0, 3)])
def test_descend_converges_to_a_point_no_single_code_change_improves(lo, hi):
    _, W, H = _problem(3)
    k = 8
    g = torch.Generator().manual_seed(4)
    C = torch.randint(lo, hi + 1, W.shape, generator=g).double()
    alpha, mu = R.refit_grid(W, C, H, k)
    alpha = alpha.abs() + 0.05

    def loss(C):
        return R.layer_loss(R.expand(alpha, k, 20) * C + R.expand(mu, k, 20), W, H)

    prev = loss(C)
    for _ in range(50):
        C_new = R.descend(W, C, alpha, mu, H, k, lo, hi)
        cur = loss(C_new)
        assert (cur <= prev + 1e-12).all()          # a sweep never raises the loss
        if torch.equal(C_new, C):
            break
        C, prev = C_new, cur
    else:
        pytest.fail("coordinate descent did not settle in 50 sweeps")
    base = loss(C)
    for r, j in itertools.product(range(W.shape[0]), range(W.shape[1])):  # brute force, one code at a time
        for v in range(lo, hi + 1):
            C2 = C.clone()
            C2[r, j] = v
            assert loss(C2)[r] >= base[r] - 1e-9, (r, j, v)


@pytest.mark.parametrize("method", ["pt2", "gptq"])
def test_refine_never_loses_to_gptq_and_stays_on_the_grid(method):
    _, W, H = _problem(5, n=16, m=40)
    q = ternary.make_quantizer(method, bits=2)
    res = ternary.quantize_weight(W.float(), H.float(), q, block_size=16, reorder="hessian")
    Hd = H + res.damp * H.diagonal().mean() * torch.eye(40, dtype=torch.float64)
    before = R.layer_loss(res.dequantize().double(), W, Hd)
    out = R.refine(res, W.float(), H.float(), q.lo, q.hi, sweeps=3)
    after = R.layer_loss(out.dequantize().double(), W, Hd)
    assert (after <= before * (1 + 1e-5)).all()
    assert after.sum() < 0.97 * before.sum()       # and it does improve
    assert torch.equal(out.perm, res.perm)
    assert int(out.codes.min()) >= q.lo and int(out.codes.max()) <= q.hi
    assert (out.scale >= 0).all()
    assert torch.equal(out.scale, out.scale.half().float())  # the grid is what 16 bits store
    with pytest.raises(ValueError, match="sweeps"):
        R.refine(res, W.float(), H.float(), q.lo, q.hi, sweeps=-1)


def test_refine_lands_between_gptq_and_the_brute_force_optimum():
    """One row, 6 columns in two blocks: the optimum over all 3^6 code vectors, each with its
    least-squares grid (lstsq), bounds every method from below."""
    X, W, H = _problem(6, n=3, m=6)
    k = 3
    q = ternary.make_quantizer("pt2")
    res = ternary.quantize_weight(W, H, q, block_size=k, grid_dtype=None, percdamp=0.0)
    out = R.refine(res, W, H, -1, 1, sweeps=4, grid_dtype=None)
    got, start = R.layer_loss(out.dequantize(), W, H), R.layer_loss(res.dequantize(), W, H)
    for r in range(W.shape[0]):
        best = min(float(((torch.stack(_lstsq_grid(X, W[r], c, k)).flatten() @ _design(c, k) - W[r]) @ X.T)
                         .pow(2).sum()) * 2 / X.shape[0]
                   for c in (torch.tensor(t, dtype=torch.float64) for t in itertools.product((-1, 0, 1), repeat=6)))
        assert best - 1e-9 <= float(got[r]) <= float(start[r]) + 1e-9


def test_driver_refine_lowers_the_first_groups_output_error_and_is_recorded(tiny):
    """Layer 0's q/k/v see the same inputs with and without --refine: the refined linears
    fit W on those inputs better; the option lands in the config only when set."""
    _, d = tiny
    outs, H = {}, None
    for sweeps in (0, 2):
        model, tok, _ = sources.load_float(str(d / "float"))
        calib = data.calibration_windows(str(d / "calib.txt"), tok, 4, 64, 0)
        if H is None:
            layer = model.model.layers[0]
            W = {n: getattr(layer.self_attn, n).weight.detach().double().clone() for n in ("q_proj", "k_proj")}
            xs = []
            hook = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
            with torch.no_grad():
                model(calib)
            hook.remove()
            X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        driver.quantize_model(model, calib, driver.QuantConfig(refine=sweeps), progress=False)
        outs[sweeps] = {n: getattr(model.model.layers[0].self_attn, n).dequantize(torch.float64)
                        for n in W}
    for n in W:
        err = {s: float(((outs[s][n] - W[n]) @ X.T).pow(2).sum()) for s in outs}
        assert err[2] < err[0], n
    assert driver.QuantConfig(refine=2).to_dict()["refine"] == 2
    assert "refine" not in driver.QuantConfig().to_dict()
    for bad in (dict(refine=-1), dict(method="rtn", refine=1)):
        with pytest.raises(ValueError, match="refine"):
            driver.QuantConfig(**bad)
