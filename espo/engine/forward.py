"""The forward of a supported transformers causal LM over ``espo.Decoder``'s slotted KV cache.

One forward serves the three kinds of step the decoder takes: a decode step (one new token in each of
the slots 0..b-1), a prefill (packed prompts written into free slots), and both at once, as chunked
prefill does: the decode tokens come first in the batch, the packed prompt tokens after them, and the
projections, MLPs and LM head read their weights once for both. Only attention differs between the
two parts (``decode_attention`` over the cache, ``prefill_attention`` within each prompt).

Supported model families: Llama, Mistral, Qwen2, Qwen3 (standard attention with RoPE).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_ops
from .kv_cache import (
    KVCache,
    PaddedPrompts,
    chunk_mask,
    decode_attention,
    decode_mask,
    padded_prompts,
    pads_well,
    prefill_attention,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def check_family(model: nn.Module, what: str) -> str:
    """The model's ``config.model_type``, or a ValueError naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"espo.Decoder supports the {', '.join(SUPPORTED_MODEL_TYPES)} model families; the {what} is "
            f"{model_type or type(model).__name__!r}"
        )
    return model_type


@dataclass
class DecodeRows:
    """The decode part of a forward: one token for each slot 0..b-1, at position ``seqlens`` (its cached length).

    seqlens [b] int64 and seqlens_i32 [b] int32 (flash-attn's; None with SDPA) on the device; rows = arange(b) on
    the device; ``length`` bounds the cached positions SDPA reads (> max(seqlens)); arange: a device arange of at
    least max_seq_len.
    """

    seqlens: torch.Tensor
    seqlens_i32: torch.Tensor | None
    rows: torch.Tensor
    length: int
    arange: torch.Tensor


@dataclass
class PrefillRows:
    """The prefill part of a forward: packed prompts, prompt j at [offset_j, offset_j + len_j) of the part.

    segments: (offset, len) per prompt; cu_seqlens [P+1] int32 (flash-attn) or None; max_len: the longest.
    The K/V of the part's token src_idx[i] go to the cache at (dst_slots[i], dst_pos[i]), so that a prompt
    shared by several rollouts is computed once and written into each of their slots.
    seg: each token's prompt (int64 [n] on the device), for a part of fixed shape (a CUDA graph's): attention is
    then one masked SDPA over the part, tokens seeing only earlier tokens of their own prompt, and ``segments``
    and ``cu_seqlens`` are unused. Padding tokens take a prompt id of their own.
    """

    segments: list[tuple[int, int]]
    cu_seqlens: torch.Tensor | None
    max_len: int
    dst_slots: torch.Tensor
    dst_pos: torch.Tensor
    src_idx: torch.Tensor
    seg: torch.Tensor | None = None


@dataclass
class _Shared:
    """What every layer of one forward shares, computed once: the cache rows that the decode and prefill parts
    write (``KVCache.rows``), their additive attention masks by sliding window (None: full attention), and the
    prefill part as a padded batch (``PaddedPrompts``, SDPA with several prompts) or None."""

    decode_rows: torch.Tensor | None
    prefill_rows: torch.Tensor | None
    decode_masks: dict[int | None, torch.Tensor]
    prefill_masks: dict[int | None, torch.Tensor]
    prefill_padded: PaddedPrompts | None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _is_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers Llama/Mistral/Qwen2/Qwen3 RMSNorm (a weight [n] and variance_epsilon)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(weight, torch.Tensor) and weight.dim() == 1)


class _FusedNorm:
    """An RMSNorm module run as one ``fused_ops.rms_norm`` (or ``add_rms_norm``) launch; any other norm module runs
    as it is. The weight is read from the module at each call, as the module itself does (it may be replaced)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.fused = _is_rms_norm(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.module(x)
        return fused_ops.rms_norm(x, self.module.weight, self.module.variance_epsilon)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = residual + x`` and this norm of it, in one launch: (norm(h), h)."""
        if not self.fused:
            h = residual + x
            return self.module(h), h
        return fused_ops.add_rms_norm(x, residual, self.module.weight, self.module.variance_epsilon)


