"""quantize --devices (one process per device, torch.distributed; gloo on the CPU): the same
model.safetensors as one process, linears really shared out, resumable, clean failures."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tinymodels import sha256

from pt2llm import cli
from pt2llm.model import distributed

one_model = pytest.mark.parametrize("tiny", ["llama"], indirect=True)  # each run spawns processes: one is enough


def _env(**extra):
    """This process's environment with one torch thread (conftest's `one_thread` says why)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _args(d):
    return ["quantize", str(d / "float"), "--calib", str(d / "calib.txt"), "--nsamples", "4", "--seqlen", "64",
            "--no-progress"]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One process, one device, one thread: the model.safetensors every other run must
    reproduce, in a fresh process as a user runs it."""
    _, d = tiny
    out = tmp_path_factory.mktemp("ref") / "ref"
    p = subprocess.run([sys.executable, "-m", "pt2llm", *_args(d), "--device", "cpu", "--out", str(out)],
                       env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return sha256(out / "model.safetensors")


@one_model
@pytest.mark.usefixtures("one_thread")
def test_two_processes_give_the_one_process_bytes(tiny, reference, tmp_path):
    _, d = tiny
    out, report = tmp_path / "two", tmp_path / "report.json"
    assert cli.main([*_args(d), "--devices", "cpu,cpu", "--out", str(out), "--report", str(report)]) == 0
    assert sha256(out / "model.safetensors") == reference
    rep = json.loads(report.read_text())
    assert rep["devices"] == ["cpu", "cpu"]
    owners = rep["owners"]
    assert len(owners) == 14 and set(owners.values()) == {0, 1}  # both ranks quantized linears
    assert [r["linears"] for r in rep["ranks"]] == [sum(1 for v in owners.values() if v == k) for k in (0, 1)]
    # the largest of q/k/v (q: 200 rows, k/v: 100) alone on one rank, k and v on the other
    assert owners["model.layers.0.self_attn.q_proj"] != owners["model.layers.0.self_attn.k_proj"]
    assert owners["model.layers.0.self_attn.k_proj"] == owners["model.layers.0.self_attn.v_proj"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work or temporary folder left


@one_model
@pytest.mark.usefixtures("one_thread")
def test_killed_two_process_run_resumes_to_the_same_bytes(tiny, reference, tmp_path, capfd):
    _, d = tiny
    out = tmp_path / "out"
    args = [*_args(d), "--devices", "cpu,cpu", "--out", str(out)]
    # rank 0 SIGKILLs itself once layer 0 is persisted; the launcher stops rank 1 and says so.
    env = _env(PT2LLM_FAULT_AFTER_LAYER="0")
    p = subprocess.run([sys.executable, "-m", "pt2llm", *args], env=env, capture_output=True, text=True)
    assert p.returncode == 128 + signal.SIGKILL, p.stderr
    assert "rank 0 of 2 (cpu) was killed by SIGKILL" in p.stderr
    work = tmp_path / ".out.work"
    assert not out.exists()
    assert sorted(f.name for f in work.iterdir()) == ["layer-00000.safetensors", "run.json"]
    # a failure in rank 0 alone (its work folder check) stops the other rank instead of hanging it
    t = time.perf_counter()
    assert cli.main(args) == 2
    assert time.perf_counter() - t < 120
    err = capfd.readouterr().err
    assert "--resume" in err and "[rank 0 of 2 (cpu)]" in err and "Traceback" not in err
    assert cli.main([*args, "--resume"]) == 0
    assert sha256(out / "model.safetensors") == reference
    assert not work.exists()


@one_model
@pytest.mark.usefixtures("one_thread")
def test_torchrun_processes_give_the_one_process_bytes(tiny, reference, tmp_path):
    _, d = tiny
    out = tmp_path / "out"
    env = _env()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pt2llm",
                        *_args(d), "--device", "cpu", "--out", str(out)], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "on 2 devices (cpu, cpu)" in p.stderr
    assert sha256(out / "model.safetensors") == reference


@one_model
@pytest.mark.parametrize("spec, message", [
    ("tpu", "unknown device 'tpu'"),
    ("cuda:x", "unknown device 'cuda:x'"),
    ("cpu,", "expected a comma-separated list"),
    ("cpu,cuda:0", "mixes cpu and cuda"),
    ("cuda:0,cuda", "cuda:0 is listed twice"),
])
def test_bad_devices_are_refused(tiny, tmp_path, capsys, spec, message):
    _, d = tiny
    assert cli.main([*_args(d), "--devices", spec, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@one_model
def test_missing_gpus_are_refused(tiny, tmp_path, capsys, monkeypatch):
    _, d = tiny
    args = [*_args(d), "--out", str(tmp_path / "o")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([*args, "--devices", "cuda:0,cuda:1"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main([*args, "--devices", "cuda:0,cuda:1"]) == 2
    assert "this machine has 1 CUDA device (cuda:0..cuda:0), so cuda:1 does not exist" in capsys.readouterr().err
    assert cli.main([*args, "--devices", "cpu,cpu", "--device", "cpu"]) == 2
    assert "not both" in capsys.readouterr().err


def test_assignment_balances_and_is_deterministic():
    lin = {n: torch.nn.Linear(i, o) for n, (o, i) in
           {"q": (200, 200), "k": (100, 200), "v": (100, 200), "gate": (328, 200), "up": (328, 200)}.items()}
    two = distributed.Dist(0, ["cpu", "cpu"])
    assert two.assign(["q", "k", "v"], lin) == {"q": 0, "k": 1, "v": 1}
    assert two.assign(["up", "gate"], lin) == {"gate": 0, "up": 1}
    assert distributed.Dist(1, ["cpu"] * 3).assign(["q", "k", "v"], lin) == {"q": 0, "k": 1, "v": 2}


def _fail_on_rank_1(payload, dist):
    if dist.rank == 1:
        raise RuntimeError(payload)
    dist.broadcast_object("never sent", src=1)  # rank 0 waits for rank 1 in a collective
    return 0


def test_a_failing_rank_stops_the_others_and_is_reported(capfd):
    t = time.perf_counter()
    assert distributed.launch(["cpu", "cpu"], _fail_on_rank_1, "boom in rank 1") == 1
    assert time.perf_counter() - t < 120
    err = capfd.readouterr().err
    assert "rank 1 of 2 (cpu) failed" in err and "RuntimeError: boom in rank 1" in err
    assert "rank 0" not in err
