"""Rotary position embedding of q and k in one launch: one program per token rotates all its q and k heads.

``x * cos + rotate_half(x) * sin`` with transformers' rounding points in bf16/fp16: each product and the sum
rounds to the dtype, as the eager ops do (a product of two bf16/fp16 values is exact in float32, so one
rounding to the dtype equals the eager op's). Launched without FMA contraction, so float32 matches too.
"""
import torch
import triton
import triton.language as tl

from .fused_math import round_to, widen


@triton.jit
def _rotate_heads(x_ptr, out_ptr, x_tok_stride, x_head_stride, n_heads, c, s, cols, partner, sign, token,
                  head_dim, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = (heads < n_heads) & (cols[None, :] < head_dim)
    base = x_ptr + token * x_tok_stride + heads * x_head_stride
    x = tl.load(base + cols[None, :], mask=mask, other=0.0)
    rot = sign[None, :] * widen(tl.load(base + partner[None, :], mask=mask, other=0.0), INTERPRET)
    dt = x_ptr.dtype.element_ty
    a = widen(round_to(widen(x, INTERPRET) * c[None, :], dt, INTERPRET), INTERPRET)
    b = widen(round_to(rot * s[None, :], dt, INTERPRET), INTERPRET)
    out_base = out_ptr + token * n_heads * head_dim + heads * head_dim
    tl.store(out_base + cols[None, :], round_to(a + b, dt, INTERPRET), mask=mask)


@triton.jit
def rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, q_tok_stride, q_head_stride, k_tok_stride,
                k_head_stride, cs_stride, n_q_heads, n_k_heads, head_dim,
                BLOCK_D: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, INTERPRET: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    half = head_dim // 2
    first = cols < half
    partner = tl.where(first, cols + half, cols - half)
    sign = tl.where(first, -1.0, 1.0)
    in_row = cols < head_dim
    c = widen(tl.load(cos_ptr + token * cs_stride + cols, mask=in_row, other=0.0), INTERPRET)
    s = widen(tl.load(sin_ptr + token * cs_stride + cols, mask=in_row, other=0.0), INTERPRET)
    _rotate_heads(q_ptr, q_out_ptr, q_tok_stride, q_head_stride, n_q_heads, c, s, cols, partner, sign, token,
                  head_dim, BLOCK_QH, INTERPRET)
    _rotate_heads(k_ptr, k_out_ptr, k_tok_stride, k_head_stride, n_k_heads, c, s, cols, partner, sign, token,
                  head_dim, BLOCK_KH, INTERPRET)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, H, d] and k [N, Hkv, d] (last dim contiguous), cos/sin [N, d] (rows contiguous): new contiguous q, k."""
    N, H, d = q.shape
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                    device=k.device)
    if N:
        rope_kernel[(N,)](q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                          cos.stride(0), H, k.shape[1], d, BLOCK_D=triton.next_power_of_2(d),
                          BLOCK_QH=triton.next_power_of_2(H), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
                          INTERPRET=not q.is_cuda, enable_fp_fusion=False)
    return q_out, k_out
