"""``silu(gate) * up``, the gated MLP's activation, in one launch with the eager rounding points.

silu is computed in float32 (``g / (1 + exp(-g))``, as torch does) and rounded to the dtype, then the product
is computed in float32 and rounded once (exact for bf16/fp16 operands, so equal to the eager product).
"""
import torch
import triton
import triton.language as tl

from .fused_math import exp_f32, round_to, widen

BLOCK = 1024


@triton.jit
def silu_mul_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = widen(tl.load(gate_ptr + offs, mask=mask, other=0.0), INTERPRET)
    u = widen(tl.load(up_ptr + offs, mask=mask, other=0.0), INTERPRET)
    dt = out_ptr.dtype.element_ty
    act = widen(round_to(tl.div_rn(g, 1.0 + exp_f32(-g, INTERPRET)), dt, INTERPRET), INTERPRET)
    tl.store(out_ptr + offs, round_to(act * u, dt, INTERPRET), mask=mask)


def silu_mul_flat(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate and up contiguous, of one shape and dtype (checked by the caller)."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, INTERPRET=not gate.is_cuda,
                                                  enable_fp_fusion=False)
    return out
