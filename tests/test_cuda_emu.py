"""CUDA kernels run on the CPU through gpt2gen.cuda_emu, each compared with numpy / PyTorch."""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2gen import cuda_emu

KERNELS = Path(__file__).parent / "cuda_emu"
P, I = ctypes.c_void_p, ctypes.c_int


def _lib(name: str):
    return cuda_emu.load(KERNELS / name)


@pytest.fixture(scope="module")
def red():
    lib = _lib("reductions.cu")
    lib.reduce_shared.argtypes = [P, I, P, I]
    lib.reduce_warp.argtypes = [P, I, P]
    lib.reduce_cg.argtypes = [P, I, I, P, P]
    lib.reduce_dynamic.argtypes = [P, I, I, P]
    lib.run_warp_ops.argtypes = [P, I, P]
    return lib


def test_shared_memory_tree_reduction(red):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(100_003).astype(np.float32)
    partial = np.zeros(13, np.float32)
    assert red.reduce_shared(x, x.size, partial, partial.size) == 0
    assert partial.sum() == pytest.approx(float(x.astype(np.float64).sum()), abs=1e-2)
    # block b of the grid-stride loop sums x[b*256 + k*13*256 + t]
    idx = np.arange(x.size)
    expect = np.bincount((idx // 256) % 13, weights=x.astype(np.float64), minlength=13)
    np.testing.assert_allclose(partial, expect, rtol=1e-4, atol=1e-3)


def test_warp_shuffle_reduction(red):
    x = np.random.default_rng(1).random(50_000).astype(np.float32)
    out = np.zeros(1, np.float32)
    assert red.reduce_warp(x, x.size, out) == 0
    assert out[0] == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-5)


@pytest.mark.parametrize("threads", [256, 96])
def test_cooperative_groups_reduce(red, threads):
    x = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)
    blocks = (x.size + threads - 1) // threads
    sums = np.zeros(blocks, np.float32)
    maxes = np.zeros(blocks, np.float32)
    assert red.reduce_cg(x, x.size, threads, sums, maxes) == 0
    pad = np.full(blocks * threads, np.nan, np.float32)
    pad[: x.size] = x
    rows = pad.reshape(blocks, threads)
    np.testing.assert_allclose(sums, np.nansum(rows.astype(np.float64), axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(maxes, np.nanmax(rows, axis=1))


def test_dynamic_shared_memory_reduction(red):
    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    threads = 512
    blocks = (x.size + threads - 1) // threads
    partial = np.zeros(blocks, np.float32)
    assert red.reduce_dynamic(x, x.size, threads, partial) == 0
    pad = np.zeros(blocks * threads, np.float64)
    pad[: x.size] = x
    np.testing.assert_allclose(partial, pad.reshape(blocks, threads).sum(1), rtol=1e-4, atol=1e-4)


def test_warp_votes_shuffles_and_barrier_reductions(red):
    threads = 64
    x = np.random.default_rng(4).integers(-5, 11, threads).astype(np.int32)
    x[40] = 7
    out = np.zeros((threads, 12), np.int32)
    assert red.run_warp_ops(x, threads, out) == 0
    lane = np.arange(threads) % 32
    warp0 = np.arange(threads) - lane
    exp = np.zeros_like(out)
    for t in range(threads):
        l, w = lane[t], warp0[t]
        wv = x[w:w + 32]
        exp[t, 0] = np.array([sum(1 << k for k in range(32) if wv[k] > 0)], np.uint32).view(np.int32)[0]
        exp[t, 1] = 1
        exp[t, 2] = int((wv == 7).any())
        exp[t, 3] = wv[(l & ~15) + 3]
        exp[t, 4] = wv[: l + 1].sum()
        exp[t, 5] = wv[l ^ 5]
        j = l + 3
        exp[t, 6] = wv[j] if j <= (l | 7) else wv[l]
        exp[t, 7] = int((x > 0).sum())
        exp[t, 8] = 1
        exp[t, 9] = int((x == 7).any())
        exp[t, 10] = wv[l ^ 1] if l < 16 else wv[l ^ 2]
        exp[t, 11] = wv.sum()
    np.testing.assert_array_equal(out, exp)


@pytest.fixture(scope="module")
def mm():
    lib = _lib("matmul.cu")
    lib.matmul.argtypes = [P, P, P, I, I, I]
    return lib


@pytest.mark.parametrize("shape", [(64, 48, 80), (37, 53, 29), (1, 17, 3)])
def test_tiled_matmul(mm, shape):
    M, N, K = shape
    rng = np.random.default_rng(M * N)
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    C = np.full((M, N), np.nan, np.float32)
    assert mm.matmul(A, B, C, M, N, K) == 0
    np.testing.assert_allclose(C, A.astype(np.float64) @ B, rtol=1e-4, atol=1e-4)


def test_tiled_matmul_256_speed(mm, capsys):
    n = 256
    rng = np.random.default_rng(5)
    A = rng.standard_normal((n, n)).astype(np.float32)
    B = rng.standard_normal((n, n)).astype(np.float32)
    C = np.zeros((n, n), np.float32)
    mm.matmul(A, B, C, n, n, n)  # warm-up: worker threads, fiber stacks
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        assert mm.matmul(A, B, C, n, n, n) == 0
        times.append(time.perf_counter() - t0)
    np.testing.assert_allclose(C, A.astype(np.float64) @ B, rtol=1e-4, atol=1e-3)
    with capsys.disabled():
        print(f"\n[cuda_emu] 256x256x256 tiled matmul (16x16 tiles, 256 blocks x 256 threads): "
              f"best {min(times) * 1e3:.1f} ms, median {sorted(times)[1] * 1e3:.1f} ms "
              f"on {mm.gpt2gen_emu_num_workers()} worker thread(s)")


@pytest.fixture(scope="module")
def sm():
    lib = _lib("softmax.cu")
    lib.run_softmax_warp.argtypes = [P, P, I, I]
    lib.run_layernorm.argtypes = [P, P, P, P, I, I]
    lib.run_softmax_block.argtypes = [P, P, I, I]
    return lib


def test_warp_softmax(sm):
    import torch
    rows, cols = 37, 300
    x = (np.random.default_rng(6).standard_normal((rows, cols)) * 4).astype(np.float32)
    y = np.zeros_like(x)
    assert sm.run_softmax_warp(x, y, rows, cols) == 0
    ref = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-7)


def test_layernorm_float4(sm):
    import torch
    rows, C = 9, 768
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rows, C)).astype(np.float32) * 3 + 1
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    y = np.zeros_like(x)
    assert sm.run_layernorm(x, w, b, y, rows, C) == 0
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (C,), torch.from_numpy(w), torch.from_numpy(b), 1e-5)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cols", [1000, 20000])  # 20000 floats = 80 KB: needs the opt-in attribute
def test_block_softmax_dynamic_shared_on_stream(sm, cols):
    import torch
    rows = 3
    x = np.random.default_rng(cols).standard_normal((rows, cols)).astype(np.float32)
    y = np.zeros_like(x)
    assert sm.run_softmax_block(x, y, rows, cols) == 0
    ref = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def at():
    lib = _lib("atomics.cu")
    lib.run_histogram.argtypes = [P, I, P]
    lib.run_stats.argtypes = [P, P, I, P]
    return lib


