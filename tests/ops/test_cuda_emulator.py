"""The CPU emulation of CUDA (tests/cuda_cpu) itself: warp primitives, barriers, 3-D launches, the failures it must
report (deadlock, a lane that returns while its warp waits, a misaligned vector load, a bad launch) and the fake
headers' conversions, on small kernels (tests/cuda_cpu/selftest.cu) launched through csrc/launch.cuh.
tests/ops/test_cuda_emulated.py runs the real kernels on it."""
import ctypes

import numpy as np
import pytest
import torch
from cuda_cpu.build import HERE, BuildUnavailable, build_library, compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="g++ is not on PATH: the CPU emulation of the CUDA kernels "
                                                           "needs a C++17 compiler (or set ESPO_CUDA_CPU_CXX)")
P = ctypes.c_void_p


@pytest.fixture(scope="module")
def lib():
    try:
        lib = ctypes.CDLL(str(build_library([HERE / "selftest.cu"], "espo_emulator_selftest")))
    except BuildUnavailable as err:
        pytest.skip(str(err))
    lib.emu_warp.argtypes = [P, ctypes.c_uint]
    lib.emu_deadlock.argtypes = [P]
    lib.emu_lane_exit.argtypes = [P]
    lib.emu_mismatch.argtypes = [P]
    lib.emu_load.argtypes = [P, ctypes.c_int, P]
    lib.emu_index.argtypes = [P] + [ctypes.c_uint] * 6
    for name in ("emu_half_to_float", "emu_float_to_half", "emu_float_to_bfloat16", "emu_float2ll_rz"):
        getattr(lib, name).argtypes = [P, P, ctypes.c_int]
    lib.espo_emu_last_error.restype = ctypes.c_char_p
    lib.espo_emu_set_schedule.argtypes = [ctypes.c_ulonglong]
    yield lib
    lib.espo_emu_set_schedule(0)


def last_error(lib) -> str:
    return lib.espo_emu_last_error().decode()


@pytest.mark.parametrize("schedule", [0, 5])
def test_warp_primitives_and_barriers(lib, schedule):
    blocks = 3
    out = torch.full((blocks, 64, 12), -7, dtype=torch.int32)
    lib.espo_emu_set_schedule(schedule)
    assert lib.emu_warp(out.data_ptr(), blocks) == 0, last_error(lib)
    t = np.arange(64)
    lane = t % 32
    for b in range(blocks):
        o = out[b].numpy()
        assert (o[:, 0] == 496).all()
        assert (o[:, 1] == lane + 1).all()
        assert (o[:, 2] == np.where(lane < 31, (t + 1) * 10, t * 10)).all()
        assert (o[:, 3] == (t // 32 * 32 + 31) * 10 + b).all()
        assert (o[:, 4].view(np.uint32) == sum(1 << i for i in range(0, 32, 3))).all()
        assert (o[:, 5] == np.where(t < 32, 1, 3)).all()
        assert (o[:, 6].view(np.uint32) == (0xF << (lane // 4 * 4)).astype(np.uint32)).all()
        assert (o[:, 7] == 10).all()
        assert (o[:, 8] == 496 * 2 + 32).all()
        assert (o[:, 9] == np.where(lane < 16, lane ^ 1, -1)).all()
        assert (o[:, 10] == 496).all()
        assert (o[:40, 11] == 40).all()  # the 24 threads that returned left the barrier
        assert (o[40:, 11] == -7).all()


@pytest.mark.parametrize("grid, block", [((3, 2, 2), (4, 3, 2)), ((5, 1, 1), (33, 1, 1)), ((1, 1, 1), (1024, 1, 1))])
def test_every_block_and_thread_of_a_3d_launch_runs_once(lib, grid, block):
    counts = torch.zeros(int(np.prod(grid)) * int(np.prod(block)), dtype=torch.int32)
    assert lib.emu_index(counts.data_ptr(), *grid, *block) == 0, last_error(lib)
    assert (counts == 1).all()


def test_a_bad_launch_configuration_is_refused(lib):
    counts = torch.zeros(4096, dtype=torch.int32)
    assert lib.emu_index(counts.data_ptr(), 1, 1, 1, 2048, 1, 1) == 9  # cudaErrorInvalidConfiguration
    assert "invalid launch configuration" in last_error(lib)
    assert (counts == 0).all()


def test_a_deadlock_fails_the_launch_and_names_the_waiters(lib):
    out = torch.zeros(32, dtype=torch.int32)
    assert lib.emu_deadlock(out.data_ptr()) == 719
    msg = last_error(lib)
    assert "deadlock in block (0, 0, 0)" in msg
    assert "threads 0-15 wait at __syncthreads" in msg and "threads 16-31 wait in a warp primitive" in msg


def test_lanes_in_different_warp_primitives_deadlock(lib):
    assert lib.emu_mismatch(torch.zeros(32, dtype=torch.int32).data_ptr()) == 719
    msg = last_error(lib)
    assert "deadlock" in msg and "__shfl_xor_sync" in msg and "__ballot_sync" in msg


@pytest.mark.parametrize("schedule", [0, 9])
def test_a_lane_that_returns_while_its_warp_waits_fails_the_launch(lib, schedule):
    lib.espo_emu_set_schedule(schedule)
    assert lib.emu_lane_exit(torch.zeros(32, dtype=torch.int32).data_ptr()) == 719
    assert "returned" in last_error(lib)


def test_a_misaligned_vector_load_fails_the_launch(lib):
    data = torch.arange(16, dtype=torch.int32)
    got = torch.zeros(1, dtype=torch.int32)
    assert lib.emu_load(data.data_ptr(), 16, got.data_ptr()) == 0, last_error(lib)
    assert got.item() == 4
    assert lib.emu_load(data.data_ptr(), 4, got.data_ptr()) == 716  # cudaErrorMisalignedAddress
    assert "misaligned" in last_error(lib)


def test_half_and_bfloat16_conversions_match_torch(lib):
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    got = torch.empty(1 << 16)
    lib.emu_half_to_float(bits.data_ptr(), got.data_ptr(), 1 << 16)
    torch.testing.assert_close(got, bits.view(torch.float16).float(), rtol=0, atol=0, equal_nan=True)

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * s for s in (1e-6, 1e-3, 1.0, 1e3, 6e4)]
                  + [torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 2**-24, 2**-25, 3 * 2**-26,
                                   float("inf"), -float("inf"), 3.4e38])])
    h = torch.empty(x.numel(), dtype=torch.int16)
    lib.emu_float_to_half(x.data_ptr(), h.data_ptr(), x.numel())
    assert torch.equal(h, x.half().view(torch.int16))
    lib.emu_float_to_bfloat16(x.data_ptr(), h.data_ptr(), x.numel())
    assert torch.equal(h, x.bfloat16().view(torch.int16))


def test_float_to_int64_conversion_saturates_like_ptx(lib):
    x = torch.tensor([2.9, -2.9, 0.5, 2**62, 2**64, -(2**64), float("inf"), -float("inf"), float("nan")])
    got = torch.empty(x.numel(), dtype=torch.int64)
    lib.emu_float2ll_rz(x.data_ptr(), got.data_ptr(), x.numel())
    big = 2**63 - 1
    assert got.tolist() == [2, -2, 0, 2**62, big, -big - 1, big, -big - 1, 0]
