"""The CUDA mma kernel (pt2llm/kernels/cuda_ternary.py).

Everywhere: its digit arithmetic, emulated in integers, against pack's lookup table; and, where
NVRTC is installed (CI installs it: `nvidia-cuda-nvrtc-cu12`), its source compiled for sm_80
and sm_90 without register spills. On CUDA: against the reference path, and the dispatch."""
import ctypes
import glob
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from pt2llm import pack  # noqa: E402
from pt2llm.kernels import cuda_ternary as ct  # noqa: E402
from pt2llm.kernels import dependent  # noqa: E402
from pt2llm.kernels import triton_ternary as tt  # noqa: E402
from tinymodels import random_ternary  # noqa: E402


def byte_perm(x: int, y: int, s: int) -> int:
    """PTX prmt (CUDA __byte_perm), default mode: result byte i is byte (s >> 4 i) & 7 of the
    eight bytes y:x (x the low four)."""
    src = x | (y << 32)
    return sum(((src >> 8 * ((s >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))


def half_bits(h: int) -> float:
    """The value of the fp16 number with bit pattern h."""
    return float(np.array([h], dtype=np.uint16).view(np.float16)[0])


def test_byte_perm_emulation_follows_the_ptx_selector():
    assert byte_perm(0x44332211, 0x88776655, 0x3210) == 0x44332211
    assert byte_perm(0x44332211, 0x88776655, 0x7654) == 0x88776655
    assert byte_perm(0x00002211, 0, 0x4140) == 0x00220011  # the kernel's byte pair -> halves


def test_every_byte_pair_decodes_to_its_digits_through_the_kernels_arithmetic():
    """The kernel's decode (the digit-decoding comment in cuda_ternary._SRC), step by step in
    integers: both halves of the pair, for every byte value, give A_i whose fp16 subnormal value
    times 2^24 is A_i, and the digits come back as A_i - 3 A_(i-1) (A restarted before digit 3)."""
    src = ct.source()  # the constants emulated here are the kernel's
    assert "__byte_perm(cur[s], 0, 0x4140)" in src and "__byte_perm(zA0, 0, 0x4341)" in src
    assert "if (i == 3)" in src and "&= 0x00FF00FFu" in src and "*= 3u" in src
    lut = pack._ROWS_LUT.long() + 1  # d = code + 1, [256, 5]
    for q0 in range(256):
        q1 = 255 - q0
        word = q0 | (q1 << 8) | (0xAB << 16) | (0xCD << 24)  # the other two bytes must not leak in
        z = byte_perm(word, 0, 0x4140)
        a_prev = [0, 0]
        for i in range(5):
            if i == 3:
                z &= 0x00FF00FF
                a_prev = [0, 0]
            z = (z * 3) & 0xFFFFFFFF
            a = byte_perm(z, 0, 0x4341)
            for half, q in ((0, q0), (1, q1)):
                bits = (a >> 16 * half) & 0xFFFF
                A = half_bits(bits) * 2.0 ** 24
                assert A == bits  # an exact subnormal: the value is the integer A 2^-24
                assert A - 3 * a_prev[half] == lut[q, i], (q, i)
                a_prev[half] = A


def test_python_sizes_the_shared_memory_the_kernel_lays_out():
    """matmul computes the dynamic shared memory from RS and 80 rows a warp: the kernel's."""
    src = ct.source()
    assert f"#define RS {ct.RS} " in src and "#define ROWS (WARPS * 80)" in src
    assert "u32* am = smem + XR * per_split * RS;" in src


def _nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel or a CUDA install, else None."""
    roots = []
    try:
        import nvidia.cuda_nvrtc as nv  # noqa: F401  (the pip wheel)
        roots += [str(Path(p) / "lib") for p in nv.__path__]
    except ImportError:
        pass
    roots += [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "lib64")]
    for root in roots:
        for lib in sorted(glob.glob(os.path.join(root, "libnvrtc.so*"))):
            if "builtins" not in lib and "alt" not in lib:
                return ctypes.CDLL(lib)
    return None


def _cuobjdump():
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool if tool.exists() else None


def _compile(lib, name: str, arch: str, options: list[str]) -> bytes:
    """The cubin NVRTC makes of the kernel source for `name` (asserting it compiles)."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), ct.source().encode(), b"k.cu", 0, None, None) == 0
    assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
    opts = [f"--gpu-architecture=sm_{arch}".encode()] + [o.encode() for o in options]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    assert lib.nvrtcGetCUBIN(prog, cubin) == 0
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


@pytest.mark.parametrize("arch", ["80", "90"])
def test_source_compiles_without_register_spills(arch, tmp_path):
    """Every variant the package launches compiles; none spills registers (a spill costs more
    than it saves), except the M > 8 variant at 8 warps, which the defaults never build."""
    lib = _nvrtc()
    if lib is None:
        pytest.skip("no NVRTC here (pip install nvidia-cuda-nvrtc-cu12)")
    tool = _cuobjdump()
    settings = {(s["warps"], s["minb"]) for s in (ct.TUNING["small"], ct.TUNING["large"])}
    for warps, minb in sorted(settings):
        for nt, m1 in ((1, True), (1, False), (2, False)):
            cubin = _compile(lib, f"ternary_mma<{nt}, {'true' if m1 else 'false'}>", arch, ct.options(warps, minb))
            if arch == "90":  # the cluster fix-up (sm_90 only) compiles too, and so do dependent launches'
                _compile(lib, f"ternary_mma<{nt}, {'true' if m1 else 'false'}>", arch,
                         ct.options(warps, minb, 16))
                _compile(lib, f"ternary_mma<{nt}, {'true' if m1 else 'false'}>", arch,
                         ct.options(warps, minb, 16, dependent=True))
            if tool is None or (nt == 2 and warps == 8):
                continue
            f = tmp_path / "k.cubin"
            f.write_bytes(cubin)
            usage = subprocess.run([str(tool), "-res-usage", str(f)], capture_output=True, text=True).stdout
            lines = [ln for ln in usage.splitlines() if "REG:" in ln]
            assert len(lines) == 2  # the instantiated ternary_mma and dequant_original
            for line in lines:
                assert "STACK:0 " in line and "LOCAL:0 " in line, (nt, m1, warps, minb, line)


def test_tuned_m1_settings_compile_without_spills(tmp_path):
    """The shipped table's M = 1 settings (more CTAs an SM, so fewer registers: 80-89) still
    fit the M = 1 variant without spills. (Its M = 2-16 entries may spill: they measured
    faster all the same, docs/results/cuda-tuning.json.)"""
    lib, tool = _nvrtc(), _cuobjdump()
    if lib is None or tool is None:
        pytest.skip("no NVRTC or cuobjdump here")
    settings = {(s["warps"], s["minb"]) for gpu in ct.tuned_table().values() for s in gpu.get("1", {}).values()}
    assert settings, "the table has M = 1 entries"
    for warps, minb in sorted(settings):
        f = tmp_path / "k.cubin"
        f.write_bytes(_compile(lib, "ternary_mma<1, true>", "90", ct.options(warps, minb, 16)))
        usage = subprocess.run([str(tool), "-res-usage", str(f)], capture_output=True, text=True).stdout
        line = [ln for ln in usage.splitlines() if "REG:" in ln][0]
        assert "STACK:0 " in line and "LOCAL:0 " in line, (warps, minb, line)


def test_the_shipped_tuned_table_is_well_formed():
    """Every entry of pt2llm/kernels/cuda_tuned.json names a shape as shape_key writes it, a row
    bucket rows_key gives, and settings _plan can launch."""
    table = ct.tuned_table()
    assert table, "the package ships the H100's table"
    for gpu, buckets in table.items():
        assert set(buckets) <= {"1", "8", "16"}, gpu
        for bucket, shapes in buckets.items():
            assert ct.rows_key(int(bucket)) == bucket
            for key, s in shapes.items():
                outs, k = key.split("x")
                assert ct.shape_key([int(n) for n in outs.split("+")], int(k)) == key
                assert set(s) == {"warps", "minb", "minb2", "slots", "max_cluster"}, (key, s)
                assert s["warps"] in (4, 8) and 2 <= s["max_cluster"] <= 16, (key, s)
                assert 1 <= s["minb"] <= 8 and 1 <= s["minb2"] <= 8, (key, s)
                assert s["slots"] >= s["minb"] * 100, (key, s)  # SMs x minb on an H100-sized GPU


def test_settings_come_from_the_tuned_table_for_its_gpu_and_shape(monkeypatch):
    table = {"GPU A": {"1": {"4096x4096": dict(warps=8, minb=3, slots=396, max_cluster=16)},
                       "8": {"11008+11008x4096": dict(warps=4, minb=5, slots=660, max_cluster=16)},
                       "16": {"11008x4096": dict(warps=4, minb=2, minb2=3, slots=264, max_cluster=16)}}}
    monkeypatch.setattr(ct, "tuned_table", lambda: table)
    small, large = ct.TUNING["small"], ct.TUNING["large"]
    assert ct._settings([4096], 4096, 1, "GPU A", {}) == {**small, **table["GPU A"]["1"]["4096x4096"]}
    assert ct._settings([4096], 4096, 2, "GPU A", {}) == small            # M = 2..8: its own bucket
    assert ct._settings([4096], 4096, 1, "GPU B", {}) == small            # another GPU
    assert ct._settings([4096], 4096, 1, None, {}) == small
    assert ct._settings([4096] * 3, 4096, 1, "GPU A", {}) == small        # another shape
    assert ct._settings([11008] * 2, 4096, 8, "GPU A", {}) == {**large, **table["GPU A"]["8"]["11008+11008x4096"]}
    assert ct._settings([11008] * 2, 4096, 9, "GPU A", {}) == large       # 9-16 rows: not this shape
    assert ct._settings([11008], 4096, 9, "GPU A", {}) == {**small, **table["GPU A"]["16"]["11008x4096"]}
    assert ct._settings([11008], 4096, 17, "GPU A", {}) == small          # more rows: no bucket
    assert [ct.rows_key(m) for m in (1, 2, 8, 9, 16, 17)] == ["1", "8", "8", "16", "16", None]
    assert ct._settings([28672], 8192, 1, "GPU A", {}) == large
    assert ct._settings([4096], 4096, 1, "GPU A", {"warps": 4})["warps"] == 4  # `over` wins
    monkeypatch.setenv("PT2LLM_CUDA_TUNED", "0")
    assert ct._settings([4096], 4096, 1, "GPU A", {}) == small


def test_dependent_launches_hold_in_their_scope_on_their_thread_unless_switched_off(monkeypatch):
    monkeypatch.delenv("PT2LLM_PDL", raising=False)
    assert not dependent.dependent_launch()
    with dependent.dependent_launches():
        assert dependent.dependent_launch()
        with dependent.dependent_launches(False):
            assert not dependent.dependent_launch()
        assert dependent.dependent_launch()
        seen = []
        other = threading.Thread(target=lambda: seen.append(dependent.dependent_launch()))
        other.start()
        other.join()
        assert seen == [False]
        monkeypatch.setenv("PT2LLM_PDL", "0")
        assert not dependent.dependent_launch()
        monkeypatch.delenv("PT2LLM_PDL")
    assert not dependent.dependent_launch()
    with pytest.raises(KeyError):
        with dependent.dependent_launches():
            raise KeyError("out")
    assert not dependent.dependent_launch()


def test_a_dependent_launch_reads_only_weights_before_its_wait():
    """In the kernel (its source), the first block's codes, the (alpha, mu) pairs and the
    column order are read before griddepcontrol.wait; x, the norm's inputs and the split-K
    buffers only after it, and the next launch is let start only once past it: what a
    dependent launch may read before the kernel ahead of it has completed is weights only."""
    src = ct.source()
    body = src[src.index("ternary_mma("):]
    wait, trigger = body.index("pdl_wait();"), body.index("pdl_trigger();")
    assert wait < trigger
    for before in ("fetch(b0);", "am[blk * ROWS + row] =", "stage_cols(xh, perm"):
        assert body.index(before) < wait, before
    for after in ("inv_rms(x", "stage<XR, 0>", "stage<XR, 1>", "stage<XR, 2>", "stage<XR, 3>", "part + ",
                  "atomicAdd(counters", "out[(long long)"):
        assert body.index(after) > trigger, after
    staged = src[src.index("void stage_cols("):src.index("// 1 / rms of h")]
    assert "x[" not in staged and "xu[" not in staged


def test_without_cuda_the_triton_kernels_run():
    x = torch.randn(1, 256, dtype=torch.float16)
    packed = torch.zeros(8, 256, dtype=torch.uint8)
    assert not ct.supported(x, packed, torch.arange(256, dtype=torch.int16), 128)
    assert not tt.use_mma(x, packed, torch.arange(256, dtype=torch.int16), 128)


def test_dispatch_rules(monkeypatch):
    """Where the CUDA kernels would take the inputs, linear uses the mma kernel up to
    TUNING["mma_max_m"] rows and prefill the CUDA dequantize from TUNING["cuda_dequant_from_k"]
    columns on; PT2LLM_CUDA_KERNEL=0 turns both off."""
    monkeypatch.setattr(ct, "supported", lambda *a: True)
    monkeypatch.setattr(ct, "dequant_supported", lambda *a: True)
    perm = torch.arange(64, dtype=torch.int16)
    for m in (1, 8, 9, 16):
        assert tt.use_mma(torch.zeros(m, 64), torch.zeros(13, 64, dtype=torch.uint8), perm, 128) == (m <= 8)
    # 9-16 rows: only a layer whose launch sums its splits in a cluster
    for clusters in (False, True):
        monkeypatch.setattr(ct, "clustered", lambda x2, layers: clusters)
        for m in (1, 8, 9, 16, 17):
            got = tt.use_mma(torch.zeros(m, 64), torch.zeros(13, 64, dtype=torch.uint8), perm, 128, n_out=65)
            assert got == (m <= 8 or (clusters and m <= 16)), (clusters, m)
    alpha = torch.zeros(5, 70, dtype=torch.float16)
    for k in (4096, 8192, 8193, 28672):
        packed = torch.zeros(1, k, dtype=torch.uint8)
        assert tt.use_cuda_dequant(packed, alpha, perm, 128, torch.float16) == (k > 8192)
    monkeypatch.setenv("PT2LLM_CUDA_KERNEL", "0")
    assert not tt.use_mma(torch.zeros(1, 64), torch.zeros(13, 64, dtype=torch.uint8), perm, 128)
    assert not tt.use_cuda_dequant(torch.zeros(1, 28672, dtype=torch.uint8), alpha, perm, 128, torch.float16)


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _layer(n, k, gen, bias):
    """A random TernaryLinear's buffers on CUDA, and its weight in stored column order (float64)."""
    mod = random_ternary(n, k, gen, bias, alpha=(0.02, 0.005), mu_std=0.002, bias_std=0.1)
    layer = {key: getattr(mod, key) for key in ("packed", "alpha", "mu", "perm", "bias")}
    return {key: v.cuda() if v is not None else None for key, v in layer.items()}, mod.weight_permuted(torch.float64)


@needs_cuda
@pytest.mark.parametrize("n,k", [(1000, 1408), (576, 576), (4864, 896), (13, 64), (81, 96), (333, 32800)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(n, k, bias):
    gen = torch.Generator().manual_seed(n * k)
    L, w = _layer(n, k, gen, bias)
    for m in (1, 2, 7, 8, 9, 16):
        x = torch.randn(m, k, generator=gen).half() + (3.0 if bias else 0.0)  # a large mean: cancellation
        ref = x.double()[:, L["perm"].long().cpu()] @ w.T + (L["bias"].double().cpu() if bias else 0)
        for splits in (None, 1, 3):
            y = ct.matmul(x.cuda(), **L, n_out=n, splits=splits)
            assert y.dtype == torch.float16 and y.shape == (m, n)
            err = float((y.double().cpu() - ref).norm() / ref.norm())
            assert err < 1e-3, (m, splits, err)
            assert torch.equal(y, ct.matmul(x.cuda(), **L, n_out=n, splits=splits))  # split order fixed


def test_cluster_rules():
    """When the splits are summed in a cluster, and of how many (docs/results/mma-kernel, runs
    12 and 13): every cluster at once (48 of 8 CTAs, 24 of 16 with 4 warps), no cap that cuts
    a split by more than half at M = 1."""
    rule = lambda m, tiles, blocks, splits, cap=(9, 0): ct.cluster_splits(m, tiles, blocks, splits, 396, cap, 100)
    assert rule(1, 13, 32, 16) == 16            # 4096x4096: 16 parts, one cluster each tile
    assert rule(1, 13, 32, 16, (8, 0)) == 0     # no clusters before sm_90
    assert rule(1, 13, 86, 29) == 15            # 4096x11008: 29 parts into clusters of 15
    assert rule(1, 35, 32, 11) == 8             # 11008x4096: 35 clusters of 11 take two waves, of 8 one
    assert rule(1, 70, 32, 7) == 0              # 70 clusters of 7 would take two waves (48 at once)
    assert rule(1, 39, 32, 8) == 8              # 7B q/k/v
    assert rule(1, 13, 11, 6) == 6              # a split count that cuts the blocks evenly stays
    assert rule(1, 13, 32, 1) == 0              # nothing to sum
    assert ct.cluster_splits(1, 13, 32, 40, 396, (9, 0), 100) == 0  # 40 parts: 16 would cut more than half
    assert ct.cluster_splits(4, 13, 32, 40, 396, (9, 0), 100) == 16  # ... which M > 1 does not mind
    assert ct.cluster_splits(1, 13, 32, 16, 396, (9, 0), 1) == 0     # parts of 2 or 4 blocks would not fit
    large = dict(slots=264, capability=(9, 0), per_cap=100, largest=8)   # 8 warps a CTA, clusters of 8 at most
    assert ct.cluster_splits(1, 36, 32, 7, **large) == 0   # 7B gate/up: 36 clusters of 7, 32 at once
    assert ct.cluster_splits(1, 45, 64, 5, **large) == 5   # 28672x8192: 48 at once
    assert ct.cluster_splits(1, 13, 224, 19, **large) == 0  # 8192x28672: 19 parts cut to 8
    assert ct._final_splits(11, 8) == 6 and ct._final_splits(32, 8) == 8 and ct._final_splits(86, 16) == 15


@needs_cuda
@pytest.mark.parametrize("n,k", [(1000, 1408), (4864, 896), (333, 4096), (81, 96)])
def test_the_cluster_fix_up_gives_the_global_ones_output_bit_for_bit(n, k):
    """At one split count the cluster sums the splits as the global fix-up does (split order):
    the same output, bit for bit, for single layers and a group launch."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need sm_90")
    gen = torch.Generator().manual_seed(n + 7 * k)
    L, w = _layer(n, k, gen, True)
    L2, _ = _layer(n // 3 + 1, k, gen, False)
    for m in (1, 3, 8, 16):
        x = (torch.randn(m, k, generator=gen).half() + 1.0).cuda()
        ref = x.double().cpu()[:, L["perm"].long().cpu()] @ w.T + L["bias"].double().cpu()
        for splits in (2, 3, 5, 8, 11, 16):
            a = ct.matmul(x, **L, n_out=n, splits=splits, cluster=False)
            b = ct.matmul(x, **L, n_out=n, splits=splits, cluster=True)
            assert torch.equal(a, b), (m, splits)
            assert float((b.double().cpu() - ref).norm() / ref.norm()) < 1e-3
            keys = ("packed", "alpha", "mu", "perm", "bias")
            tup = [(*(L[key] for key in keys), n), (*(L2[key] for key in keys), n // 3 + 1)]
            ga = ct.matmul_group(x, tup, splits=splits, cluster=False)
            gb = ct.matmul_group(x, tup, splits=splits, cluster=True)
            assert all(torch.equal(u, v) for u, v in zip(ga, gb)), (m, splits)
    if -(-k // 128) > 16:  # a part a block: more than a cluster takes
        with pytest.raises(ValueError, match="cluster"):
            ct.matmul(x, **L, n_out=n, splits=-(-k // 128), cluster=True)


@needs_cuda
def test_every_tuned_setting_gives_the_reference_product():
    """Each distinct setting of the shipped table, forced on small layers (a group too), at the
    fewest and most rows its bucket takes: the float64 product, and the same output on a second
    call."""
    settings = {(bucket, tuple(sorted(s.items()))) for gpu in ct.tuned_table().values()
                for bucket, b in gpu.items() for s in b.values()}
    gen = torch.Generator().manual_seed(5)
    L, w = _layer(1000, 4096, gen, True)
    L2, w2 = _layer(300, 4096, gen, False)
    keys = ("packed", "alpha", "mu", "perm", "bias")
    tup = [(*(L[key] for key in keys), 1000), (*(L2[key] for key in keys), 300)]
    for bucket, s in sorted(settings):
        for m in {"1": (1,), "8": (2, 8), "16": (9, 16)}[bucket]:
            x = torch.randn(m, 4096, generator=gen).half()
            xp = x.double()[:, L["perm"].long().cpu()]
            refs = [xp @ w.T + L["bias"].double().cpu(), x.double()[:, L2["perm"].long().cpu()] @ w2.T]
            got = ct.matmul_group(x.cuda(), tup, **dict(s))
            for y, ref in zip(got, refs):
                assert float((y.double().cpu() - ref).norm() / ref.norm()) < 1e-3, (s, m)
            assert all(torch.equal(a, b) for a, b in zip(got, ct.matmul_group(x.cuda(), tup, **dict(s))))


@needs_cuda
def test_dispatch(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    L, _ = _layer(300, 512, gen, True)
    x = torch.randn(4, 512).half().cuda()
    assert tt.use_mma(x, L["packed"], L["perm"], 128)
    assert not tt.use_mma(torch.randn(9, 512).half().cuda(), L["packed"], L["perm"], 128)  # fused beyond 8 rows
    if torch.cuda.get_device_capability() >= (9, 0):  # ... unless the launch sums in a cluster
        big, _ = _layer(4096, 4096, gen, False)
        x16 = torch.randn(16, 4096).half().cuda()
        assert ct.clustered(x16, [(big["packed"], 4096)])
        assert tt.use_mma(x16, big["packed"], big["perm"], 128, 4096)
        assert tt.default_path(x16, big["packed"], big["perm"], 128, 4096) == "mma"
        assert not tt.use_mma(torch.randn(17, 4096).half().cuda(), big["packed"], big["perm"], 128, 4096)
    assert not tt.use_mma(x.bfloat16(), L["packed"], L["perm"], 128)  # bf16: fused
    assert not tt.use_mma(x[:, :500].contiguous(), L["packed"][:, :500].contiguous(), L["perm"][:500], 128)
    monkeypatch.setenv("PT2LLM_CUDA_KERNEL", "0")
    assert not tt.use_mma(x, L["packed"], L["perm"], 128)
    monkeypatch.delenv("PT2LLM_CUDA_KERNEL")
    y = tt.linear(x, L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], 300, 128)
    y_fused = tt.linear(x, L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], 300, 128, path="fused")
    assert float((y.float() - y_fused.float()).norm() / y_fused.float().norm()) < 1e-3


@needs_cuda
@pytest.mark.parametrize("n,k", [(1000, 1408), (576, 576), (4864, 896), (13, 64), (81, 96), (333, 32800), (7, 28672)])
def test_dequantize_original_is_bit_identical_to_the_triton_kernel(n, k):
    gen = torch.Generator().manual_seed(n + k)
    L, w = _layer(n, k, gen, False)
    for inv in (tt.inverse_perm(L["perm"]), tt.inverse_perm(L["perm"]).to(torch.int16) if k < 32768 else None):
        if inv is None:
            continue
        assert ct.dequant_supported(L["packed"], L["alpha"], inv, 128, torch.float16)
        got = ct.dequantize_original(L["packed"], L["alpha"], L["mu"], inv, n)
        want = tt.dequantize_original(L["packed"], L["alpha"], L["mu"], inv, n, 128, torch.float16)
        assert torch.equal(got, want)
        assert torch.equal(got.cpu()[:, L["perm"].long().cpu()], w.half())  # stored order: the reference weight


@needs_cuda
@pytest.mark.parametrize("shapes,k", [([(896, True), (128, True), (128, True)], 896),  # Qwen2.5-0.5B q/k/v
                                      ([(300, False), (1000, False)], 1408),              # gate/up-like
                                      ([(13, True), (81, False), (40, True)], 576)])
def test_a_group_launch_gives_each_layer_its_own_launchs_output(shapes, k):
    """matmul_group: one launch for layers that read one x, each output bit for bit what matmul
    gives that layer alone with the same split count; linear_group falls back to one call each
    beyond the mma kernel's rows, with the same outputs as linear."""
    gen = torch.Generator().manual_seed(k + len(shapes))
    layers = [(_layer(n, k, gen, bias)[0], n) for n, bias in shapes]
    tup = [(L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], n) for L, n in layers]
    for m in (1, 4, 16):
        x = torch.randn(m, k, generator=gen).half().cuda()
        for splits in (1, 3):
            got = ct.matmul_group(x, tup, splits=splits)
            for y, (L, n) in zip(got, layers):
                assert y.shape == (m, n)
                assert torch.equal(y, ct.matmul(x, **L, n_out=n, splits=splits))
        for m_lead in ((m,), (1, m)):
            xs = x.reshape(*m_lead, k)
            got = tt.linear_group(xs, tup, 128)
            for y, (L, n) in zip(got, layers):
                want = tt.linear(xs, L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], n, 128)
                assert y.shape == (*m_lead, n)
                err = float((y.float() - want.float()).norm() / want.float().norm())
                assert err < 1e-3, (m, err)  # the group's split count may differ from each layer's
    with pytest.raises(ValueError):
        ct.matmul_group(x, tup * 2)


@needs_cuda
def test_a_remembered_launch_gives_what_a_fresh_launch_gives(monkeypatch):
    """linear / linear_group remember the CUDA kernel's prepared launch (tt._mma_launch) for
    eager decoding: every call gives what a fresh launch (ct.matmul / matmul_group, the same
    split count) gives for that call's x, in new output tensors; a layer whose tensors are
    changed in place, or replaced, is read afresh; the launch is prepared once per key."""
    gen = torch.Generator().manual_seed(7)
    L, _ = _layer(1000, 1408, gen, True)
    G = [_layer(n, 1408, gen, b)[0] for n, b in ((300, False), (700, True))]
    tup = [(g["packed"], g["alpha"], g["mu"], g["perm"], g["bias"], n) for g, n in zip(G, (300, 700))]
    tt.forget_launches()
    made, prepare = [], ct.prepare
    monkeypatch.setattr(ct, "prepare", lambda *a, **k: made.append(1) or prepare(*a, **k))
    for m in (1, 4):
        outs = []
        for _ in range(3):
            x = torch.randn(m, 1408, generator=gen).half().cuda()
            y = tt.linear(x, L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], 1000, 128)
            assert torch.equal(y, prepare(x, [(L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], 1000)])(x)[0])
            for y_g, w_g in zip(tt.linear_group(x, tup, 128), prepare(x, tup)(x)):
                assert torch.equal(y_g, w_g)
            outs.append(y)
        assert len({o.data_ptr() for o in outs}) == 3  # each call's own output
    assert len(made) == 4  # one prepared launch per (rows, layers); the fresh ones above are not counted
    # in place: the remembered launch reads the new values
    x = torch.randn(1, 1408, generator=gen).half().cuda()
    L["alpha"].mul_(2)
    L["mu"].mul_(2)
    L["bias"].mul_(2)
    y = tt.linear(x, L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], 1000, 128)
    assert torch.equal(y, prepare(x, [(L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], 1000)])(x)[0])
    # replaced: a new tensor is a new key
    before = len(made)
    alpha = L["alpha"] / 2
    y2 = tt.linear(x, L["packed"], alpha, L["mu"], L["perm"], L["bias"], 1000, 128)
    assert len(made) == before + 1
    assert torch.equal(y2, prepare(x, [(L["packed"], alpha, L["mu"], L["perm"], L["bias"], 1000)])(x)[0])
    assert not torch.equal(y2, y)
    # the switch is part of the key: PT2LLM_CUDA_KERNEL=0 takes the Triton kernel at once
    monkeypatch.setenv("PT2LLM_CUDA_KERNEL", "0")
    before, launched, call = len(made), [], ct.Matmul.__call__
    monkeypatch.setattr(ct.Matmul, "__call__", lambda self, x2: launched.append(1) or call(self, x2))
    y3 = tt.linear(x, L["packed"], alpha, L["mu"], L["perm"], L["bias"], 1000, 128)
    assert len(made) == before and not launched
    assert float((y3.float() - y2.float()).norm() / y2.float().norm()) < 1e-3
    monkeypatch.delenv("PT2LLM_CUDA_KERNEL")
    # another stream: a launch of its own, on that stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y4 = tt.linear(x, L["packed"], alpha, L["mu"], L["perm"], L["bias"], 1000, 128)
    torch.cuda.current_stream().wait_stream(side)
    assert len(made) == before + 1 and torch.equal(y4, y2)
    tt.forget_launches()


