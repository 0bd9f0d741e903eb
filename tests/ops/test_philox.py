"""The Philox stream: known-answer vectors, the Triton device function against torch, uniformity."""
import numpy as np
import pytest
import torch
from conftest import available_backends

from espo.ops.philox import philox4x32, uniform

# Random123's known-answer vectors for philox4x32-10: (key, counter, expected output).
KAT = [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("key, counter, expected", KAT)
def test_philox_known_answers(key, counter, expected):
    as_t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    out = philox4x32(*(as_t(k) for k in key), *(as_t(c) for c in counter))
    assert [int(o) for o in out] == list(expected)


def test_uniform_is_uniform_and_keyed_by_seed_and_offset():
    n = 200_000
    u = uniform(torch.full((n,), 1234), torch.arange(n)).numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    hist = np.histogram(u, bins=50, range=(0, 1))[0]
    expected = n / 50
    assert ((hist - expected) ** 2 / expected).sum() < 49 + 7 * np.sqrt(98) + 10
    # neighbouring seeds and offsets give unrelated draws
    a = uniform(torch.arange(n), torch.zeros(n, dtype=torch.int64)).numpy()
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02
    assert not np.array_equal(uniform(torch.tensor([1]), torch.tensor([5])),
                              uniform(torch.tensor([2]), torch.tensor([5])))


HAVE_TRITON = "triton" in available_backends()
if HAVE_TRITON:
    import triton
    import triton.language as tl
    from espo.kernels.philox import philox_uniform

    @triton.jit
    def _draw(seed_ptr, offset_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        seed = tl.load(seed_ptr + i)
        offset = tl.load(offset_ptr + i)
        u = philox_uniform((seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32),
                           (offset & 0xFFFFFFFF).to(tl.uint32), ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32), 0)
        tl.store(out_ptr + i, u)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton backend unavailable")
def test_triton_philox_equals_torch():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    seed = torch.randint(-(2**63), 2**63 - 1, (256,), generator=g, dtype=torch.int64)
    offset = torch.randint(0, 2**40, (256,), generator=g, dtype=torch.int64)
    out = torch.empty(256, device=device)
    _draw[(1,)](seed.to(device), offset.to(device), out, N=256)
    torch.testing.assert_close(out.cpu(), uniform(seed, offset), rtol=0, atol=0)
