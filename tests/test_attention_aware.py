"""--attention-aware: v_proj's Hessian from the attention-mixed inputs A_h X, against an
independent computation (the model's own eager attention probabilities), and in the driver."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from pt2llm import data
from pt2llm.model import driver, sources
from pt2llm.nn import TernaryLinear


def _windows(d, n=3, seqlen=48, seed=0):
    model, tok, _ = sources.load_float(str(d / "float"))
    return model, data.calibration_windows(str(d / "calib.txt"), tok, n, seqlen, seed)


def _eager_rows(d, calib):
    """Per window, (X, A): layer 0's v_proj input [T, in] and the attention probabilities
    [heads, T, T], from a separate copy of the model loaded with eager attention and run whole
    with output_attentions (its own causal mask)."""
    model = AutoModelForCausalLM.from_pretrained(str(d / "float"), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    seen = {}
    model.model.layers[0].self_attn.v_proj.register_forward_pre_hook(lambda m, inp: seen.__setitem__("x", inp[0]))
    out = []
    with torch.no_grad():
        for i in range(calib.shape[0]):
            a = model(calib[i:i + 1], output_attentions=True).attentions[0][0]
            out.append((seen["x"][0].double(), a.double()))
    return out


def _layer0(model, calib):
    parent, layers, _ = driver.find_decoder_layers(model)
    inps, args, kwargs = driver.capture_layer_inputs(model, parent, layers, calib, "cpu")
    return layers[0], inps, args, kwargs


def test_value_hessian_is_gptqs_over_the_attention_mixed_rows(tiny):
    _, d = tiny
    model, calib = _windows(d)
    layer, inps, args, kwargs = _layer0(model, calib)
    rows = _eager_rows(d, calib)
    assert all(torch.equal(a.triu(1), torch.zeros_like(a)) for _, a in rows)  # causal, as it must be
    Y = torch.cat([(a @ x).reshape(-1, x.shape[1]) for x, a in rows])  # every head's A_h X, stacked
    H, D = driver.value_hessian(layer, inps, args, kwargs)
    assert D is None
    ref = 2 / Y.shape[0] * Y.T @ Y
    torch.testing.assert_close(H.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # not GPTQ's plain Hessian of X (the test would pass if the probabilities were ignored)
    X = torch.cat([x for x, _ in rows])
    plain = 2 / X.shape[0] * X.T @ X
    assert (H.double() - plain).norm() > 0.05 * plain.norm()


def test_value_hessian_cross_term_uses_the_float_layers_own_attention(tiny):
    """The float stream here is other windows through the same layer: D = 2/N Σ_h (Ã_h X̃ − A_h X)ᵀ A_h X."""
    _, d = tiny
    model, calib = _windows(d)
    _, other = _windows(d, seed=5)
    layer, inps, args, kwargs = _layer0(model, calib)
    _, finps, _, _ = _layer0(model, other)
    Y = torch.cat([(a @ x).reshape(-1, x.shape[1]) for x, a in _eager_rows(d, calib)])
    Yf = torch.cat([(a @ x).reshape(-1, x.shape[1]) for x, a in _eager_rows(d, other)])
    H, D = driver.value_hessian(layer, inps, args, kwargs, flayer=layer, finps=finps)
    N = Y.shape[0]
    torch.testing.assert_close(H.double(), 2 / N * Y.T @ Y, rtol=1e-4, atol=1e-4 * H.abs().max().item())
    ref = 2 / N * (Yf - Y).T @ Y
    torch.testing.assert_close(D.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_value_apart_moves_v_proj_into_its_own_group_after_q_and_k():
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert driver.value_apart(groups) == [["self_attn.q_proj", "self_attn.k_proj"], ["self_attn.v_proj"],
                                          *groups[1:]]
    assert driver.value_apart([["self_attn.v_proj"], ["x"]]) == [["self_attn.v_proj"], ["x"]]


def _quantized(d, calib, **config):
    model, _ = _windows(d)
    driver.quantize_model(model, calib, driver.QuantConfig(**config), progress=False)
    return model


def _attention_error(d, calib, model):
    """Σ_h ‖A_h X Eᵀ‖² / Σ_h ‖A_h X Wᵀ‖² of layer 0's v_proj on the calibration windows
    (layer 0's inputs and, with q and k equal in both runs, its A are the float model's)."""
    W = AutoModelForCausalLM.from_pretrained(str(d / "float"), dtype=torch.float32).model.layers[0] \
        .self_attn.v_proj.weight.double()
    E = model.model.layers[0].self_attn.v_proj.dequantize().double() - W
    num = den = 0.0
    for x, a in _eager_rows(d, calib):
        y = (a @ x).reshape(-1, x.shape[1])
        num += float((y @ E.T).square().sum())
        den += float((y @ W.T).square().sum())
    return num / den


def test_driver_attention_aware_lowers_v_projs_error_as_o_proj_reads_it(tiny):
    _, d = tiny
    _, calib = _windows(d, n=4, seqlen=64)
    cfg = dict(reorder="hessian")
    plain = _quantized(d, calib, **cfg)
    aware = _quantized(d, calib, attention_aware=True, **cfg)
    a0, b0 = plain.model.layers[0].self_attn, aware.model.layers[0].self_attn
    for n in ("q_proj", "k_proj"):  # quantized first, as before
        assert torch.equal(getattr(a0, n).packed, getattr(b0, n).packed), n
    assert not torch.equal(a0.v_proj.packed, b0.v_proj.packed)
    assert _attention_error(d, calib, aware) < _attention_error(d, calib, plain)


def test_driver_attention_aware_with_the_residual_target_runs_and_is_recorded(tiny):
    _, d = tiny
    _, calib = _windows(d, n=2, seqlen=32)
    model = _quantized(d, calib, attention_aware=True, target="residual", refine=1)
    assert isinstance(model.model.layers[1].self_attn.v_proj, TernaryLinear)
    assert model.model.layers[1].self_attn.v_proj.dequantize().isfinite().all()
    assert driver.QuantConfig(attention_aware=True).to_dict()["attention_aware"] is True
    assert "attention_aware" not in driver.QuantConfig().to_dict()  # older work folders still resume
    with pytest.raises(ValueError, match="attention-aware"):
        driver.QuantConfig(method="rtn", attention_aware=True)
