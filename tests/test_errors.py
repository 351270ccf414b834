"""Bad input: one clear line on stderr, exit status 2, nothing left behind, nothing run
from a quantized folder."""
import errno
import json
import os
import pickle

import pytest
import torch
from torch import nn

import pt2llm
from pt2llm import checkpoint, cli
from pt2llm.model import driver

from tinymodels import quantize as _quantize


def _fails(capsys, args, *needles):
    assert cli.main(args) == 2, args
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("pt2llm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def qdir(tiny):
    _, d = tiny
    out = d / "errors-q"
    if not out.exists():
        _quantize(d, out)
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_usage_errors_are_one_line(capsys, tmp_path):
    for args, needle in [(["quantize", "m", "--out", "o", "--block-size", "0"], "--block-size"),
                         (["quantize", "m", "--out", "o", "--nsamples", "-3"], "--nsamples"),
                         (["quantize", "m", "--out", "o", "--reorder", "sideways"], "--reorder"),
                         (["frobnicate"], "invalid choice")]:
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("pt2llm: error:") and needle in err, err


def test_model_not_found_and_not_a_causal_lm(capsys, tmp_path):
    _fails(capsys, ["quantize", str(tmp_path / "absent"), "--out", str(tmp_path / "o")], "does not exist")
    _fails(capsys, ["quantize", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "o")], "does not exist")
    from transformers import ViTConfig, ViTModel
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
    _fails(capsys, ["quantize", str(tmp_path / "vit"), "--out", str(tmp_path / "o")], "causal LM")
    assert not (tmp_path / "o").exists()


def test_no_decoder_layers_names_the_top_level_tree():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10)
    with pytest.raises(driver.DriverError) as e:
        driver.find_decoder_layers(Flat())
    assert "embed (Embedding)" in str(e.value) and "head (Linear)" in str(e.value)


def test_truncated_and_foreign_gguf(capsys, tmp_path):
    import gguf
    bad = tmp_path / "trunc.gguf"
    w = gguf.GGUFWriter(str(tmp_path / "full.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.randn(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    bad.write_bytes((tmp_path / "full.gguf").read_bytes()[:40])
    _fails(capsys, ["quantize", str(bad), "--out", str(tmp_path / "o")], "cannot load GGUF", str(bad))
    w = gguf.GGUFWriter(str(tmp_path / "foreign.gguf"), "frobnet")
    w.add_tensor("x.weight", torch.randn(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fails(capsys, ["quantize", str(tmp_path / "foreign.gguf"), "--out", str(tmp_path / "o")], "cannot load GGUF")
    assert not (tmp_path / "o").exists()


def test_truncated_safetensors(qdir, tmp_path, capsys):
    d = _copy(qdir, tmp_path / "t")
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        pt2llm.load(d)
    _fails(capsys, ["eval", str(d), "--ppl", "wikitext2", "--device", "cpu"], "cannot be read")


def test_flipped_byte_names_the_tensor(qdir, tmp_path):
    d = _copy(qdir, tmp_path / "f")
    st = d / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-5] ^= 0x40  # inside the last tensor's data
    st.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="does not match its recorded sha256") as e:
        pt2llm.load(d)
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    assert repr(last) in str(e.value)


def test_tensors_that_do_not_match_the_config(qdir, tmp_path):
    d = _copy(qdir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] + 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="shape") as e:
        pt2llm.load(d)
    assert "mlp" in str(e.value)


def test_newer_format_version_says_which_is_needed(qdir, tmp_path):
    d = _copy(qdir, tmp_path / "v")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = checkpoint.FORMAT_VERSION + 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match=f"version {checkpoint.FORMAT_VERSION + 1}.*upgrade"):
        pt2llm.load(d)


def test_out_exists_is_a_file_or_unwritable(tiny, capsys, tmp_path):
    _, d = tiny
    base = ["--calib", str(d / "calib.txt"), "--nsamples", "2", "--seqlen", "32", "--no-progress"]
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    _fails(capsys, ["quantize", str(d / "float"), "--out", str(tmp_path / "exists"), *base], "already exists")
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    _fails(capsys, ["quantize", str(d / "float"), "--out", str(tmp_path / "afile" / "sub"), *base], "not a writable folder")


def test_disk_full_during_save_leaves_nothing(tiny, capsys, tmp_path, monkeypatch):
    _, d = tiny
    real = checkpoint.write_safetensors

    def full(path, *a, **k):
        real(path, *a, **k)
        if os.path.basename(path) != "model.safetensors":  # the work folder's layers are written fine
            return
        with open(path, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", full)
    out = tmp_path / "full"
    _fails(capsys, ["quantize", str(d / "float"), "--out", str(out), "--calib", str(d / "calib.txt"),
                    "--nsamples", "2", "--seqlen", "32", "--no-progress"], "No space left")
    # no output and no half-written folder; the finished layers stay for --resume
    assert sorted(os.listdir(tmp_path)) == [".full.work"]
    assert sorted(p.name for p in (tmp_path / ".full.work").iterdir()) == [
        "layer-00000.safetensors", "layer-00001.safetensors", "run.json"]


def test_bad_calibration_text(tiny, capsys, tmp_path, monkeypatch):
    _, d = tiny
    base = ["quantize", str(d / "float"), "--out", str(tmp_path / "o"), "--seqlen", "32", "--no-progress"]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"abc\0def" * 100)
    _fails(capsys, [*base, "--calib", str(tmp_path / "empty.txt")], "empty")
    _fails(capsys, [*base, "--calib", str(tmp_path / "bin.txt")], "binary")
    _fails(capsys, [*base, "--calib", str(d / "calib.txt"), "--nsamples", "100000"], "tokens", "100000 x 32")
    monkeypatch.setenv("PT2LLM_DATA_DIR", str(tmp_path / "nodata"))
    _fails(capsys, [*base, "--calib", "c4"], "PT2LLM_DATA_DIR", "hub")
    _fails(capsys, [*base, "--calib", "wikitext2"], "wiki.train.raw")
    assert not (tmp_path / "o").exists()


def test_non_finite_weights_are_refused_naming_the_layer(tiny, capsys, tmp_path):
    _, d = tiny
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d / "float")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    m.save_pretrained(tmp_path / "nan")
    import shutil
    for f in (d / "float").glob("tokenizer*"):
        shutil.copy(f, tmp_path / "nan")
    _fails(capsys, ["quantize", str(tmp_path / "nan"), "--out", str(tmp_path / "o"), "--calib",
                    str(d / "calib.txt"), "--nsamples", "2", "--seqlen", "32", "--no-progress"],
           "model.layers.1.mlp.up_proj")


class _Bomb:
    """Unpickling this writes a marker file: the proof that pickle was run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_runs_code_from_the_folder(qdir, tmp_path):
    d = _copy(qdir, tmp_path / "s")
    pickle_marker, code_marker = tmp_path / "pickle-ran", tmp_path / "code-ran"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Bomb(str(pickle_marker))}, f)
    (d / "evil.py").write_text(f"open({str(code_marker)!r}, 'w').close()\nclass Evil: pass\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"}
    (d / "config.json").write_text(json.dumps(cfg))
    model, _ = pt2llm.load(d)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 100, (1, 5))).logits).all()
    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(d)
    except Exception:  # refusing custom code without trust_remote_code is fine; running it is not
        pass
    assert not pickle_marker.exists() and not code_marker.exists()
