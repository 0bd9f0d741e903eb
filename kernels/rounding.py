"""Rounding a float32 value to a narrower float dtype, to nearest even, on the GPU and under the interpreter alike.

The GPU's conversion to bf16 rounds to nearest even; the Triton interpreter's truncates (and its "rtne" mode
rounds ties away from zero), so under the interpreter bf16 is rounded here on the bits. fp16 and float32 are
converted by numpy, which rounds to nearest even.
"""
import triton
import triton.language as tl


@triton.jit
def round_to(x, dt: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``dt`` (returned in ``dt``)."""
    if INTERPRET and dt == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        kept = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # the low 16 bits are then zero: truncating is exact
        return tl.where(x != x, float("nan"), kept.to(tl.float32, bitcast=True)).to(dt)
    else:
        return x.to(dt)
