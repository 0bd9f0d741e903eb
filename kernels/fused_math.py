"""The fused ops' float arithmetic, the same on the GPU and under the interpreter where the math allows.

Conversions between float32 and the narrower float dtypes are exact on both.

On the GPU, bf16 -> float32 is exact and float32 -> bf16 rounds to nearest even. The Triton interpreter's bf16
conversions are not: its float32 -> bf16 truncates (and its "rtne" mode rounds ties away from zero), and its
bf16 -> float32 misreads subnormals. Under the interpreter bf16 is therefore converted here on the bits. fp16
goes through numpy, which is exact. exp and rsqrt are the CUDA math library's on the GPU (torch's choice there).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def widen(x, INTERPRET: tl.constexpr):
    """``x`` (float32, bf16 or fp16) as float32, exactly."""
    if INTERPRET and x.dtype == tl.bfloat16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_to(x, dt: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``dt`` (returned in ``dt``)."""
    if INTERPRET and dt == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        kept = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # NaN payloads aside, the bits of the rounded value
        kept = tl.where(x != x, 0x7FC0, kept)
        return kept.to(tl.int16).to(dt, bitcast=True)
    else:
        return x.to(dt)


@triton.jit
def exp_f32(x, INTERPRET: tl.constexpr):
    """exp in float32: on the GPU the CUDA math library's expf, which torch's CUDA kernels call (tl.exp is
    ex2.approx of a rounded x * log2(e), tens of ulps off for large |x|); numpy's exp under the interpreter."""
    if INTERPRET:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def rsqrt_f32(x, INTERPRET: tl.constexpr):
    """1 / sqrt(x) in float32: on the GPU the CUDA math library's rsqrtf, which torch.rsqrt calls on a GPU;
    the correctly rounded 1 / sqrt under the interpreter (torch's CPU rsqrt is within an ulp of it)."""
    if INTERPRET:
        return tl.div_rn(1.0, tl.sqrt_rn(x))
    else:
        return libdevice.rsqrt(x)
