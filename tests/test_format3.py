"""Format 3: column orders and online-transform signs stored as bit streams; the saved
model behaves exactly as the one in memory, format-2 folders still load, and `inspect`
counts the bytes on disk."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import pt2llm
from pt2llm import checkpoint, commands, pack
from pt2llm.data import calibration_windows
from pt2llm.model import driver, sources
from pt2llm.nn import TernaryLinear, perm_dtype
from pt2llm.rotate import online

from tinymodels import as_format_2

WIDTHS = [1, 2, 3, 5, 8, 9, 128, 200, 576, 1536, 32767, 32768, 32769, 70000]


@pytest.mark.parametrize("n", WIDTHS)
def test_packed_perm_round_trips(n):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    w = max(1, math.ceil(math.log2(n)))
    assert pack.index_bits(n) == w and 2 ** w >= n
    b = pack.pack_perm(perm.to(perm_dtype(n)))
    assert b.dtype == torch.uint8 and b.shape == (math.ceil(n * w / 8),)
    back = pack.unpack_perm(b, n)
    assert torch.equal(back, perm)


def test_the_bit_stream_is_little_endian_and_matches_pack_bits(gen):
    # [2, 0, 1, 3] at 2 bits: 10 00 01 11 read from bit 0 up -> bits 0,1,0,0,1,0,1,1 = 210
    assert pack.pack_perm(torch.tensor([2, 0, 1, 3])).tolist() == [210]
    assert pack.index_bits(576) == 10 and pack.packed_perm_width(576) == 720
    for bits in range(1, 9):
        codes = torch.randint(0, 2 ** bits, (3, 37), generator=gen)
        assert torch.equal(pack.pack_uints(codes, bits), pack.pack_bits(codes.to(torch.uint8), bits))
        assert torch.equal(pack.unpack_uints(pack.pack_uints(codes, bits), 37, bits), codes)


def test_packed_signs_round_trip(gen):
    for n in (1, 7, 8, 9, 200, 1536):
        s = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.int8)
        b = pack.pack_signs(s)
        assert b.dtype == torch.uint8 and b.shape == (math.ceil(n / 8),)
        assert torch.equal(pack.unpack_signs(b, n), s)
    assert pack.pack_signs(torch.tensor([-1, 1, 1, -1], dtype=torch.int8)).tolist() == [0b1001]
    with pytest.raises(ValueError, match="signs"):
        pack.pack_signs(torch.tensor([1, 0, -1]))


def test_damaged_streams_are_refused():
    with pytest.raises(ValueError, match="not a permutation"):
        pack.unpack_perm(pack.pack_uints(torch.tensor([0, 1, 1, 3, 4]), 3), 5)
    with pytest.raises(ValueError, match="not a permutation"):
        pack.unpack_perm(pack.pack_uints(torch.tensor([0, 1, 2, 3, 7]), 3), 5)  # 7 fits 3 bits but not 0..4
    with pytest.raises(ValueError, match="bytes"):
        pack.unpack_perm(torch.zeros(3, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="outside"):
        pack.pack_uints(torch.tensor([4]), 2)


@pytest.mark.parametrize("n", [1, 2, 5, 576, 1536, 32768, 70000])
def test_a_linear_round_trips_through_its_stored_form(n):
    """What _unique_state writes, loaded into a format-3 shell and upgraded, is the module again."""
    g = torch.Generator().manual_seed(n)
    mod = TernaryLinear(n, 3, bias=True)
    mod.packed.copy_(pack.pack_trit_rows(torch.randint(-1, 2, (3, n), generator=g)))
    mod.alpha.copy_(torch.rand(mod.alpha.shape, generator=g))
    mod.mu.copy_(torch.randn(mod.mu.shape, generator=g))
    mod.perm.copy_(torch.randperm(n, generator=g))
    mod.bias.copy_(torch.randn(3, generator=g))
    mod.input_transform = online.OnlineHadamard(n, (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8))
    state = checkpoint._unique_state(mod)
    assert state["perm"].dtype == torch.uint8 and state["perm"].numel() == pack.packed_perm_width(n)
    assert state["input_transform.signs"].dtype == torch.uint8 and state["input_transform.signs"].numel() == -(-n // 8)
    assert mod.perm.dtype == perm_dtype(n) and mod.input_transform.signs.dtype == torch.int8  # the module is untouched
    shell = TernaryLinear(n, 3, bias=True, perm_packed=True)
    shell.input_transform = online.OnlineHadamard(n, packed=True)
    shell.load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="upgrade"):
        shell(torch.zeros(1, n))
    checkpoint.upgrade_linears(shell)
    assert shell.perm.dtype == perm_dtype(n) == (torch.int16 if n < 32768 else torch.int32)
    assert torch.equal(shell.perm, mod.perm) and torch.equal(shell.input_transform.signs, mod.input_transform.signs)
    assert torch.equal(shell.packed, mod.packed) and torch.equal(shell.alpha, mod.alpha)
    # the work folder's path: unpacked into run-time modules before load_state_dict
    fresh = TernaryLinear(n, 3, bias=True)
    fresh.input_transform = online.OnlineHadamard(n)
    fresh.load_state_dict(checkpoint._unpack_state(fresh, state), strict=True)
    assert torch.equal(fresh.perm, mod.perm) and torch.equal(fresh.input_transform.signs, mod.input_transform.signs)
    if n <= 1536:
        x = torch.randn(2, n, generator=g)
        with torch.no_grad():
            assert torch.equal(shell(x), mod(x)) and torch.equal(fresh(x), mod(x))
    assert mod.storage_bytes() == mod.packed.numel() + 4 * mod.alpha.numel() + pack.packed_perm_width(n)


def _logits(model, vocab):
    x = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """A rotated PT² model quantized in memory and saved (format 3), with its in-memory logits."""
    _, d = tiny
    model, tok, _ = sources.load_float(str(d / "float"))
    calib = calibration_windows(str(d / "calib.txt"), tok, 4, 64, 0)
    cfg = driver.QuantConfig(rotate="hadamard")
    mods = driver.quantize_model(model, calib, cfg, progress=False)
    out = tmp_path_factory.mktemp("fmt3") / "q"
    checkpoint.save(model, tok, out, {**cfg.to_dict(), "modules": mods})
    return model, out, _logits(model, model.config.vocab_size)


def test_a_saved_model_reloads_with_identical_outputs(saved):
    model, out, ref = saved
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == checkpoint.FORMAT_VERSION == 3
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        head = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    mem = dict(model.named_modules())
    assert any(not torch.equal(mem[name].perm.long(), torch.arange(mem[name].in_features)) for name in qc["modules"])
    for name in qc["modules"]:
        n = mem[name].in_features
        assert head[f"{name}.perm"] == ("U8", [pack.packed_perm_width(n)])
    online_names = json.loads((out / "config.json").read_text())["pt2llm_rotation"]["online"]
    assert online_names and all(head[f"{n}.input_transform.signs"] == ("U8", [-(-mem[n].in_features // 8)])
                                for n in online_names)
    for loaded in (pt2llm.load(out)[0], AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)):
        got = dict(loaded.named_modules())
        for name in qc["modules"]:
            assert got[name].perm.dtype == mem[name].perm.dtype and torch.equal(got[name].perm, mem[name].perm)
        for name in online_names:
            assert torch.equal(got[name].input_transform.signs, mem[name].input_transform.signs)
            assert got[name].input_transform.signs.dtype == torch.int8
        torch.testing.assert_close(_logits(loaded, model.config.vocab_size), ref, rtol=0, atol=0)


def test_format_2_folders_still_load(saved, tmp_path):
    model, out, ref = saved
    old = as_format_2(out, tmp_path / "v2")
    with safe_open(str(old / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.perm").get_dtype() == "I16"
        assert f.get_slice("model.layers.0.mlp.down_proj.input_transform.signs").get_dtype() == "I8"
    for loaded in (pt2llm.load(old)[0], AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)):
        torch.testing.assert_close(_logits(loaded, model.config.vocab_size), ref, rtol=0, atol=0)
    # inspect counts what format 2 stored: 2 bytes an index, a byte a sign
    rep3, rep2 = commands.inspect_dir(out), commands.inspect_dir(old)
    mem = dict(model.named_modules())
    extra = sum(2 * mem[r["module"]].in_features - pack.packed_perm_width(mem[r["module"]].in_features)
                for r in rep3["modules"])
    extra += sum(mem[n].in_features - -(-mem[n].in_features // 8) for n in rep3["rotation"]["online"])
    assert rep2["quantized_bytes"] - rep3["quantized_bytes"] == extra > 0
    assert [(r["out"], r["in"]) for r in rep2["modules"]] == [(r["out"], r["in"]) for r in rep3["modules"]]


def _hand_count(model, names, online_names, bits=None):
    total, weights = 0, 0
    for name in names:
        m = dict(model.named_modules())[name]
        o, i = m.out_features, m.in_features
        codes = -(-o // 5) * i if bits is None else o * -(-i * bits // 8)
        alpha_mu = 2 * 2 * o * -(-i // 128)
        perm = -(-i * max(1, math.ceil(math.log2(i))) // 8)
        signs = -(-i // 8) if name in online_names else 0
        total += codes + alpha_mu + perm + signs
        weights += o * i
    return total, weights


def test_inspect_counts_the_bytes_on_disk(saved):
    model, out, _ = saved
    rep = commands.inspect_dir(out)
    online_names = rep["rotation"]["online"]
    nbytes, weights = _hand_count(model, [r["module"] for r in rep["modules"]], online_names)
    assert rep["quantized_bytes"] == nbytes and rep["quantized_weights"] == weights
    assert rep["bits_per_weight"] == pytest.approx(8 * nbytes / weights, rel=1e-12)
    mem = dict(model.named_modules())
    assert all((r["out"], r["in"]) == (mem[r["module"]].out_features, mem[r["module"]].in_features)
               for r in rep["modules"])


def test_inspect_finds_the_width_of_uint_k_layers(tiny, tmp_path):
    _, d = tiny
    model, tok, _ = sources.load_float(str(d / "float"))
    calib = calibration_windows(str(d / "calib.txt"), tok, 4, 64, 0)
    cfg = driver.QuantConfig(method="gptq", bits=3)
    mods = driver.quantize_model(model, calib, cfg, progress=False)
    checkpoint.save(model, tok, tmp_path / "g", {**cfg.to_dict(), "modules": mods})
    rep = commands.inspect_dir(tmp_path / "g")
    nbytes, weights = _hand_count(model, mods, [], bits=3)
    assert rep["quantized_bytes"] == nbytes and rep["quantized_weights"] == weights
    torch.testing.assert_close(_logits(pt2llm.load(tmp_path / "g")[0], len(tok)), _logits(model, len(tok)),
                               rtol=0, atol=0)


def test_a_work_folder_of_another_format_is_not_resumed(tmp_path):
    manifest = {"model": "m", "config": {}}
    work = checkpoint.WorkDir(tmp_path / "out", manifest, resume=False)
    run = work.path / "run.json"
    assert json.loads(run.read_text())["format_version"] == checkpoint.FORMAT_VERSION
    checkpoint.WorkDir(tmp_path / "out", manifest, resume=True)  # the same run resumes
    old = json.loads(run.read_text())
    old["format_version"] = 2
    run.write_text(json.dumps(old))
    with pytest.raises(checkpoint.CheckpointError, match="format version"):
        checkpoint.WorkDir(tmp_path / "out", manifest, resume=True)
