"""The counter-based random stream shared by every backend.

Each row's draw is Philox4x32-10 (Salmon et al., SC'11) keyed by the row's 64-bit ``seed`` and counted by
its 64-bit ``offset`` (the token's position), never by the row's index in the batch:

    key     = (seed & 0xFFFFFFFF, seed >> 32)                      seed read as an unsigned 64-bit integer
    counter = (offset & 0xFFFFFFFF, offset >> 32, stream, 0)       stream 0 is the sampling draw
    u       = (philox(key, counter)[0] >> 8) * 2**-24              a float32 uniform in [0, 1)

so the same row gives the same token alone or in any batch, and a run with early stopping draws exactly
the tokens of the same run without it, up to the stop. The Triton kernel (``espo.kernels.philox``) and
the CUDA kernel compute this same function; this module is its PyTorch definition (int64 arithmetic,
any device).
"""
from __future__ import annotations

import numpy as np
import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
SAMPLE_STREAM = 0
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a, b < 2**32: the int64 product wraps, but its low 64 bits are exact, which is all we read.
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32(
    key0: torch.Tensor, key1: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding unsigned 32-bit values; returns the four output words."""
    k0, k1 = key0 & _MASK32, key1 & _MASK32
    c0, c1, c2, c3 = (c & _MASK32 for c in (c0, c1, c2, c3))
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mul_hi_lo(PHILOX_M0, c0)
        hi1, lo1 = _mul_hi_lo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _uniform_numpy(seed: torch.Tensor, offset: torch.Tensor, stream: int) -> torch.Tensor:
    """``uniform`` on the CPU in NumPy's uint64 arithmetic: the same bits, in a tenth of the time at small batches
    (a torch op on a few rows costs microseconds of dispatch; Philox is ~100 of them)."""
    s = seed.numpy().astype(np.uint64)
    o = offset.numpy().astype(np.uint64)
    m32, sh = np.uint64(_MASK32), np.uint64(32)
    k0, k1 = s & m32, s >> sh
    c0, c1, c2, c3 = o & m32, o >> sh, np.full_like(o, stream & _MASK32), np.zeros_like(o)
    m0, m1, w0, w1 = (np.uint64(v) for v in (PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1))
    for _ in range(PHILOX_ROUNDS):
        p0, p1 = c0 * m0, c2 * m1  # < 2**64: exact in uint64
        c0, c1, c2, c3 = (p1 >> sh) ^ c1 ^ k0, p1 & m32, (p0 >> sh) ^ c3 ^ k1, p0 & m32
        k0, k1 = (k0 + w0) & m32, (k1 + w1) & m32
    return torch.from_numpy(((c0 >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32))


def uniform(seed: torch.Tensor, offset: torch.Tensor, stream: int = SAMPLE_STREAM) -> torch.Tensor:
    """float32 uniforms in [0, 1), one per (seed, offset) pair (int64 tensors of one shape)."""
    seed = seed.to(torch.int64)
    offset = offset.to(torch.int64)
    if seed.device.type == "cpu" and offset.device.type == "cpu" and seed.shape == offset.shape:
        return _uniform_numpy(seed.contiguous(), offset.contiguous(), stream)
    zero = torch.zeros_like(offset)
    r0, _, _, _ = philox4x32(seed, seed >> 32, offset, offset >> 32, zero + stream, zero)
    return (r0 >> 8).to(torch.float32) * (2.0**-24)
