"""The decoder's own slotted KV cache and the attention calls that read it.

One K and one V tensor hold every layer's cache for a fixed pool of slots:

    layout "flash": [layers, slots, max_seq_len, kv_heads, head_dim]   (what flash_attn_with_kvcache reads)
    layout "sdpa":  [layers, slots, kv_heads, max_seq_len, head_dim]   (a slice is SDPA's [B, H, L, D] as is)

A slot holds one sequence, positions 0 .. length-1. The decoder keeps its live sequences in slots
0 .. n_live-1 (moving a sequence down when a lower slot frees up), so a decode step reads the leading
slots of the cache as a view, with no gather. Attention is flash-attn's kernels when flash-attn is
importable and the cache is fp16/bf16 on a GPU, PyTorch SDPA otherwise (any device and dtype).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """Whether flash-attn (``flash_attn_with_kvcache``, ``flash_attn_varlen_func``) can be imported."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: F401
    except Exception:  # a broken build (ABI mismatch with torch) must not take the decoder down
        return False
    return True


def resolve_attention(attention: str, device: torch.device, dtype: torch.dtype) -> str:
    """"flash" or "sdpa" for ``attention`` in ("auto", "flash", "sdpa") on this device and dtype."""
    if attention not in ("auto", "flash", "sdpa"):
        raise ValueError(f"attention must be 'auto', 'flash' or 'sdpa', got {attention!r}")
    flash_ok = flash_attn_available() and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if attention == "flash" and not flash_ok:
        raise ValueError(
            "attention='flash' needs flash-attn installed (pip install flash-attn), a CUDA device and a "
            f"float16/bfloat16 model; here: flash-attn {'importable' if flash_attn_available() else 'missing'}, "
            f"device {device}, dtype {dtype}. Use attention='sdpa' or 'auto'"
        )
    if attention == "auto":
        return "flash" if flash_ok else "sdpa"
    return attention


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache:
    """K and V for ``slots`` sequences of up to ``max_seq_len`` tokens, for every layer."""

    def __init__(
        self,
        num_layers: int,
        slots: int,
        max_seq_len: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        layout: str,
    ):
        if layout not in ("flash", "sdpa"):
            raise ValueError(f"layout must be 'flash' or 'sdpa', got {layout!r}")
        self.layout = layout
        self.num_layers, self.slots, self.max_seq_len = num_layers, slots, max_seq_len
        self.kv_heads, self.head_dim = kv_heads, head_dim
        if layout == "flash":
            shape = (num_layers, slots, max_seq_len, kv_heads, head_dim)
        else:
            shape = (num_layers, slots, kv_heads, max_seq_len, head_dim)
        self.k = _alloc(shape, dtype, device)
        self.v = _alloc(shape, dtype, device)

    @staticmethod
    def nbytes_for(num_layers: int, slots: int, max_seq_len: int, kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
        """Bytes of K plus V for these sizes."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * slots * max_seq_len * kv_heads * head_dim * itemsize

    def rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The rows of a layer's flattened cache that hold (slots[i], positions[i]), for ``write``: the same in
        every layer, so that a forward computes them once rather than once per layer (five kernels each)."""
        H, L = self.kv_heads, self.max_seq_len
        if self.layout == "flash":  # [slots, max_seq_len, kv_heads, head_dim]: a row is one position's heads
            return slots * L + positions
        heads = torch.arange(H, device=slots.device)  # [slots, kv_heads, max_seq_len, head_dim]: one head's position
        return ((slots[:, None] * H + heads) * L + positions[:, None]).reshape(-1)

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [N, kv_heads, head_dim] at ``rows`` = ``self.rows(slots, positions)`` (distinct pairs).

        As one ``index_copy_`` of rows of the layer's flattened cache: the same values as
        ``cache[layer][slots, :, positions] = k``, which the CPU runs several times slower (an advanced index split
        by a slice)."""
        k_rows, v_rows = self.as_rows(layer)
        k_rows.index_copy_(0, rows, k.reshape(-1, k_rows.shape[1]))
        v_rows.index_copy_(0, rows, v.reshape(-1, v_rows.shape[1]))

    def as_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V caches as the rows that ``rows`` indexes: views [R, width], width one position's
        heads (flash layout) or one head's head_dim (SDPA layout)."""
        width = self.kv_heads * self.head_dim if self.layout == "flash" else self.head_dim
        return self.k[layer].view(-1, width), self.v[layer].view(-1, width)

    def move(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy the first ``length`` positions of slots ``src`` into slots ``dst`` (every layer)."""
        if self.layout == "flash":
            self.k[:, dst, :length] = self.k[:, src, :length]
            self.v[:, dst, :length] = self.v[:, src, :length]
        else:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]


def additive(sees: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as SDPA adds it: 0 where ``sees`` (bool) is true, -inf elsewhere, in ``dtype``."""
    blocked = torch.full((), float("-inf"), dtype=dtype, device=sees.device)
    return torch.zeros((), dtype=dtype, device=sees.device).where(sees, blocked)


def decode_mask(seqlens: torch.Tensor, length: int, window: int | None, arange: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, 1, length] in ``dtype``: 0 for the keys that the query at position ``seqlens[b]`` sees (itself
    included), -inf for the others.

    Causal, and with a sliding ``window`` only keys at positions p with q - p < window (transformers'
    sliding-window rule). ``arange`` is a preallocated ``torch.arange(>= length)`` on the device. SDPA turns a
    bool mask into exactly this tensor on every call, i.e. in every layer; made here, it is made once a forward.
    """
    pos = arange[:length][None, :]
    q = seqlens[:, None]
    sees = pos <= q
    if window is not None:
        sees = sees & (pos > q - window)
    return additive(sees, dtype)[:, None, None, :]


def chunk_mask(seg: torch.Tensor, positions: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, n, n] in ``dtype`` over n packed prompt tokens: 0 where token i sees token j (the same prompt,
    ``seg``, and an earlier or equal position, within ``window``), -inf elsewhere; every token sees itself."""
    sees = (seg[:, None] == seg[None, :]) & (positions[None, :] <= positions[:, None])
    if window is not None:
        sees = sees & (positions[:, None] - positions[None, :] < window)
    return additive(sees, dtype)[None, None]


@dataclass
class PaddedPrompts:
    """Packed prompts laid out as a padded batch [S, L] (L: the longest), for one SDPA over all of them instead of
    one per prompt: ``gather`` [S, L] holds each place's packed token (padding: any real one), ``scatter`` [N] each
    packed token's place in the flattened batch, ``masks`` the additive [1, 1, L, L] masks of sliding windows
    (full attention is SDPA's own causal mask). Padding sits after each prompt's tokens, where a causal mask
    already hides it from them; the padded rows' outputs are dropped."""

    gather: torch.Tensor
    scatter: torch.Tensor
    masks: dict[int, torch.Tensor]


def padded_prompts(cu_seqlens: torch.Tensor, positions: torch.Tensor, max_len: int, windows, dtype: torch.dtype
                   ) -> PaddedPrompts:
    """The ``PaddedPrompts`` of packed prompts with prefix sums ``cu_seqlens`` [S+1] whose tokens sit at
    ``positions`` [N] (0 .. len-1 within each prompt), built on the device without a host sync."""
    dev, total = positions.device, positions.shape[0]
    starts = cu_seqlens[:-1].long()
    place = torch.arange(max_len, device=dev)
    gather = (starts[:, None] + place[None, :]).clamp_max(total - 1)
    prompt = torch.repeat_interleave(torch.arange(len(starts), device=dev), cu_seqlens.diff().long(),
                                     output_size=total)
    back = place[:, None] - place[None, :]
    masks = {w: additive((back >= 0) & (back < w), dtype)[None, None] for w in windows if w is not None}
    return PaddedPrompts(gather, prompt * max_len + positions, masks)


def pads_well(segments: list[tuple[int, int]], max_len: int) -> bool:
    """Whether these prompts are better attended as one padded batch than one by one: more than one, and padding
    them costs at most 4x their own attention."""
    return len(segments) > 1 and len(segments) * max_len * max_len <= 4 * sum(n * n for _, n in segments)


def decode_attention(
    cache: KVCache,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cache_rows: torch.Tensor | None,
    seqlens_i32: torch.Tensor | None,
    length: int,
    mask: torch.Tensor | None,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """One new token per row for rows 0..B-1 (= slots 0..B-1): store its k, v and attend over the cache.

    q [B, heads, D], k and v [B, kv_heads, D]; ``seqlens_i32`` [B] (int32, flash-attn's) is each row's position,
    i.e. its cached length before this token; ``cache_rows`` is ``cache.rows(arange(B), positions)`` (SDPA layout;
    flash-attn writes the cache itself), or None where k and v are in the cache already (the fused RoPE's
    ``CacheWrite``).
    ``length`` bounds the positions read (SDPA; > max(seqlens)), and ``mask`` is
    ``decode_mask(seqlens, length, window)``. Returns [B, heads, D].
    """
    B, H, D = q.shape
    if cache.layout == "flash":
        from flash_attn import flash_attn_with_kvcache

        out = flash_attn_with_kvcache(
            q[:, None],
            cache.k[layer][:B],
            cache.v[layer][:B],
            k=k[:, None],
            v=v[:, None],
            cache_seqlens=seqlens_i32,
            softmax_scale=scale,
            causal=True,
            window_size=(-1, -1) if window is None else (window - 1, 0),
        )
        return out[:, 0]
    if cache_rows is not None:
        cache.write(layer, cache_rows, k, v)
    kv_heads = cache.kv_heads
    # Grouped-query attention without repeating K/V: the heads sharing a KV head become query rows of it.
    qg = q.view(B, kv_heads, H // kv_heads, D)
    out = F.scaled_dot_product_attention(
        qg, cache.k[layer, :B, :, :length], cache.v[layer, :B, :, :length], attn_mask=mask, scale=scale
    )
    return out.reshape(B, H, D)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segments: list[tuple[int, int]],
    cu_seqlens: torch.Tensor | None,
    max_len: int,
    window: int | None,
    scale: float,
    use_flash: bool,
    mask: torch.Tensor | None = None,
    padded: PaddedPrompts | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence: q [N, heads, D], k and v [N, kv_heads, D].

    ``segments`` lists (start, length) of each sequence in the packed tokens (positions 0 .. length-1);
    ``cu_seqlens`` is the int32 [S+1] prefix sum that flash-attn's varlen kernel takes. With ``mask``
    (``chunk_mask``: fixed shapes, for a CUDA graph) one SDPA over all N tokens instead, whatever the layout; with
    ``padded`` (SDPA) one over the prompts as a padded batch.
    """
    rep = q.shape[1] // k.shape[1]
    if padded is not None:
        S, L = padded.gather.shape
        qs, ks, vs = (t[padded.gather].permute(0, 2, 1, 3) for t in (q, k, v))  # [S, heads, L, D]
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
        mask = padded.masks.get(window)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale)
        return o.permute(0, 2, 1, 3).reshape(S * L, q.shape[1], q.shape[2])[padded.scatter]
    if mask is not None:
        ks, vs = (t.transpose(0, 1)[None].repeat_interleave(rep, dim=1) for t in (k, v))
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], ks, vs, attn_mask=mask, scale=scale)
        return o[0].transpose(0, 1)
    if use_flash:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
            softmax_scale=scale, causal=True, window_size=(-1, -1) if window is None else (window - 1, 0),
        )
    out = torch.empty_like(q)
    for start, length in segments:
        qs = q[start : start + length].transpose(0, 1)[None]
        ks = k[start : start + length].transpose(0, 1)[None]
        vs = v[start : start + length].transpose(0, 1)[None]
        if rep > 1:
            ks = ks.repeat_interleave(rep, dim=1)
            vs = vs.repeat_interleave(rep, dim=1)
        if window is not None and length > window:
            pos = torch.arange(length, device=q.device)
            diff = pos[:, None] - pos[None, :]
            mask = (diff >= 0) & (diff < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[start : start + length] = o[0].transpose(0, 1)
    return out