class _FusedMLP:
    """A gated MLP with act "silu" as gate_proj, up_proj, one ``fused_ops.silu_mul`` launch, down_proj; for a decode
    step's rows (at most ``fused_ops.GATE_UP_SILU_ROWS``), gate_proj, up_proj and silu_mul as one
    ``fused_ops.gate_up_silu`` launch where both projections are plain bf16 or fp16 ``nn.Linear`` without bias (in
    float32 the kernel has no tensor cores to run on: cuBLAS's two GEMMs are the faster)."""

    def __init__(self, module: nn.Module, hidden_act: str | None):
        self.module = module
        self.fused = hidden_act == "silu" and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj"))
        self.one_launch = self.fused and all(
            type(p) is nn.Linear and p.bias is None and p.weight.dtype in (torch.bfloat16, torch.float16)
            for p in (module.gate_proj, module.up_proj))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if not self.fused:
            return m(x)
        if self.one_launch and x.dim() == 2 and x.shape[0] <= fused_ops.GATE_UP_SILU_ROWS:
            return m.down_proj(fused_ops.gate_up_silu(x, m.gate_proj.weight, m.up_proj.weight))
        return m.down_proj(fused_ops.silu_mul(m.gate_proj(x), m.up_proj(x)))


class _MergedQKV:
    """q_proj, k_proj and v_proj as one GEMM: their weights (and biases) copied into one [Nq + Nk + Nv, hidden] matrix,
    which ``refresh`` copies again from the modules (the model's own weights stay as they are). One GEMM launch where
    three ran, for 5% more weight memory on Qwen2.5-0.5B (12% on SmolLM2-135M). Only for three plain ``nn.Linear``
    of one dtype and device, all with a bias or none (``of`` returns None otherwise)."""

    def __init__(self, attn: nn.Module):
        self.projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.sizes = [p.out_features for p in self.projections]
        first = attn.q_proj.weight
        self.weight = torch.empty((sum(self.sizes), first.shape[1]), dtype=first.dtype, device=first.device)
        self.bias = None if attn.q_proj.bias is None else torch.empty(sum(self.sizes), dtype=first.dtype,
                                                                     device=first.device)
        self.refresh()

    @staticmethod
    def of(attn: nn.Module) -> "_MergedQKV | None":
        projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if not all(type(p) is nn.Linear for p in projections):
            return None
        if len({(p.weight.dtype, p.weight.device, p.in_features, p.bias is None) for p in projections}) != 1:
            return None
        return _MergedQKV(attn)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the modules' current weights in (read from the modules: a replaced weight is seen too)."""
        torch.cat([p.weight for p in self.projections], out=self.weight)
        if self.bias is not None:
            torch.cat([p.bias for p in self.projections], out=self.bias)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [N, out_features] each: column views of the one GEMM's output."""
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


@dataclass
class _LayerSpec:
    ln1: nn.Module | _FusedNorm
    attn: nn.Module
    ln2: nn.Module | _FusedNorm
    mlp: nn.Module | _FusedMLP
    window: int | None
    qk_norm: bool
    q_norm: _FusedNorm | None = None  # the fused path's q/k norms (Qwen3); the unfused path calls attn's own
    k_norm: _FusedNorm | None = None
    qkv: _MergedQKV | None = None  # the fused path's one q/k/v GEMM, where it can run (not with Qwen3's q/k norms)


