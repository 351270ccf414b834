"""Quantization spread over several devices, one process per device (torch.distributed).

Exact by construction, not by careful summation: every rank runs the whole single-device
computation except the quantization math of the linears it does not own.

- Every rank loads the model and runs all the calibration forward passes on its own
  device (the windows go through a layer one at a time, so on devices of one type each
  rank computes the same activations and Hessians, bit for bit, as a one-device run).
  Nothing is reduced across ranks, so there is no summation order to fix.
- Within a sub-layer group (the linears sharing one Hessian: q/k/v, o, gate/up, down) the
  linears are dealt out to ranks (`assign`: largest rows x cols^2 first, to the least
  loaded rank). Each rank runs `ternary.quantize_weight` on its own linears, the very call
  of the one-device path, and every result is then broadcast from its owner as raw bytes
  (`share`), so every rank holds every QuantResult and carries on as one device would.
- Rank 0 alone writes (work folder, output folder, report) and shows progress.

`launch` spawns one process per device and supervises them: when one fails, the others
are stopped and the failing rank's message is printed once. Under torchrun the same code
runs in torchrun's processes (`torchrun_env`). The process group has a timeout
(PT2LLM_DIST_TIMEOUT seconds, default 1800) so a lost peer cannot hang a rank for ever.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .. import checkpoint, ternary

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800


class PeerError(RuntimeError):
    """A collective operation failed: most likely another rank failed first."""


# --------------------------------------------------------------------------- devices

def parse_devices(spec: str) -> list[str]:
    """'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1']; 'cpu,cpu' -> ['cpu', 'cpu'] (gloo, for tests).
    Raises ValueError naming the problem."""
    items = [s.strip() for s in str(spec).split(",")]
    if not any(items) or not all(items):
        raise ValueError(f"--devices {spec!r}: expected a comma-separated list of devices such as "
                         f"cuda:0,cuda:1 (or cpu,cpu)")
    out = []
    for s in items:
        m = re.fullmatch(r"cpu|cuda(?::(\d+))?", s)
        if m is None:
            raise ValueError(f"--devices {spec}: unknown device {s!r}; expected cpu, cuda or cuda:N")
        out.append("cpu" if s == "cpu" else f"cuda:{int(m.group(1) or 0)}")
    if len({d.split(":")[0] for d in out}) > 1:
        raise ValueError(f"--devices {spec}: mixes cpu and cuda devices; give only cuda:N devices "
                         f"(or only cpu, for testing)")
    if out[0].startswith("cuda"):
        seen = set()
        for d in out:
            if d in seen:
                raise ValueError(f"--devices {spec}: {d} is listed twice (one process per GPU)")
            seen.add(d)
        if not torch.cuda.is_available():
            raise ValueError(f"--devices {spec}: CUDA is not available on this machine")
        n = torch.cuda.device_count()
        for d in out:
            if int(d.split(":")[1]) >= n:
                raise ValueError(f"--devices {spec}: this machine has {n} CUDA device{'s' * (n != 1)} "
                                 f"(cuda:0..cuda:{n - 1}), so {d} does not exist")
    return out


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world: int
    local_rank: int
    local_world: int


def torchrun_env() -> TorchrunEnv | None:
    """The process's place in a torchrun (or any env:// launcher) job, or None."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    return TorchrunEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", env["RANK"])),
                       int(env.get("LOCAL_WORLD_SIZE", world)))


