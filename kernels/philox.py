"""Philox4x32-10 as a Triton device function: the stream defined in ``espo/ops/philox.py`` (its constants too)."""
import triton
import triton.language as tl

from espo.ops import philox

_M0 = tl.constexpr(philox.PHILOX_M0)
_M1 = tl.constexpr(philox.PHILOX_M1)
_W0 = tl.constexpr(philox.PHILOX_W0)
_W1 = tl.constexpr(philox.PHILOX_W1)
_ROUNDS = tl.constexpr(philox.PHILOX_ROUNDS)


@triton.jit
def philox_uniform(key0, key1, c0, c1, STREAM: tl.constexpr):
    """A float32 uniform in [0, 1) from key (key0, key1) and counter (c0, c1, STREAM, 0), all uint32."""
    c2 = tl.full(c0.shape, STREAM, tl.uint32)
    c3 = tl.full(c0.shape, 0, tl.uint32)
    for _ in tl.static_range(_ROUNDS):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
        key0 = key0 + _W0
        key1 = key1 + _W1
    return (c0 >> 8).to(tl.float32) * 5.9604644775390625e-08
