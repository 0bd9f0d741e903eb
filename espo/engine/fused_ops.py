"""The decoder's fused ops (RMSNorm, RoPE of q and k, silu * up, a gated MLP's gate and up GEMMs with silu * up): a
Triton kernel each, and its reference.

Each op has one name across ``kernels/`` (``espo.kernels.rms_norm``, ``.rope``, ``.silu_mul``, ``.gate_up_silu``),
this module and the tests; ``add_rms_norm`` is the RMSNorm kernel with the residual stream's add before it. Each op
runs its Triton kernel on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``, for tests), else its
reference. The ``*_reference`` functions are the computation of transformers' modules that the unfused forward
runs (``Qwen2RMSNorm.forward``, ``q * cos + rotate_half(q) * sin``, ``act_fn(gate) * up``, ``nn.Linear``), op for
op, so that the kernels are held to exactly what they replace (``gate_up_silu`` but for its GEMMs' summation
order).

Each fused op is one kernel launch where the eager ops launch several: an RMSNorm ~8 (casts, pow, mean, add,
rsqrt, mul, cast, mul), the residual add and RMSNorm ~9, the RoPE of q and k ~10 (12 with the KV-cache writes of
a decode step, which ``rope`` can do in the same launch), silu * up 2, and a decode step's gate and up GEMMs with
silu * up 3 (``gate_up_silu``, for at most ``GATE_UP_SILU_ROWS`` rows).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .kv_cache import decode_mask


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_kernel(t: torch.Tensor) -> bool:
    """Whether the ops run their Triton kernel on tensors like ``t`` (CUDA, or the CPU under the interpreter)."""
    return t.is_cuda or (t.device.type == "cpu" and _interpreting())


def fused_ops_reason(device: torch.device) -> str:
    """Why the fused ops cannot run their kernels on ``device`` ("" when they can)."""
    from espo.ops.backends import backends

    triton = backends()["triton"]
    if not triton.available:
        return triton.reason
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"the model is on {device}, and the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU)"
    return ""


# ------------------------------------------------------------------------------------------------ RMSNorm


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen2RMSNorm / Qwen3RMSNorm forward, op for op."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` [..., n] with ``weight`` [n]: one kernel launch (see the module doc)."""
    _check_weight("rms_norm", x, weight)
    if not runs_kernel(x):
        return rms_norm_reference(x, weight, eps)
    from espo.kernels.rms_norm import rms_norm_rows

    return rms_norm_rows(_rows_readable(x), weight.contiguous(), eps, torch.promote_types(weight.dtype, x.dtype))


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``h = residual + x`` (the residual stream's add), then ``rms_norm_reference(h)``: returns (normalised, h)."""
    h = residual + x
    return rms_norm_reference(h, weight, eps), h


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``h = residual + x`` and its RMSNorm in one kernel launch: returns (rms_norm(h), h)."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: residual must have x's shape and dtype {list(x.shape)} {x.dtype}, got "
                         f"{list(residual.shape)} {residual.dtype}")
    _check_weight("add_rms_norm", x, weight)
    if not runs_kernel(x):
        return add_rms_norm_reference(x, residual, weight, eps)
    from espo.kernels.rms_norm import rms_norm_rows

    x, residual = _rows_readable(x), _rows_readable(residual)
    return rms_norm_rows(x, weight.contiguous(), eps, torch.promote_types(weight.dtype, x.dtype), residual)