@needs_cuda
@pytest.mark.parametrize("n,k", [(896, 4864), (576, 1536), (300, 1408)])
def test_the_glu_input_is_the_silu_product_staged(n, k):
    """Matmul(gate, up): the layer reads silu(gate) up, formed as the kernel stages its
    activations (rounded to fp16 once), for every row count and split rule the kernel takes;
    linear_glu gives that where the kernel takes the rows and the product, then linear,
    elsewhere (beyond 16 rows, or gate and up of different strides)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(n + k)
    L, w = _layer(n, k, gen, True)
    tup = [(L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], n)]
    for m in (1, 2, 8, 9, 16):
        g = (torch.randn(m, k, generator=gen) * 3).half().cuda()
        u = torch.randn(m, k, generator=gen).half().cuda()
        prod = (F.silu(g.float()) * u.float()).half()
        ref = prod.double().cpu()[:, L["perm"].long().cpu()] @ w.T + L["bias"].double().cpu()
        for splits in (None, 1, 3):
            y = ct.prepare(g, tup, splits)(g, u)[0]
            err = float((y.double().cpu() - ref).norm() / ref.norm())
            assert err < 1e-3, (m, splits, err)
            want = ct.matmul(prod, **L, n_out=n, splits=splits)  # the unfused launch, same splits
            assert float((y.float() - want.float()).abs().max() / want.float().abs().max()) < 2e-3
        got = tt.linear_glu(g, u, *tup[0], 128)
        assert float((got.double().cpu() - ref).norm() / ref.norm()) < 1e-3
    g = (torch.randn(40, k, generator=gen) * 3).half().cuda()
    u = torch.randn(40, k, generator=gen).half().cuda()
    wider = torch.randn(16, k + 64, generator=gen).half().cuda()[:, :k]  # rows of another stride
    for a, b in ((g, u), (g[:16], wider)):
        assert torch.equal(tt.linear_glu(a, b, *tup[0], 128), tt.linear(F.silu(a) * b, *tup[0], 128))


@needs_cuda
@pytest.mark.parametrize("shapes,k", [([(896, True), (128, True), (128, True)], 896),   # Qwen2.5-0.5B q/k/v
                                      ([(4864, False), (4864, False)], 896),             # its gate/up
                                      ([(1000, True)], 4096)])
def test_the_rms_norm_and_residual_add_are_staged(shapes, k):
    """Matmul(res, norm=(delta, weight, eps)): the layers read transformers' RMSNorm of
    h = res + delta (or res), formed as each CTA stages its activations; h comes back after
    the outputs, exactly res + delta. Against the launch on the norm computed first, for each
    split rule; linear_norm gives the same, and its fallback (two rows) the norm, then the layers."""
    gen = torch.Generator().manual_seed(k + len(shapes))
    tup = [(L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], n)
           for L, n in ((_layer(n, k, gen, bias)[0], n) for n, bias in shapes)]
    weight = (torch.rand(k, generator=gen) * 2 + 0.1).half().cuda()
    for delta_on in (True, False):
        res = (torch.randn(1, k, generator=gen) * 4 + 1).half().cuda()
        delta = torch.randn(1, k, generator=gen).half().cuda() if delta_on else None
        h = res + delta if delta_on else res
        x = tt.rms_norm(h, weight, 1e-6)
        for splits in (None, 1, 3):
            got = ct.prepare(res, tup, splits)(res, None, (delta, weight, 1e-6))
            want = ct.prepare(x, tup, splits)(x)
            assert len(got) == len(tup) + delta_on
            if delta_on:
                assert torch.equal(got[-1], h)
            for y, w in zip(got, want):
                err = float((y.float() - w.float()).norm() / w.float().norm())
                assert err < 2e-3, (splits, err)
        fused = tt.linear_norm(res[None], delta if delta is None else delta[None], weight, 1e-6, tup, 128)
        assert len(fused) == len(tup) + delta_on and fused[0].shape == (1, 1, tup[0][5])
        for y, w in zip(fused, ct.prepare(res, tup)(res, None, (delta, weight, 1e-6))):
            assert torch.equal(y.reshape(w.shape), w)
    res2, delta2 = (torch.randn(2, k, generator=gen).half().cuda() for _ in range(2))
    h2 = res2 + delta2
    outs = tt.linear_norm(res2, delta2, weight, 1e-6, tup, 128)
    assert torch.equal(outs[-1], h2)
    want = tt.linear_group(tt.rms_norm(h2, weight, 1e-6), tup, 128) if len(tup) > 1 else \
        [tt.linear(tt.rms_norm(h2, weight, 1e-6), *tup[0], 128)]
    for y, w in zip(outs, want):
        assert torch.equal(y, w)


@needs_cuda
def test_a_bias_of_another_dtype_is_converted_at_every_call():
    """A float32 bias is converted for the kernel at each call (its copy is not remembered)."""
    gen = torch.Generator().manual_seed(8)
    L, _ = _layer(300, 512, gen, True)
    bias32 = L["bias"].float()
    tt.forget_launches()
    for _ in range(2):
        x = torch.randn(1, 512, generator=gen).half().cuda()
        y = tt.linear(x, L["packed"], L["alpha"], L["mu"], L["perm"], bias32, 300, 128)
        assert torch.equal(y, tt.linear(x, L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], 300, 128))
        tup = [(L["packed"], L["alpha"], L["mu"], L["perm"], bias32, 300)] * 2
        assert all(torch.equal(g, y) for g in tt.linear_group(x, tup, 128))
        assert tt._mma_launch(x, tup, 128) is None and tt._mma_launch(x, tup[:1], 128) is None
    assert tt._mma_launch(x, [(L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], 300)], 128) is not None


@needs_cuda
@pytest.mark.parametrize("n,k", [(5, 65504), (7, 65536)])
def test_widths_at_the_column_order_staging_limit(n, k):
    """Built for dependent launches, below K = 65535 the kernel stages the column order in 16
    bits before its wait (stage_cols); from there on (and in plain launches) it reads it as it
    stages x. Each against float64, and dependent launches as plain ones bit for bit."""
    gen = torch.Generator().manual_seed(k)
    L, w = _layer(n, k, gen, False)
    assert L["perm"].dtype == torch.int32
    for m in (1, 2, 9):
        x = torch.randn(m, k, generator=gen).half()
        ref = x.double()[:, L["perm"].long().cpu()] @ w.T
        for splits in (None, 1, 7):
            y = ct.matmul(x.cuda(), **L, n_out=n, splits=splits)
            err = float((y.double().cpu() - ref).norm() / ref.norm())
            assert err < 1e-3, (m, splits, err)
            with dependent.dependent_launches():
                assert torch.equal(ct.matmul(x.cuda(), **L, n_out=n, splits=splits), y)


@needs_cuda
def test_dependent_launches_give_the_plain_launches_outputs_bit_for_bit():
    """A chain as a decode step launches it: a layer, a q/k/v-like group, a down projection on
    the SiLU product, and a group after a residual add and RMS norm, each reading the one
    before. Prepared as dependent launches (sm_90), captured in a CUDA graph and replayed, and
    called eagerly, every output is the plain launches' bit for bit."""
    x = torch.randn(1, 1408, generator=torch.Generator().manual_seed(0)).half().cuda()
    if not ct.dependent_possible(x):
        pytest.skip("dependent launches need sm_90")
    gen = torch.Generator().manual_seed(11)

    def tup(n, k, bias=False):
        L, _ = _layer(n, k, gen, bias)
        return (L["packed"], L["alpha"], L["mu"], L["perm"], L["bias"], n)

    first, gate_up, down, qkv = [tup(896, 1408, True)], [tup(704, 896), tup(704, 896)], [tup(1408, 704)], \
        [tup(512, 1408), tup(128, 1408, True), tup(128, 1408)]
    weight = (torch.rand(1408, generator=gen) + 0.5).half().cuda()
    y1, y2, y3 = torch.empty(1, 896, device="cuda").half(), torch.empty(1, 704, device="cuda").half(), \
        torch.empty(1, 1408, device="cuda").half()

    def prepared():
        return (ct.prepare(x, first), ct.prepare(y1, gate_up), ct.prepare(y2, down), ct.prepare(y3, qkv))

    def chain(p):
        a = p[0](x)[0]
        g, u = p[1](a)
        d = p[2](g, up2=u)[0]
        return [a, g, u, d, *p[3](d, norm=(x, weight, 1e-6))]

    plain = prepared()
    with dependent.dependent_launches():
        dep = prepared()
    assert not any(p.launcher.dependent for p in plain) and all(p.launcher.dependent for p in dep)
    want = chain(plain)
    assert all(torch.isfinite(t.float()).all() for t in want)
    assert all(torch.equal(a, b) for a, b in zip(chain(dep), want))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with dependent.dependent_launches():
            dep = prepared()
        chain(dep)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(dep)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(got, want))