def test_atomics_histogram(at):
    data = np.random.default_rng(8).integers(0, 10_000, 40_000).astype(np.int32)
    hist = np.zeros(64, np.uint32)
    assert at.run_histogram(data, data.size, hist) == 0
    np.testing.assert_array_equal(hist, np.bincount(data % 64, minlength=64))


def test_atomics_max_min_cas_add_exch_inc_and_lock(at):
    n = 3000
    rng = np.random.default_rng(9)
    v = rng.integers(-1_000_000, 1_000_000, n).astype(np.int32)
    f = rng.standard_normal(n).astype(np.float32)
    s = np.zeros(11, np.int32)
    s[0], s[1] = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    s[2] = np.array([-np.inf], np.float32).view(np.int32)[0]
    assert at.run_stats(v, f, n, s) == 0
    blocks = (n + 127) // 128
    assert s[0] == v.max() and s[1] == v.min()
    assert s[2:3].view(np.float32)[0] == f.max()
    assert s[3:4].view(np.float32)[0] == pytest.approx(float(f.astype(np.float64).sum()), abs=1e-2)
    assert int(s[4:6].view(np.uint64)[0]) == int(v.astype(np.int64).sum()) + 4_000_000_000 * n
    assert s[6] == 1234 and s[7] == n
    assert s[8] == 0 and s[9] == blocks and s[10] == blocks


@pytest.fixture(scope="module")
def hp():
    lib = _lib("halfprec.cu")
    lib.run_convert.argtypes = [P, P, P, I]
    lib.run_arith.argtypes = [I, P, P, P, P, I]
    lib.run_pairs.argtypes = [P, P]
    lib.run_dot_bf16.argtypes = [P, P, P, I, I]
    return lib