def torchrun_device(env: TorchrunEnv, devices: list[str] | None, device: str | None) -> str:
    """This torchrun process's device: devices[LOCAL_RANK], or cuda:LOCAL_RANK (cpu with
    --device cpu or without CUDA)."""
    if devices is not None:
        if len(devices) != env.local_world:
            raise ValueError(f"--devices lists {len(devices)} devices but torchrun started "
                             f"{env.local_world} processes on this host; give one device per process")
        return devices[env.local_rank]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device != "cuda":
        raise ValueError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; "
                         f"give --device cuda, --device cpu or --devices")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if env.local_rank >= torch.cuda.device_count():
        raise ValueError(f"torchrun started {env.local_world} processes on this host but it has "
                         f"{torch.cuda.device_count()} CUDA devices")
    return f"cuda:{env.local_rank}"


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("PT2LLM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


# --------------------------------------------------------------------------- the process group

class Dist:
    """This process's rank in the group, and the operations the driver needs."""

    def __init__(self, rank: int, devices: list[str]):
        self.rank, self.devices = rank, list(devices)
        self.world = len(devices)
        self.device = devices[rank]
        self.backend = backend_for(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError, gloo "connection closed", NCCL errors, timeouts
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PeerError(f"a collective operation with the other ranks failed ({first}); "
                            f"another rank probably failed first") from e

    def _obj_device(self):
        return torch.device(self.device) if self.backend == "nccl" else None

    def broadcast_object(self, obj=None, src: int = 0):
        """obj from rank src, on every rank (pickled; small objects, CPU tensors)."""
        box = [obj if self.rank == src else None]
        self._collective(tdist.broadcast_object_list, box, src=src, device=self._obj_device())
        return box[0]

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world
        self._collective(tdist.all_gather_object, out, obj)
        return out

    def broadcast_tensor(self, t: torch.Tensor, src: int) -> None:
        """Broadcast t in place (on this rank's device) as raw bytes: exact for every dtype,
        including those a backend has no type for (int16 on NCCL, say)."""
        flat = t.reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else flat
        if raw.numel():
            self._collective(tdist.broadcast, raw, src=src)

    def assign(self, names: list[str], linears: dict) -> dict[str, int]:
        """Owner rank of each linear of a group: the costliest first (rows x cols^2, the
        GPTQ loop's order of growth), each to the least loaded rank; ties by name, then rank.
        Every rank computes the same table."""
        load = [0] * self.world
        owners = {}
        for n in sorted(names, key=lambda n: (-_cost(linears[n]), n)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owners[n] = r
            load[r] += _cost(linears[n])
        return owners

    def share(self, names: list[str], owners: dict[str, int], mine: dict) -> dict:
        """Every linear's QuantResult on every rank, in `names` order: each owner broadcasts
        its results (metadata, then each tensor's bytes) onto the others' devices."""
        out = {}
        for n in names:
            src = owners[n]
            r = mine.get(n) if src == self.rank else None
            fields = ("codes", "scale", "offset", "perm")
            meta = None if r is None else {
                "tensors": [(getattr(r, f).dtype, tuple(getattr(r, f).shape)) for f in fields],
                "block_size": r.block_size, "damp": r.damp, "recomputed": r.recomputed}
            meta = self.broadcast_object(meta, src=src)
            if src == self.rank:
                tensors = [getattr(r, f).contiguous() for f in fields]
            else:
                tensors = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in meta["tensors"]]
            for t in tensors:
                self.broadcast_tensor(t, src)
            out[n] = r if src == self.rank else ternary.QuantResult(
                *tensors, block_size=meta["block_size"], damp=meta["damp"], recomputed=meta["recomputed"])
        return out


def _cost(lin) -> int:
    return lin.out_features * lin.in_features ** 2


def _join(device: str, init_method: str, rank: int, world: int) -> None:
    """init_process_group for this rank on `device` (NCCL bound to its GPU, gloo on cpu)."""
    kw = {}
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        kw["device_id"] = torch.device(device)
    tdist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world,
                             timeout=_timeout(), **kw)


@contextlib.contextmanager
def process_group(rank: int, devices: list[str], init_method: str):
    """Join the group (rank of len(devices)); yields a Dist. The group is destroyed on a
    clean exit only: after a failure a peer may never answer, and the process is ending."""
    _join(devices[rank], init_method, rank, len(devices))
    yield Dist(rank, devices)
    tdist.destroy_process_group()


@contextlib.contextmanager
def torchrun_group(env: TorchrunEnv, device: str):
    """Join a torchrun job's group (env://); every rank's device is gathered so all know the
    full device list, and cpu/cuda mixes are refused."""
    _join(device, "env://", env.rank, env.world)
    d = Dist(env.rank, [device] * env.world)
    devices = d.all_gather_object(device)
    if len({x.split(":")[0] for x in devices}) > 1:
        raise ValueError(f"the torchrun processes mix cpu and cuda devices: {devices}")
    d = Dist(env.rank, devices)
    yield d
    tdist.destroy_process_group()


def quiet_unless_main(rank: int) -> None:
    """Ranks other than 0 print nothing but their errors (rank 0 logs for all)."""
    if rank == 0:
        return
    logging.getLogger("pt2llm").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class WorkReader(checkpoint.WorkDir):
    """A rank > 0's view of rank 0's work folder (the same file system): it reads the
    finished layers that rank 0 announces and writes nothing."""

    def __init__(self, out):
        self.path = checkpoint.work_path(out)
        self.manifest = None

    def save_layer(self, i, layer):
        raise RuntimeError("only rank 0 writes the work folder")

    def remove(self) -> None:
        pass


# --------------------------------------------------------------------------- launching

_terminated = False


def _on_sigterm(signum, frame):
    global _terminated
    _terminated = True
    raise SystemExit(128 + signum)  # unwinds through finally blocks (temporary folders)


def _child(rank, devices, init_method, target, payload, conn, threads, is_user_error):
    """One rank, in its own process: join the group, run target(payload, dist), and send
    the supervisor a report of how it ended before exiting with the matching status."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    if threads:  # float math on the CPU (the cpu device; embeddings rotated for --rotate hadamard)
        torch.set_num_threads(threads)  # can depend on the thread count: the parent's, as one process
    if sys.platform.startswith("linux") and backend_for(devices[rank]) == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks on this host: whatever the hostname resolves to
    quiet_unless_main(rank)
    report = {"rank": rank, "kind": "ok", "code": 0, "text": "", "trace": ""}
    try:
        with process_group(rank, devices, init_method) as d:
            report["code"] = int(target(payload, d) or 0)
    except KeyboardInterrupt:
        report.update(kind="interrupt", code=130)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        report.update(kind="terminated" if _terminated else "exit", code=code)
    except BaseException as e:  # noqa: BLE001 (reported to the supervisor, which prints it)
        kind = ("terminated" if _terminated else "peer" if isinstance(e, PeerError)
                else "user" if is_user_error(e) else "bug")
        report.update(kind=kind, code=2 if kind == "user" else 1, text=str(e), trace=traceback.format_exc())
    report["time"] = time.monotonic()
    try:
        conn.send(report)
        conn.close()
    except OSError:
        pass
    sys.exit(report["code"])


def _no_user_errors(e: BaseException) -> bool:
    return False


def launch(devices: list[str], target, payload, *, is_user_error=_no_user_errors, debug: bool = False,
           threads: int | None = None) -> int:
    """Run target(payload, dist) in one spawned process per device and return the exit
    status: 0 when every rank succeeded; otherwise the first failing rank's, with its
    message printed once on stderr (the other ranks are stopped). target, payload and
    is_user_error must pickle (module-level functions). threads: torch threads per rank
    (default this process's: CPU results can depend on it)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="pt2llm-dist-")
    init_method = "file://" + os.path.join(tmp, "rendezvous")
    threads = threads or torch.get_num_threads()
    procs, conns = [], []
    try:
        for rank in range(len(devices)):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, name=f"pt2llm-rank{rank}",
                            args=(rank, devices, init_method, target, payload, w, threads, is_user_error))
            p.start()
            w.close()
            procs.append(p)
            conns.append(r)
        return _supervise(procs, conns, devices, debug)
    finally:
        _stop([p for p in procs if p.is_alive()])
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(procs, grace: float = 5.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _supervise(procs, conns, devices, debug: bool) -> int:
    from multiprocessing.connection import wait

    reports: dict[int, dict] = {}

    def drain(r):
        try:
            while conns[r].poll():
                reports[r] = conns[r].recv()
        except (EOFError, OSError):
            pass

    alive = set(range(len(procs)))
    failed = False
    try:
        while alive and not failed:
            for s in wait([procs[r].sentinel for r in alive]):
                r = next(r for r in alive if procs[r].sentinel == s)
                procs[r].join()
                alive.discard(r)
                drain(r)
                failed |= procs[r].exitcode != 0
    except KeyboardInterrupt:
        # a Ctrl-C reaches every rank (same process group); rank 0 says how to resume. A
        # SIGINT sent to this process alone is passed on.
        deadline = time.monotonic() + 2
        for r in sorted(alive):
            procs[r].join(max(0.0, deadline - time.monotonic()))
        for r in sorted(alive):
            if procs[r].is_alive():
                os.kill(procs[r].pid, signal.SIGINT)
        deadline = time.monotonic() + 15
        for r in sorted(alive):
            procs[r].join(max(0.0, deadline - time.monotonic()))
    stopped = {r for r in alive if procs[r].is_alive()}
    _stop([procs[r] for r in stopped])
    for r in range(len(procs)):
        drain(r)
    return _verdict(procs, reports, devices, stopped, debug)


def _verdict(procs, reports, devices, stopped, debug: bool) -> int:
    """Pick the failure that caused the others and print it; return the exit status."""
    n = len(procs)
    if all(p.exitcode == 0 for p in procs):
        return 0

    def who(r):
        return f"rank {r} of {n} ({devices[r]})"

    real = [rep for rep in reports.values() if rep["kind"] in ("user", "bug", "exit", "interrupt") and rep["code"]]
    if real:
        rep = min(real, key=lambda x: (x["time"], x["rank"]))
        r, kind = rep["rank"], rep["kind"]
        if rep["code"] == 130:  # interrupted; rank 0 says how to resume when it got the interrupt too
            r0 = reports.get(0, {})
            if not (r0.get("kind") == "exit" and r0.get("code") == 130):
                print("pt2llm: interrupted", file=sys.stderr)
            return 130
        if kind == "user":
            print(rep["trace"] if debug else f"pt2llm: error: {rep['text']} [{who(r)}]", file=sys.stderr)
        elif kind == "bug":
            print(f"pt2llm: {who(r)} failed:\n{rep['trace']}", file=sys.stderr, end="")
        else:
            print(f"pt2llm: {who(r)} exited with status {rep['code']}", file=sys.stderr)
        return rep["code"]
    for r, p in enumerate(procs):  # died without a word: killed by a signal, or crashed
        if r not in reports and r not in stopped and p.exitcode not in (0, None):
            if p.exitcode < 0:
                sig = signal.Signals(-p.exitcode).name
                print(f"pt2llm: error: {who(r)} was killed by {sig}"
                      + (" (out of memory?)" if sig == "SIGKILL" else ""), file=sys.stderr)
                return 128 - p.exitcode
            print(f"pt2llm: error: {who(r)} exited with status {p.exitcode}", file=sys.stderr)
            return p.exitcode
    peers = [rep for rep in reports.values() if rep["kind"] == "peer"]
    if peers:
        rep = min(peers, key=lambda x: (x["time"], x["rank"]))
        print(rep["trace"] if debug else f"pt2llm: error: {rep['text']} [{who(rep['rank'])}]", file=sys.stderr)
        return 1
    r = next(r for r, p in enumerate(procs) if p.exitcode != 0)
    print(f"pt2llm: error: {who(r)} ended with status {procs[r].exitcode}", file=sys.stderr)
    return 1
