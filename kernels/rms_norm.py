"""RMSNorm as transformers' Llama/Qwen2/Qwen3 RMSNorm computes it, in one launch: one program per row.

``y = weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype)``, the normalisation in float32, the product with the
weight computed in float32 and rounded once to the output dtype (what a bf16 x bf16 product does in torch).
Rows of any length (the hidden size, or a head's dimension for Qwen3's q_norm/k_norm); the row stride is an
argument, so a 2-D view with strided rows is read in place.
"""
import torch
import triton
import triton.language as tl

from .fused_math import round_to, rsqrt_f32, widen


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_row_stride, out_row_stride, n_cols, n_cols_f, eps, BLOCK: tl.constexpr,
                    INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = widen(tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0), INTERPRET)
    variance = tl.div_rn(tl.sum(x * x, axis=0), n_cols_f)  # n_cols_f: n_cols as a float32 argument
    normed = round_to(x * rsqrt_f32(variance + eps, INTERPRET), x_ptr.dtype.element_ty, INTERPRET)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = widen(w, INTERPRET) * widen(normed, INTERPRET)
    tl.store(out_ptr + row * out_row_stride + cols, round_to(y, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The kernel over the rows of ``x`` [..., n] (checked by the caller: weight [n], last dim contiguous)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n) if x.dim() != 2 else x  # a view for contiguous leading dims; a 2-D x keeps its stride
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0]:
        rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), n, n, float(n), float(eps),
                                          BLOCK=triton.next_power_of_2(n), INTERPRET=not x.is_cuda,
                                          enable_fp_fusion=False)
    return out
