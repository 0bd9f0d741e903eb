"""Rotary position embedding of q and k in one launch: one program per token rotates all its q and k heads.

``x * cos + rotate_half(x) * sin`` with transformers' rounding points in bf16/fp16: each product and the sum
rounds to the dtype, as the eager ops do (a product of two bf16/fp16 values is exact in float32, so one
rounding to the dtype equals the eager op's). Launched without FMA contraction, so float32 matches too.

With ``CACHE``, the program of each of the first ``n_cached`` tokens also stores its rotated k and its v into a
layer's KV cache (flattened to rows of one head's ``head_dim``), at ``rows[token * n_k_heads + head]``: the two
cache writes that a decode step would otherwise launch after the rotation.
"""
import torch
import triton
import triton.language as tl

from .fused_math import round_to, widen


@triton.jit
def rope_angles(cos_ptr, sin_ptr, token, cs_stride, head_dim, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """What rotating a token's heads takes: the columns [BLOCK_D], each one's partner in rotate_half and its sign, the
    mask of the real columns, and the token's cos and sin in float32."""
    cols = tl.arange(0, BLOCK_D)
    half = head_dim // 2
    first = cols < half
    partner = tl.where(first, cols + half, cols - half)
    sign = tl.where(first, -1.0, 1.0)
    in_row = cols < head_dim
    c = widen(tl.load(cos_ptr + token * cs_stride + cols, mask=in_row, other=0.0), INTERPRET)
    s = widen(tl.load(sin_ptr + token * cs_stride + cols, mask=in_row, other=0.0), INTERPRET)
    return cols, partner, sign, in_row, c, s


@triton.jit
def rotate_heads(x_ptr, x_tok_stride, x_head_stride, n_heads, c, s, cols, partner, sign, token, head_dim,
                  BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    """The token's heads of x, rotated and rounded to x's dtype: ([BLOCK_H, BLOCK_D] values, their head indices,
    the mask of the real ones)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = (heads < n_heads) & (cols[None, :] < head_dim)
    base = x_ptr + token * x_tok_stride + heads * x_head_stride
    x = tl.load(base + cols[None, :], mask=mask, other=0.0)
    rot = sign[None, :] * widen(tl.load(base + partner[None, :], mask=mask, other=0.0), INTERPRET)
    dt = x_ptr.dtype.element_ty
    a = widen(round_to(widen(x, INTERPRET) * c[None, :], dt, INTERPRET), INTERPRET)
    b = widen(round_to(rot * s[None, :], dt, INTERPRET), INTERPRET)
    return round_to(a + b, dt, INTERPRET), heads, mask


@triton.jit
def rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, rows_ptr,
                q_tok_stride, q_head_stride, k_tok_stride, k_head_stride, v_tok_stride, v_head_stride, cs_stride,
                n_q_heads, n_k_heads, head_dim, n_cached,
                BLOCK_D: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, CACHE: tl.constexpr,
                INTERPRET: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols, partner, sign, in_row, c, s = rope_angles(cos_ptr, sin_ptr, token, cs_stride, head_dim, BLOCK_D, INTERPRET)
    q, q_heads, q_mask = rotate_heads(q_ptr, q_tok_stride, q_head_stride, n_q_heads, c, s, cols, partner, sign,
                                       token, head_dim, BLOCK_QH, INTERPRET)
    tl.store(q_out_ptr + (token * n_q_heads + q_heads) * head_dim + cols[None, :], q, mask=q_mask)
    k, k_heads, k_mask = rotate_heads(k_ptr, k_tok_stride, k_head_stride, n_k_heads, c, s, cols, partner, sign,
                                       token, head_dim, BLOCK_KH, INTERPRET)
    tl.store(k_out_ptr + (token * n_k_heads + k_heads) * head_dim + cols[None, :], k, mask=k_mask)
    if CACHE:
        heads_cached = k_heads < tl.where(token < n_cached, n_k_heads, 0)  # [BLOCK_KH, 1]
        cached = k_mask & heads_cached
        rows = tl.load(rows_ptr + token * n_k_heads + k_heads, mask=heads_cached, other=0)
        tl.store(k_cache_ptr + rows * head_dim + cols[None, :], k, mask=cached)
        v = tl.load(v_ptr + token * v_tok_stride + k_heads * v_head_stride + cols[None, :], mask=cached, other=0.0)
        tl.store(v_cache_ptr + rows * head_dim + cols[None, :], v, mask=cached)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v: torch.Tensor | None = None,
            k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
            rows: torch.Tensor | None = None):
    """q [N, H, d] and k [N, Hkv, d] (last dim contiguous), cos/sin [N, d] (rows contiguous): new contiguous q, k.

    With a cache (checked by the caller: v like k with a contiguous last dim, k_cache and v_cache contiguous
    [R, d] in k's dtype, rows int64 [n * Hkv] with n <= N, distinct): the first n tokens' rotated k and their v are
    also stored at those rows of the caches."""
    N, H, d = q.shape
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                    device=k.device)
    cache = rows is not None
    v, k_cache, v_cache, rows = (v, k_cache, v_cache, rows) if cache else (k, k_out, k_out, k_out)
    if N:
        rope_kernel[(N,)](q, k, v, cos, sin, q_out, k_out, k_cache, v_cache, rows, q.stride(0), q.stride(1),
                          k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), H, k.shape[1], d,
                          rows.numel() // k.shape[1] if cache else 0, BLOCK_D=triton.next_power_of_2(d),
                          BLOCK_QH=triton.next_power_of_2(H), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
                          CACHE=cache, INTERPRET=not q.is_cuda, enable_fp_fusion=False)
    return q_out, k_out
