"""Philox4x32-10 as a Triton device function: the stream defined in ``espo/rng.py``."""
import triton
import triton.language as tl


@triton.jit
def philox_uniform(key0, key1, c0, c1, STREAM: tl.constexpr):
    """A float32 uniform in [0, 1) from key (key0, key1) and counter (c0, c1, STREAM, 0), all uint32."""
    c2 = tl.full(c0.shape, STREAM, tl.uint32)
    c3 = tl.full(c0.shape, 0, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
        key0 = key0 + 0x9E3779B9
        key1 = key1 + 0xBB67AE85
    return (c0 >> 8).to(tl.float32) * 5.9604644775390625e-08
