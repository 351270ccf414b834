"""A run killed (SIGKILL) after its first layer resumes to a byte-identical result."""
import os
import signal
import subprocess
import sys

import pytest

from tinymodels import quantize_killed_after_first_layer, sha256

from pt2llm import cli


@pytest.mark.usefixtures("one_thread")
def test_killed_run_resumes_to_a_byte_identical_model(tiny, tmp_path, capsys):
    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4",
            "--seqlen", "64", "--device", "cpu", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    quantize_killed_after_first_layer(args, out)
    work = tmp_path / ".out.work"
    assert not out.exists()
    assert sorted(f.name for f in work.iterdir()) == ["layer-00000.safetensors", "run.json"]
    # the same command without --resume refuses to throw the finished layer away
    assert cli.main([*args, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # other settings cannot resume this run
    assert cli.main([*args, "--out", str(out), "--resume", "--seed", "7"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert sha256(out / "model.safetensors") == sha256(tmp_path / "ref" / "model.safetensors")
    assert not work.exists()


def test_ctrl_c_exits_cleanly_saying_how_to_resume(tiny, tmp_path):
    _, d = tiny
    args = ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4",
            "--seqlen", "64", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")]
    env = {**os.environ, "PT2LLM_FAULT_AFTER_LAYER": "0:SIGINT"}
    # a job started in the background by a non-interactive shell (CI) inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: give the child the default back
    p = subprocess.run([sys.executable, "-m", "pt2llm", *args], env=env, capture_output=True, text=True,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and "--resume" in p.stderr and "1 finished layers" in p.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.work" / "layer-00000.safetensors").is_file()