class TransformerForward:
    """The model's modules (shared, not copied) run over a ``KVCache`` of ``slots`` x ``max_seq_len``.

    ``fused``: run the RMSNorms (each with the residual add before it), the RoPE of q and k and a silu MLP's
    activation (with the gate and up GEMMs for a decode step's rows: ``_FusedMLP``) as ``espo.engine.fused_ops``'
    kernels (one launch each) instead of the modules' eager ops, and the q, k and v projections as one GEMM
    (``_MergedQKV``: a copy of their weights, which ``refresh_weights`` renews); the caller checks that they can run
    here.
    """

    def __init__(self, model: nn.Module, *, what: str, max_seq_len: int, slots: int, device, dtype, attention: str,
                 fused: bool = False):
        config = model.config
        model_type = check_family(model, what)
        base = model if hasattr(model, "layers") else getattr(model, "model", None)
        if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            raise ValueError(
                f"the {what} ({type(model).__name__}) does not have the standard layout (model.embed_tokens, "
                "model.layers, model.norm, model.rotary_emb) of a transformers Llama/Mistral/Qwen2/Qwen3 model"
            )
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _STATIC_ROPE_TYPES:
            raise ValueError(
                f"the {what} uses rope_type {rope_type!r}, whose frequencies change with the sequence length; "
                f"espo.Decoder supports {_STATIC_ROPE_TYPES}"
            )
        self.config = config
        self.embed = base.embed_tokens
        self.norm = _FusedNorm(base.norm) if fused else base.norm
        self.lm_head = getattr(model, "lm_head", None) if base is not model else None
        self.fused = bool(fused)
        self.layers: list[_LayerSpec] = []
        for layer in base.layers:
            attn = layer.self_attn
            if hasattr(attn, "sliding_window"):
                window = attn.sliding_window
            elif model_type == "mistral":
                window = getattr(config, "sliding_window", None)
            else:
                window = None
            spec = _LayerSpec(layer.input_layernorm, attn, layer.post_attention_layernorm, layer.mlp, window,
                              hasattr(attn, "q_norm"))
            if self.fused:
                spec.ln1, spec.ln2 = _FusedNorm(spec.ln1), _FusedNorm(spec.ln2)
                spec.mlp = _FusedMLP(spec.mlp, getattr(config, "hidden_act", None))
                if spec.qk_norm:
                    spec.q_norm, spec.k_norm = _FusedNorm(attn.q_norm), _FusedNorm(attn.k_norm)
                else:  # q and k as column views of one GEMM would cost the q/k norms a copy each
                    spec.qkv = _MergedQKV.of(attn)
            self.layers.append(spec)
        attn0 = self.layers[0].attn
        self.head_dim = int(attn0.head_dim)
        self.num_heads = attn0.q_proj.out_features // self.head_dim
        self.kv_heads = attn0.k_proj.out_features // self.head_dim
        self.scale = float(attn0.scaling)
        self.hidden_size = self.embed.embedding_dim
        self.vocab_size = self.embed.num_embeddings
        self.windows = sorted({s.window for s in self.layers if s.window is not None})
        self.has_full = any(s.window is None for s in self.layers)
        positions = torch.arange(max_seq_len, device=device)[None]
        with torch.no_grad():
            cos, sin = base.rotary_emb(torch.empty(1, dtype=dtype, device=device), positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [max_seq_len, head_dim], the model's dtype
        self.attention = attention
        self.cache = KVCache(
            len(self.layers), slots, max_seq_len, self.kv_heads, self.head_dim, dtype=dtype, device=device,
            layout=attention,
        )

    def refresh_weights(self) -> None:
        """Renew the fused path's copies of the model's weights (the merged q/k/v projections) from the modules."""
        for spec in self.layers:
            if spec.qkv is not None:
                spec.qkv.refresh()

    def _projections(self, spec: _LayerSpec, x: torch.Tensor):
        """The layer's q, k and v [N, heads, d] before RoPE (after Qwen3's q/k norms)."""
        N, d = x.shape[0], self.head_dim
        attn = spec.attn
        if spec.qkv is not None:
            q, k, v = (t.view(N, -1, d) for t in spec.qkv(x))
        else:
            q = attn.q_proj(x).view(N, -1, d)
            k = attn.k_proj(x).view(N, -1, d)
            v = attn.v_proj(x).view(N, -1, d)
        if spec.qk_norm:
            q, k = (spec.q_norm(q), spec.k_norm(k)) if self.fused else (attn.q_norm(q), attn.k_norm(k))
        return q, k, v

    def _qkv(self, spec: _LayerSpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             decode_rows: torch.Tensor | None = None, layer: int = 0):
        """The layer's q, k (rotated) and v [N, heads, d]. Fused, with ``decode_rows`` (``_Shared``'s), the RoPE launch
        also writes the decode part's k and v into layer ``layer``'s cache."""
        q, k, v = self._projections(spec, x)
        if self.fused:
            write = None if decode_rows is None else fused_ops.CacheWrite(v, *self.cache.as_rows(layer), decode_rows)
            q, k = fused_ops.rope(q, k, cos, sin, write)
            return q, k, v
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _rope_attend(self, i, spec, x, cos, sin, b, decode, prefill, shared: _Shared) -> torch.Tensor:
        """Fused, with ``fused_ops.ROPE_DECODE_ATTENTION``: layer i's attention with the decode part's RoPE, cache write
        and attention in one launch (``fused_ops.rope_decode_attention``); a prefill part as ``_attend`` runs it."""
        q, k, v = self._projections(spec, x)
        o = fused_ops.rope_decode_attention(q[:b], k[:b], v[:b], cos[:b], sin[:b], self.cache.k[i], self.cache.v[i],
                                            decode.seqlens, spec.window, self.scale)
        if prefill is None:
            return o
        qp, kp = fused_ops.rope(q[b:], k[b:], cos[b:], sin[b:])
        return torch.cat((o, self._attend(i, spec, qp, kp, v[b:], 0, None, prefill, shared)))

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        decode: DecodeRows | None = None,
        prefill: PrefillRows | None = None,
        out_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens ``ids`` [N] at ``positions`` [N]: the decode part's b tokens first, then the prefill part's.

        Writes every token's K/V into the cache; returns the last hidden state (after the final norm) of
        the tokens ``out_idx`` (indices into the N tokens), or of all N when None.
        """
        b = 0 if decode is None else int(decode.rows.shape[0])
        h = self.embed(ids)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        windows = self.windows + ([None] if self.has_full else [])
        rope_attend = (decode is not None and self.fused and fused_ops.ROPE_DECODE_ATTENTION
                       and self.cache.layout == "sdpa")  # then the decode part needs neither cache rows nor masks
        shared = _Shared(
            None if decode is None or self.cache.layout == "flash" or rope_attend else
            self.cache.rows(decode.rows, decode.seqlens),
            None if prefill is None else self.cache.rows(prefill.dst_slots, prefill.dst_pos),
            {} if decode is None or self.attention != "sdpa" or rope_attend else
            {w: decode_mask(decode.seqlens, decode.length, w, decode.arange, h.dtype) for w in windows},
            {} if prefill is None or prefill.seg is None else
            {w: chunk_mask(prefill.seg, positions[b:], w, h.dtype) for w in windows},
            padded_prompts(prefill.cu_seqlens, positions[b:], prefill.max_len, windows, h.dtype)
            if prefill is not None and prefill.seg is None and self.attention == "sdpa"
            and pads_well(prefill.segments, prefill.max_len) else None,
        )
        if self.fused:
            return self._fused_layers(h, cos, sin, b, decode, prefill, shared, out_idx, rope_attend)
        for i, spec in enumerate(self.layers):
            q, k, v = self._qkv(spec, spec.ln1(h), cos, sin)
            o = self._attend(i, spec, q, k, v, b, decode, prefill, shared)
            h = h + spec.attn.o_proj(o.reshape(o.shape[0], -1))
            h = h + spec.mlp(spec.ln2(h))
        return self.norm(h if out_idx is None else h[out_idx])

    def _fused_layers(self, h, cos, sin, b, decode, prefill, shared, out_idx, rope_attend):
        """The layers of the fused path: each residual add runs in the launch of the RMSNorm that follows it."""
        x = self.layers[0].ln1(h)
        for i, spec in enumerate(self.layers):
            if rope_attend:
                o = self._rope_attend(i, spec, x, cos, sin, b, decode, prefill, shared)
            else:
                q, k, v = self._qkv(spec, x, cos, sin, shared.decode_rows, i)
                o = self._attend(i, spec, q, k, v, b, decode, prefill, shared)
            x, h = spec.ln2.add(spec.attn.o_proj(o.reshape(o.shape[0], -1)), h)
            m = spec.mlp(x)
            if i + 1 < len(self.layers):
                x, h = self.layers[i + 1].ln1.add(m, h)
        if out_idx is not None:  # (h + m)[out_idx], elementwise the same
            m, h = m[out_idx], h[out_idx]
        return self.norm.add(m, h)[0]

    def _attend(self, i, spec, q, k, v, b, decode, prefill, shared: _Shared) -> torch.Tensor:
        """Layer i's attention: the decode part over the cache, the prefill part within each prompt; K/V cached
        (the decode part's by the fused RoPE where it ran)."""
        parts = []
        if decode is not None:
            to_write = None if self.fused else shared.decode_rows  # fused, the RoPE launch stored k and v
            parts.append(decode_attention(
                self.cache, i, q[:b], k[:b], v[:b], cache_rows=to_write,
                seqlens_i32=decode.seqlens_i32, length=decode.length,
                mask=shared.decode_masks.get(spec.window), window=spec.window, scale=self.scale,
            ))
        if prefill is not None:
            kp, vp = k[b:], v[b:]
            self.cache.write(i, shared.prefill_rows, kp[prefill.src_idx], vp[prefill.src_idx])
            parts.append(prefill_attention(
                q[b:], kp, vp, segments=prefill.segments, cu_seqlens=prefill.cu_seqlens, max_len=prefill.max_len,
                window=spec.window, scale=self.scale, use_flash=self.attention == "flash",
                mask=shared.prefill_masks.get(spec.window), padded=shared.prefill_padded,
            ))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