def _special_floats() -> np.ndarray:
    rng = np.random.default_rng(10)
    bits = rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)
    rand = bits.view(np.float32)
    normal = (rng.standard_normal(5000) * np.exp2(rng.integers(-30, 20, 5000))).astype(np.float32)
    # exact ties for half (bit 12 set, below it zero) and bf16 (bit 15 set, below it zero)
    base = rng.integers(0, 2**31, 2000, dtype=np.uint64).astype(np.uint32)
    ties = np.concatenate([(base & ~np.uint32(0x1FFF)) | np.uint32(0x1000),
                           (base & ~np.uint32(0xFFFF)) | np.uint32(0x8000)]).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519, 65520, -65536, 1e-8, -3e-8, 5.96e-8,
                        6.1e-5, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 3.4e38, -3.4e38, 1e-45, 1.17549435e-38],
                       np.float32)
    return np.concatenate([rand, normal, ties, special]).astype(np.float32)


def test_fp16_bf16_conversions_and_rounding(hp):
    import torch
    x = _special_floats()
    n = x.size
    bits = np.zeros((n, 4), np.uint16)
    back = np.zeros((n, 2), np.float32)
    assert hp.run_convert(x, bits, back, n) == 0
    nan = np.isnan(x)
    with np.errstate(over="ignore", invalid="ignore"):
        h_rn = x.astype(np.float16)
        # round toward zero: step back by one ulp where round-to-nearest went away from zero
        away = np.abs(h_rn.astype(np.float64)) > np.abs(x.astype(np.float64))
        h_rz = np.where(away, np.nextafter(h_rn, np.float16(0)), h_rn).astype(np.float16)
    b_rn = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    b_rz = (x.view(np.uint32) >> 16).astype(np.uint16)
    for col, ref, what in [(0, h_rn.view(np.uint16), "__float2half_rn"), (1, h_rz.view(np.uint16), "__float2half_rz"),
                           (2, b_rn, "__float2bfloat16"), (3, b_rz, "__float2bfloat16_rz")]:
        got = bits[:, col]
        bad = np.nonzero((got != ref) & ~nan)[0]
        assert bad.size == 0, f"{what}: {bad.size} mismatches, first x={x[bad[0]]!r} got {got[bad[0]]:#06x} want {ref[bad[0]]:#06x}"
    assert ((bits[nan, 0] & 0x7C00) == 0x7C00).all() and ((bits[nan, 0] & 0x3FF) != 0).all()
    assert ((bits[nan, 2] & 0x7F80) == 0x7F80).all() and ((bits[nan, 2] & 0x7F) != 0).all()
    np.testing.assert_array_equal(back[~nan, 0], h_rn[~nan].astype(np.float32))
    np.testing.assert_array_equal(back[~nan, 1], torch.from_numpy(x[~nan]).to(torch.bfloat16).float().numpy())


def _operands(rng, n, dtype):
    """Values of magnitude [0.5, 4) so that fma results are exact in float64 / float32."""
    v = rng.uniform(0.5, 4, n) * rng.choice([-1, 1], n)
    return v.astype(dtype)


def test_half_arithmetic_correctly_rounded(hp):
    rng = np.random.default_rng(11)
    n = 4000
    a, b, c = (_operands(rng, n, np.float16) for _ in range(3))
    out = np.zeros((n, 7), np.uint16)
    assert hp.run_arith(0, a.view(np.uint16), b.view(np.uint16), c.view(np.uint16), out, n) == 0
    got = out.view(np.float16)
    A, B, Cc = (t.astype(np.float64) for t in (a, b, c))
    h = np.float16
    exp = np.stack([(A + B).astype(h), (A - B).astype(h), (A * B).astype(h), (A / B).astype(h),
                    (A * B + Cc).astype(h), np.maximum(a, b)], axis=1)
    t = ((A * B).astype(h).astype(np.float64) + Cc).astype(h)
    t = (t.astype(np.float64) + Cc).astype(h)
    np.testing.assert_array_equal(got[:, :6], exp)
    np.testing.assert_array_equal(got[:, 6], -t)