def _check_weight(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape [{x.shape[-1]}] (x's last dim), got {list(weight.shape)}")


def _rows_readable(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself where the kernel reads its rows in place (a contiguous last dim; more than 2 dims contiguous)."""
    return x.contiguous() if x.stride(-1) != 1 or (x.dim() > 2 and not x.is_contiguous()) else x


# ---------------------------------------------------------------------------------------------------- RoPE


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CacheWrite(NamedTuple):
    """Where ``rope`` also stores the first n tokens' rotated k and their v: a layer's KV cache as rows of one head.

    v: [N, Hkv, d], the tokens' values (k's shape and dtype). k_cache, v_cache: [R, d] contiguous, in k's dtype (a
    ``KVCache`` layer of the SDPA layout, viewed as rows). rows: int64 [n * Hkv], distinct, n <= N: token i's head h
    goes to row ``rows[i * Hkv + h]`` (``KVCache.rows``).
    """

    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    rows: torch.Tensor


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   write: CacheWrite | None = None):
    """``x * cos + rotate_half(x) * sin`` for q [N, H, d] and k [N, Hkv, d]; cos, sin [N, d] or [N, 1, d]; with
    ``write``, the cache writes as ``KVCache.write`` does them (one ``index_copy_`` each for k and v)."""
    cos, sin = cos.reshape(cos.shape[0], 1, -1), sin.reshape(sin.shape[0], 1, -1)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    if write is not None:
        n, d = write.rows.numel() // k.shape[1], k.shape[2]
        write.k_cache.index_copy_(0, write.rows, k[:n].reshape(-1, d))
        write.v_cache.index_copy_(0, write.rows, write.v[:n].reshape(-1, d))
    return q, k


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, write: CacheWrite | None = None):
    """Rotary embedding of q [N, H, d] and k [N, Hkv, d] by each token's cos, sin ([N, d] or [N, 1, d]), one launch.

    Returns new tensors (q and k are not written). With ``write`` (a ``CacheWrite``), the same launch stores the
    first n tokens' rotated k and their v into a layer's KV cache. Every tensor must have one dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or q.shape[2] % 2:
        raise ValueError(f"rope: q must be [N, H, d] and k [N, Hkv, d] with an even d, got {list(q.shape)} and "
                         f"{list(k.shape)}")
    N, d = q.shape[0], q.shape[2]
    if cos.numel() != N * d or sin.numel() != N * d:
        raise ValueError(f"rope: cos and sin must hold one row of {d} per token ([{N}, {d}]), got {list(cos.shape)} "
                         f"and {list(sin.shape)}")
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        raise TypeError(f"rope: q, k, cos and sin must have one dtype, got {q.dtype}, {k.dtype}, {cos.dtype}, "
                        f"{sin.dtype}")
    if write is not None:
        _check_cache_write(k, write)
    if not runs_kernel(q):
        return rope_reference(q, k, cos, sin, write)
    from espo.kernels.rope import rope_qk

    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos, sin = cos.reshape(N, d).contiguous(), sin.reshape(N, d).contiguous()
    if write is None:
        return rope_qk(q, k, cos, sin)
    v = write.v if write.v.stride(-1) == 1 else write.v.contiguous()
    return rope_qk(q, k, cos, sin, v, write.k_cache, write.v_cache, write.rows)


def _check_cache_write(k: torch.Tensor, write: CacheWrite) -> None:
    N, Hkv, d = k.shape
    if write.v.shape != k.shape or write.v.dtype != k.dtype:
        raise ValueError(f"rope: write.v must have k's shape and dtype {list(k.shape)} {k.dtype}, got "
                         f"{list(write.v.shape)} {write.v.dtype}")
    for name in ("k_cache", "v_cache"):
        cache = getattr(write, name)
        if cache.dim() != 2 or cache.shape[1] != d or cache.dtype != k.dtype or not cache.is_contiguous():
            raise ValueError(f"rope: write.{name} must be a contiguous [rows, {d}] {k.dtype} tensor, got "
                             f"{list(cache.shape)} {cache.dtype}{'' if cache.is_contiguous() else ' (strided)'}")
    rows = write.rows
    if rows.dtype != torch.int64 or rows.dim() != 1 or rows.numel() % Hkv or rows.numel() > N * Hkv:
        raise ValueError(f"rope: write.rows must be int64 [n * {Hkv}] with n <= {N} tokens, got {rows.dtype} "
                         f"{list(rows.shape)}")


# --------------------------------------------------------------------------------------- rope_decode_attention

# Whether the fused path's decode steps run rope_decode_attention (SDPA cache layout): one launch a layer for RoPE, the
# cache write and the attention, instead of rope's and SDPA's (and the decode masks and cache rows of each forward).
# Off until a GPU run has timed it against SDPA; bench_decode.py --rope-decode-attention turns it on.
ROPE_DECODE_ATTENTION = False


def rope_decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    seqlens: torch.Tensor, window: int | None, scale: float) -> torch.Tensor:
    """``rope_reference``, the cache write as ``KVCache.write`` does it, then SDPA over the cache with
    ``kv_cache.decode_mask``, the heads sharing a KV head as its query rows."""
    B, H, d = q.shape
    Hkv = k.shape[1]
    q, k = rope_reference(q, k, cos, sin)
    rows = torch.arange(B, device=q.device)
    k_cache[rows, :, seqlens] = k
    v_cache[rows, :, seqlens] = v
    length = int(seqlens.max()) + 1 if B else 1
    mask = decode_mask(seqlens, length, window, torch.arange(length, device=q.device), q.dtype)
    out = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, d), k_cache[:B, :, :length],
                                         v_cache[:B, :, :length], attn_mask=mask, scale=scale)
    return out.reshape(B, H, d)


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, window: int | None,
                          scale: float) -> torch.Tensor:
    """One decode step's attention in one launch: RoPE of q [B, H, d] and k [B, Hkv, d] by cos, sin ([B, d] or
    [B, 1, d]); the rotated k and v [B, Hkv, d] stored in a layer's caches ([slots >= B, Hkv, max_len, d], the SDPA
    layout of ``KVCache``: row i is slot i) at position ``seqlens[i]`` (int64 [B]); and each row's attention over its
    slot's positions up to and including that one (within ``window``, if any), as SDPA computes it with the decode
    mask. Returns [B, H, d]. The cached k and v are rope's and ``KVCache.write``'s bits; the output is within an ulp
    of SDPA's (summed in another order)."""
    B, H, d = q.shape
    if k.dim() != 3 or v.shape != k.shape or k.shape[0] != B or k.shape[2] != d or H % k.shape[1] or d % 2:
        raise ValueError(f"rope_decode_attention: q must be [B, H, d], k and v [B, Hkv, d] with H a multiple of Hkv "
                         f"and d even, got {list(q.shape)}, {list(k.shape)} and {list(v.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (cache.dim() != 4 or cache.shape[0] < B or cache.shape[1] != k.shape[1] or cache.shape[3] != d
                or not cache.is_contiguous()):
            raise ValueError(f"rope_decode_attention: {name} must be a contiguous [slots >= {B}, {k.shape[1]}, "
                             f"max_len, {d}] tensor, got {list(cache.shape)}")
    if len({q.dtype, k.dtype, v.dtype, cos.dtype, sin.dtype, k_cache.dtype, v_cache.dtype}) != 1:
        raise TypeError("rope_decode_attention: q, k, v, cos, sin and the caches must have one dtype")
    if seqlens.dtype != torch.int64 or seqlens.shape != (B,):
        raise ValueError(f"rope_decode_attention: seqlens must be int64 [{B}], got {seqlens.dtype} "
                         f"{list(seqlens.shape)}")
    if not runs_kernel(q):
        return rope_decode_attention_reference(q, k, v, cos, sin, k_cache, v_cache, seqlens, window, scale)
    from espo.kernels.rope_decode_attention import rope_decode_attention as kernel

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cos, sin = cos.reshape(B, d).contiguous(), sin.reshape(B, d).contiguous()
    return kernel(q, k, v, cos, sin, k_cache, v_cache, seqlens, window, scale)


