"""RMSNorm as transformers' Llama/Qwen2/Qwen3 RMSNorm computes it, in one launch: one program per row.

``y = weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype)``, the normalisation in float32, the product with the
weight computed in float32 and rounded once to the output dtype (what a bf16 x bf16 product does in torch).
Rows of any length (the hidden size, or a head's dimension for Qwen3's q_norm/k_norm); the row stride is an
argument, so a 2-D view with strided rows is read in place. With a residual (HAS_RESIDUAL), the row normalised is
``x + residual`` rounded to the dtype (the residual stream's add, as torch rounds it), which is stored as well.
"""
import torch
import triton
import triton.language as tl

from .fused_math import round_to, rsqrt_f32, widen


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, out_ptr, x_row_stride, res_row_stride, out_row_stride, n_cols,
                    n_cols_f, eps, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = widen(tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0), INTERPRET)
    if HAS_RESIDUAL:
        r = widen(tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0), INTERPRET)
        total = round_to(r + x, x_ptr.dtype.element_ty, INTERPRET)
        tl.store(sum_ptr + row * out_row_stride + cols, total, mask=mask)
        x = widen(total, INTERPRET)
    variance = tl.div_rn(tl.sum(x * x, axis=0), n_cols_f)  # n_cols_f: n_cols as a float32 argument
    normed = round_to(x * rsqrt_f32(variance + eps, INTERPRET), x_ptr.dtype.element_ty, INTERPRET)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = widen(w, INTERPRET) * widen(normed, INTERPRET)
    tl.store(out_ptr + row * out_row_stride + cols, round_to(y, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                  residual: torch.Tensor | None = None):
    """The kernel over the rows of ``x`` [..., n] (checked by the caller: weight [n], last dim contiguous; a
    residual of x's shape and dtype). Returns the normalised rows, and with a residual (normalised, x + residual)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n) if x.dim() != 2 else x  # a view for contiguous leading dims; a 2-D x keeps its stride
    res = rows if residual is None else (residual.reshape(-1, n) if residual.dim() != 2 else residual)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = out if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        rms_norm_kernel[(rows.shape[0],)](rows, res, total, weight, out, rows.stride(0), res.stride(0), n, n, float(n),
                                          float(eps), BLOCK=triton.next_power_of_2(n),
                                          HAS_RESIDUAL=residual is not None, INTERPRET=not x.is_cuda,
                                          enable_fp_fusion=False)
    return out if residual is None else (out, total)
