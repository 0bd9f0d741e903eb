"""A decode step's attention in one launch: RoPE of the new token's q and k, its k and v stored into the KV cache,
and its attention over the cache (``espo.engine.fused_ops.rope_decode_attention``).

One program per (row, KV head): it rotates the KV head's k and the q heads that share it (GQA: a group of
``GROUP`` query heads), with rope's own rounding (kernels/rope.py, so the cached k is the bits that rope and
``KVCache.write`` store), stores k and v at the row's position of its slot (row i is slot i, the SDPA layout
[slots, kv_heads, max_len, head_dim] of one layer), and attends: the new token itself from registers, the cached
positions before it (those within the sliding window, if any) in blocks of ``BLOCK_N``, with an online softmax
in float32 (q.k on tensor cores in bf16/fp16, whose products are exact in float32; IEEE products otherwise, no
TF32). The output is rounded to the dtype once, as SDPA's is; SDPA sums in another order, so a bf16 output moves
by an ulp now and then.
"""
import torch
import triton
import triton.language as tl

from .fused_math import round_to, widen
from .rope import rope_angles, rotate_heads

LOG2E = 1.4426950408889634


@triton.jit
def rope_decode_attention_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, seqlens_ptr,
                                 out_ptr, q_tok_stride, q_head_stride, k_tok_stride, k_head_stride, v_tok_stride,
                                 v_head_stride, cs_stride, n_kv_heads, max_len, head_dim, window, scale_log2,
                                 GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    cols, partner, sign, in_row, c, s = rope_angles(cos_ptr, sin_ptr, row, cs_stride, head_dim, BLOCK_D, INTERPRET)
    # the group's q heads [BLOCK_G, BLOCK_D] and the KV head's k [BLOCK_G, BLOCK_D] (row 0 real), rotated and rounded
    q, _, q_mask = rotate_heads(q_ptr + kv_head * GROUP * q_head_stride, q_tok_stride, q_head_stride, GROUP, c, s,
                                 cols, partner, sign, row, head_dim, BLOCK_G, INTERPRET)
    k, k_heads, k_mask = rotate_heads(k_ptr + kv_head * k_head_stride, k_tok_stride, k_head_stride, 1, c, s, cols,
                                       partner, sign, row, head_dim, BLOCK_G, INTERPRET)
    tile = k_heads * 0 + cols[None, :]  # column offsets in k's [BLOCK_G, BLOCK_D] tile, whose row 0 is the KV head
    v = tl.load(v_ptr + row * v_tok_stride + kv_head * v_head_stride + tile, mask=k_mask, other=0.0)
    pos = tl.load(seqlens_ptr + row)
    slot_base = (row * n_kv_heads + kv_head) * max_len * head_dim  # this slot's and head's [max_len, head_dim]
    tl.store(k_cache_ptr + slot_base + pos * head_dim + tile, k, mask=k_mask)
    tl.store(v_cache_ptr + slot_base + pos * head_dim + tile, v, mask=k_mask)

    dt = out_ptr.dtype.element_ty
    qf = widen(q, INTERPRET)  # [BLOCK_G, BLOCK_D]
    kf = tl.sum(widen(k, INTERPRET), axis=0)  # row 0's k (the other rows are 0)
    vf = tl.sum(widen(v, INTERPRET), axis=0)
    # the new token itself: the softmax's first term (scores in base 2: log2(e) * scale folded in)
    m = tl.sum(qf * kf[None, :], axis=1) * scale_log2  # [BLOCK_G]
    denom = tl.full((BLOCK_G,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32) + vf[None, :]
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0)
    keys = tl.arange(0, BLOCK_N)
    for start in range(lo, pos, BLOCK_N):
        p = start + keys  # [BLOCK_N] cached positions
        seen = p < pos
        at = slot_base + p[:, None] * head_dim + cols[None, :]
        both = seen[:, None] & in_row[None, :]
        kb = tl.load(k_cache_ptr + at, mask=both, other=0.0)  # [BLOCK_N, BLOCK_D]
        vb = widen(tl.load(v_cache_ptr + at, mask=both, other=0.0), INTERPRET)
        if INTERPRET or dt == tl.float32:  # the interpreter's dot misreads bf16; float32: IEEE products, no TF32
            scores = tl.dot(qf, tl.trans(widen(kb, INTERPRET)), input_precision="ieee")
        else:  # bf16/fp16 operands on tensor cores: each product exact in float32, as above, and summed in float32
            scores = tl.dot(q, tl.trans(kb))
        scores = scores * scale_log2  # [BLOCK_G, BLOCK_N]
        scores = tl.where(seen[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.math.exp2(m - m_new)
        weights = tl.math.exp2(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(weights, axis=1)
        acc = acc * alpha[:, None] + tl.dot(weights, vb, input_precision="ieee")
        m = m_new
    out = acc / denom[:, None]
    heads = tl.arange(0, BLOCK_G)[:, None]
    tl.store(out_ptr + (row * n_kv_heads * GROUP + kv_head * GROUP + heads) * head_dim + cols[None, :],
             round_to(out, dt, INTERPRET), mask=q_mask)


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, window: int | None,
                          scale: float) -> torch.Tensor:
    """q [B, H, d], k and v [B, Hkv, d] (last dim contiguous), cos/sin [B, d] (rows contiguous), a layer's caches
    [slots >= B, Hkv, max_len, d] contiguous, seqlens int64 [B] (each row's position, < max_len): the attention
    output [B, H, d] (checked by the caller: one dtype, H a multiple of Hkv)."""
    B, H, d = q.shape
    Hkv = k.shape[1]
    out = torch.empty((B, H, d), dtype=q.dtype, device=q.device)
    if B:
        interpret = not q.is_cuda
        rope_decode_attention_kernel[(B, Hkv)](
            q, k, v, cos, sin, k_cache, v_cache, seqlens, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), cos.stride(0), Hkv, k_cache.shape[2], d, 0 if window is None else int(window),
            float(scale) * LOG2E, GROUP=H // Hkv, BLOCK_G=max(16, triton.next_power_of_2(H // Hkv)),
            BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=16 if interpret else 32,
            HAS_WINDOW=window is not None, INTERPRET=interpret, enable_fp_fusion=False,
        )
    return out
