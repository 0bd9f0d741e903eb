"""The CUDA sources on the host, no GPU needed: csrc/philox.cuh against espo.ops.philox bit for bit, and the
chunking rule and integer-mass shift of csrc/sample.cuh against the reference's and the Triton backend's.

A tiny C++ program includes the headers (which must need neither CUDA nor torch headers), is compiled with
whatever C++ compiler is here (c++, g++, clang++ or nvcc), and prints what the tests compare.
"""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from espo.ops.philox import uniform

CSRC = Path(__file__).resolve().parents[2] / "csrc"

PROGRAM = r"""
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include "philox.cuh"
#include "sample.cuh"

// stdin: lines "u SEED OFFSET", "p K0 K1 C0 C1 C2 C3", "c V" or "s V"; stdout: one answer line each.
int main() {
  char kind[4];
  while (std::scanf("%3s", kind) == 1) {
    if (std::strcmp(kind, "u") == 0) {
      long long seed, offset;
      if (std::scanf("%lld %lld", &seed, &offset) != 2) return 2;
      const float u = espo::philox_uniform(static_cast<int64_t>(seed), static_cast<int64_t>(offset));
      uint32_t bits;
      std::memcpy(&bits, &u, sizeof bits);
      std::printf("%" PRIu32 "\n", bits);
    } else if (std::strcmp(kind, "p") == 0) {
      unsigned long long w[6];
      for (int i = 0; i < 6; ++i)
        if (std::scanf("%llu", &w[i]) != 1) return 2;
      const espo::Philox4 r = espo::philox4x32(w[0], w[1], w[2], w[3], w[4], w[5]);
      std::printf("%" PRIu32 " %" PRIu32 " %" PRIu32 " %" PRIu32 "\n", r.v[0], r.v[1], r.v[2], r.v[3]);
    } else if (std::strcmp(kind, "c") == 0) {
      long long v;
      if (std::scanf("%lld", &v) != 1) return 2;
      std::printf("%lld %lld\n", static_cast<long long>(espo::chunk_size(v)),
                  static_cast<long long>(espo::num_chunks(v)));
    } else if (std::strcmp(kind, "s") == 0) {
      long long v;
      if (std::scanf("%lld", &v) != 1) return 2;
      std::printf("%d\n", espo::mass_shift(v));
    } else {
      return 3;
    }
  }
  return 0;
}
"""


def _compilers():
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            yield [path, "-std=c++17", "-O2", "-Wall", "-Werror", "-x", "c++"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        yield [nvcc, "-std=c++17", "-O2", "-x", "c++"]


@pytest.fixture(scope="module")
def host_program(tmp_path_factory):
    """Path of the compiled program; skips when no compiler here can build it."""
    tmp = tmp_path_factory.mktemp("cuda_host")
    src = tmp / "host.cpp"
    src.write_text(PROGRAM)
    errors = []
    for cmd in _compilers():
        exe = tmp / "host"
        proc = subprocess.run(cmd + [f"-I{CSRC}", str(src), "-o", str(exe)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode == 0:
            return exe
        errors.append(f"{cmd[0]}: {proc.stderr[-2000:]}")
    if not errors:
        pytest.skip("no C++ compiler (c++, g++, clang++ or nvcc) on this machine")
    pytest.fail("the host program including csrc/philox.cuh and csrc/sample.cuh does not compile:\n"
                + "\n".join(errors))


def _ask(exe, lines):
    proc = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
                          check=True)
    return proc.stdout.split("\n")[: len(lines)]


# Random123's known-answer vectors for philox4x32-10 (as in tests/ops/test_philox.py).
KAT = [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_cuda_philox_known_answers(host_program):
    answers = _ask(host_program, [f"p {' '.join(map(str, key + counter))}" for key, counter, _ in KAT])
    for (_, _, expected), line in zip(KAT, answers):
        assert [int(w) for w in line.split()] == list(expected)


def test_cuda_philox_uniform_equals_espo_rng_bit_for_bit(host_program):
    g = torch.Generator().manual_seed(0)
    n = 4000
    seed = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    offset = torch.cat([
        torch.randint(0, 2**62, (n // 2,), generator=g, dtype=torch.int64),
        torch.randint(0, 100_000, (n // 2,), generator=g, dtype=torch.int64),
    ])
    edges_s = torch.tensor([0, -1, 1, 2**32 - 1, 2**32, -(2**63), 2**63 - 1, 12345], dtype=torch.int64)
    edges_o = torch.tensor([0, 2**63 - 1, 2**32 - 1, 2**32, 1, 0, 7, 2**40], dtype=torch.int64)
    seed, offset = torch.cat([seed, edges_s]), torch.cat([offset, edges_o])
    got = _ask(host_program, [f"u {s} {o}" for s, o in zip(seed.tolist(), offset.tolist())])
    got_bits = torch.tensor([int(x) for x in got], dtype=torch.int64)
    want_bits = uniform(seed, offset).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    mismatch = (got_bits != want_bits).nonzero().flatten()
    assert mismatch.numel() == 0, (f"{mismatch.numel()} uniforms differ, first at seed={seed[mismatch[0]]}, "
                                   f"offset={offset[mismatch[0]]}")


def _triton_chunk_size():
    try:
        from espo.kernels.sample import chunk_size

        return chunk_size
    except ImportError:
        return None


def test_cuda_chunk_size_equals_triton(host_program):
    vocab = list(range(1, 5000)) + [32000, 32064, 49152, 50257, 65536, 128256, 151936, 196608, 196609, 256000, 10**6,
                                    2**31 - 4097]
    got = _ask(host_program, [f"c {v}" for v in vocab])
    triton_chunk = _triton_chunk_size()
    for v, line in zip(vocab, got):
        chunk, count = (int(x) for x in line.split())
        # the rule itself: a power of two in [16, 4096], about 48 chunks a row
        want = max(16, min(4096, 1 << max(0, (-(-v // 48) - 1).bit_length())))
        assert chunk == want, f"V={v}: chunk {chunk} != {want}"
        assert count == -(-v // chunk)
        if triton_chunk is not None:
            assert chunk == triton_chunk(v), f"V={v}: CUDA chunk {chunk} != Triton chunk {triton_chunk(v)}"


def test_cuda_mass_shift_equals_reference(host_program):
    from espo.ops.reference import chunk_size, mass_shift

    vocab = list(range(1, 3000)) + [4099, 32000, 151936, 2**21, 2**22 - 1, 2**22, 2**22 + 1, 10**7, 2**31 - 4097]
    shifts = _ask(host_program, [f"s {v}" for v in vocab])
    chunks = _ask(host_program, [f"c {v}" for v in vocab])
    for v, s, c in zip(vocab, shifts, chunks):
        assert int(s) == mass_shift(v), f"V={v}: CUDA shift {s} != reference {mass_shift(v)}"
        assert int(c.split()[0]) == chunk_size(v), f"V={v}: CUDA chunk {c} != reference {chunk_size(v)}"