def test_bf16_arithmetic_correctly_rounded(hp):
    import torch
    rng = np.random.default_rng(12)
    n = 4000
    a, b, c = (torch.from_numpy(_operands(rng, n, np.float32)).to(torch.bfloat16) for _ in range(3))
    u16 = lambda t: t.view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    out = np.zeros((n, 7), np.uint16)
    assert hp.run_arith(1, u16(a), u16(b), u16(c), out, n) == 0
    A, B, C = a.double(), b.double(), c.double()
    bf = lambda t: u16(t.float().to(torch.bfloat16))  # noqa: E731  (float64 -> float32 is exact here)
    exp = np.stack([bf(A + B), bf(A - B), bf(A * B), bf(A / B), bf(A * B + C), u16(torch.maximum(a, b))], axis=1)
    t = a * b + c
    t = t + c
    np.testing.assert_array_equal(out[:, :6], exp)
    np.testing.assert_array_equal(out[:, 6], u16(-t))


def test_paired_types_and_16bit_shuffles(hp):
    import torch
    x = np.random.default_rng(13).uniform(0.5, 2, 64).astype(np.float32)
    out = np.zeros((32, 6), np.float32)
    assert hp.run_pairs(x, out) == 0
    h = x.astype(np.float16).astype(np.float64)
    hh = ((h * h).astype(np.float16).astype(np.float64) + h).astype(np.float16).astype(np.float32)
    b = torch.from_numpy(x).to(torch.bfloat16).double()
    bb = (b * b + b).float().to(torch.bfloat16).float().numpy()  # exact in float32 for these ranges
    lane = np.arange(32)
    np.testing.assert_array_equal(out[:, 0], hh[0::2])
    np.testing.assert_array_equal(out[:, 1], hh[1::2])
    np.testing.assert_array_equal(out[:, 2], bb[0::2])
    np.testing.assert_array_equal(out[:, 3], bb[1::2])
    bf_lo = torch.from_numpy(x[0::2]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(out[:, 4], bf_lo[lane ^ 1])
    hi = x[1::2].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out[:, 5], hi[np.minimum(lane + 1, 31) * (lane < 31) + lane * (lane == 31)])


def test_mixed_precision_bf16_dot(hp):
    import torch
    rows, k = 20, 333
    g = torch.Generator().manual_seed(14)
    a = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    b = torch.randn(k, generator=g).to(torch.bfloat16)
    y = np.zeros(rows, np.uint16)
    u16 = lambda t: t.contiguous().view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    assert hp.run_dot_bf16(u16(a), u16(b), y, rows, k) == 0
    got = torch.from_numpy(y.view(np.int16)).view(torch.bfloat16).float().numpy()
    ref = (a.float() @ b.float()).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=2e-2)


def test_runtime_api():
    lib = _lib("runtime.cu")
    lib.run_runtime.argtypes = [P, P, P, P, I, P]
    info = np.zeros(13, np.int32)
    coords = np.zeros(3 * 2 * 2 * 4 * 3 * 2, np.int32)
    n = 1000
    x = np.random.default_rng(15).standard_normal(n).astype(np.float32)
    y = np.zeros(n, np.float32)
    big = np.zeros(1, np.float32)
    assert lib.run_runtime(info, coords, y, x, n, big) == 0
    assert list(info[:9]) == [9, 0, 1024, 32, 48 * 1024, 227 * 1024, 132, 1024, 1]
    assert info[9] == 0 and info[10] == 1 and info[11] == coords.size and info[12] >= 12000
    expect = []
    for bz in range(2):
        for by in range(2):
            for bx in range(3):
                for tz in range(2):
                    for ty in range(3):
                        for tx in range(4):
                            expect.append((bz << 24) | (by << 20) | (bx << 16) | (tz << 8) | (ty << 4) | tx)
    np.testing.assert_array_equal(coords, np.array(expect, np.int32))
    np.testing.assert_array_equal(y, x * np.array([1, 2, 0.5, -1], np.float32)[np.arange(n) % 4])
    m = 100 * 1024 // 4
    assert big[0] == pytest.approx(2 * m * (m - 1) / 2, rel=1e-5)
    lib.gpt2gen_emu_device_bytes_in_use.restype = ctypes.c_size_t
    assert lib.gpt2gen_emu_device_bytes_in_use() == 0  # every cudaMalloc was freed


def test_load_is_cached_and_accepts_torch_tensors(red):
    import torch
    assert cuda_emu.load(KERNELS / "reductions.cu") is red
    t0 = time.perf_counter()
    cuda_emu.build(KERNELS / "reductions.cu")
    assert time.perf_counter() - t0 < 1.0
    x = torch.arange(1000, dtype=torch.float32)
    out = torch.zeros(1)
    assert red.reduce_warp(x, 1000, out) == 0
    assert out.item() == 999 * 1000 / 2
    with pytest.raises(ValueError, match="non-contiguous"):
        red.reduce_warp(np.zeros((4, 4), np.float32)[:, 1], 4, out)