# ------------------------------------------------------------------------------------------------ gate_up_silu

# x with at most this many rows (a decode step's) runs gate_up_silu; more rows (prefills) run cuBLAS's two GEMMs and
# silu_mul. 0: never (bench_decode.py --no-gate-up-silu times the fused path without it).
GATE_UP_SILU_ROWS = 64


def gate_up_silu_reference(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """``act_fn(gate_proj(x)) * up_proj(x)`` of a gated MLP with act "silu" and no biases, as the modules run it."""
    return silu_mul_reference(F.linear(x, gate_weight), F.linear(x, up_weight))


def gate_up_silu(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """``silu(x @ gate_weight^T) * (x @ up_weight^T)`` for x [M, K] (M <= 64) and weights [N, K], in one launch.

    The GEMMs' float32 sums run in another order than cuBLAS's, so a bf16 result can differ from the reference by
    an ulp or two now and then (tests/engine/test_fused_ops.py); the rest is ``silu_mul``'s arithmetic.
    """
    from espo.kernels.gate_up_silu import MAX_ROWS

    if x.dim() != 2 or x.shape[0] > MAX_ROWS:
        raise ValueError(f"gate_up_silu: x must be [M, K] with M <= {MAX_ROWS} rows, got {list(x.shape)}")
    if gate_weight.dim() != 2 or gate_weight.shape != up_weight.shape or gate_weight.shape[1] != x.shape[1]:
        raise ValueError(f"gate_up_silu: gate_weight and up_weight must both be [N, {x.shape[1]}], got "
                         f"{list(gate_weight.shape)} and {list(up_weight.shape)}")
    if len({x.dtype, gate_weight.dtype, up_weight.dtype}) != 1:
        raise TypeError(f"gate_up_silu: x and the weights must have one dtype, got {x.dtype}, {gate_weight.dtype}, "
                        f"{up_weight.dtype}")
    if not runs_kernel(x):
        return gate_up_silu_reference(x, gate_weight, up_weight)
    from espo.kernels.gate_up_silu import gate_up_silu_rows

    return gate_up_silu_rows(x if x.stride(-1) == 1 else x.contiguous(), gate_weight.contiguous(),
                             up_weight.contiguous())


# ------------------------------------------------------------------------------------------------ silu_mul


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: a transformers gated MLP's ``act_fn(gate_proj(x)) * up_proj(x)`` with act "silu"."""
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for two tensors of one shape and dtype, in one launch."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate and up must have one shape and dtype, got {list(gate.shape)} {gate.dtype} "
                         f"and {list(up.shape)} {up.dtype}")
    if not runs_kernel(gate):
        return silu_mul_reference(gate, up)
    from espo.kernels.silu_mul import silu_mul_flat

    return silu_mul_flat(gate.contiguous(), up.contiguous())
