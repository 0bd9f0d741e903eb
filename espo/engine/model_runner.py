"""The decoder's model runner: runs the model over the slotted KV cache and draws the next tokens.

``ModelRunner`` loads the model (or takes the one given) and moves it where it runs, refuses up front a
KV cache that cannot fit, builds the policy's (and a critic's) ``TransformerForward`` with its KV cache,
and computes one step's logits and values: a packed prefill, an eager decode step (with the step's
refills in the same forward) or a decode step replayed from a CUDA graph, one per bucket of live slots
(and of cached length, with SDPA). ``sample`` draws the tokens with ``espo.sample`` and records them.
Which rollout runs in which slot, and when, is the scheduler's business (``espo.engine.scheduler``).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Union

import numpy as np
import torch
from torch import nn

from espo.checks import check_device
from espo.ops.sample import sample

from .forward import DecodeRows, PrefillRows, TransformerForward, check_family
from .fused_ops import fused_ops_reason
from .kv_cache import KVCache, resolve_attention
from .models import load_causal_lm
from .sequence import CODE_EOS, CODE_INVALID, CODE_STOP, Admission, RefillChunk, Request
from .slots import Slots
from .value_head import Critic, ValueHead, check_value_source


def _device(device) -> torch.device:
    """``device`` with its index made explicit ("cuda" -> "cuda:0"), as tensors report theirs."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _batch_buckets(max_batch: int) -> list[int]:
    sizes, p = {1, max_batch}, 1
    while p < max_batch:
        sizes.update({p, p + p // 2})
        p *= 2
    return sorted(s for s in sizes if s <= max_batch)


class FinishCodes:
    """A step's finish codes (uint8 [n], on the device) sent to the host without waiting for them: on a GPU copied
    into one of two pinned buffers in turn, behind an event, so that the host can launch the next step before it
    reads this one's codes (at most two sent and unread at once); elsewhere read at once."""

    def __init__(self, size: int, device: torch.device):
        self.cuda = device.type == "cuda"
        turns = 2 if self.cuda else 0
        self._buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(turns)]
        self._events = [torch.cuda.Event() for _ in range(turns)]
        self._turn = 0

    def send(self, code: torch.Tensor) -> Callable[[], np.ndarray]:
        """Start copying ``code`` to the host; the returned function waits for the copy and gives it."""
        if not self.cuda:
            host = code.numpy()
            return lambda: host
        buffer, event = self._buffers[self._turn][: code.shape[0]], self._events[self._turn]
        self._turn ^= 1
        buffer.copy_(code, non_blocking=True)
        event.record(torch.cuda.current_stream(code.device))  # the copy's stream (the code's device, not the current)

        def read() -> np.ndarray:
            event.synchronize()
            return buffer.numpy().copy()

        return read


def oom_message(where: str, max_batch: int, max_seq_len: int, prefill_tokens: int | None = None) -> str:
    """What to lower when the decoder ran out of GPU memory ``where`` ("cache", "prefill" or "decode")."""
    if where == "cache":
        hint = f"lower max_batch (now {max_batch}) or max_seq_len (now {max_seq_len})"
    elif where == "prefill":
        hint = (
            f"lower prefill_tokens (now {prefill_tokens}) or max_batch (now {max_batch}), "
            f"or max_seq_len (now {max_seq_len})"
        )
    else:
        hint = f"lower max_batch (now {max_batch}) or max_seq_len (now {max_seq_len}), or pass cuda_graphs=False"
    return f"espo.Decoder ran out of GPU memory ({'allocating the KV cache' if where == 'cache' else where}): {hint}"


def load_model(path, dtype):
    """The causal LM of the local checkpoint directory ``path``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r} (the decoder loads local checkpoints only)")
    return load_causal_lm(path, dtype=dtype)


def resolve_fused_ops(fused_ops: bool | None, device: torch.device) -> bool:
    """``espo.Decoder``'s fused_ops resolved: None is on where the kernels run on a GPU; True is checked."""
    if fused_ops is not None and not isinstance(fused_ops, bool):
        raise TypeError(f"fused_ops must be True, False or None, got {fused_ops!r}")
    reason = fused_ops_reason(device)
    if fused_ops is None:
        return device.type == "cuda" and not reason
    if fused_ops and reason:
        raise ValueError(f"fused_ops=True cannot run here: {reason}; pass fused_ops=False or None")
    return fused_ops


class ModelRunner:
    """The model (and value source) of an ``espo.Decoder``, on its device, over ``max_batch`` slots.

    Holds the per-slot state (``slots``, an ``espo.engine.slots.Slots``) that the decode forward and its CUDA
    graphs read, and the KV caches (``caches``) that compacting the slots moves. The arguments are
    ``espo.Decoder``'s (checked there, sizes included).
    """

    def __init__(
        self,
        model: Union[nn.Module, str, os.PathLike],
        *,
        max_batch: int,
        max_seq_len: int,
        device: Union[torch.device, str, None],
        dtype: torch.dtype | None,
        value_source: ValueHead | Critic | None,
        attention: str,
        cuda_graphs: bool,
        fused_ops: bool | None = False,
    ):
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if device is not None:
            check_device("device", device)
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, dtype)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a transformers model or a checkpoint path, got {type(model).__name__}")
        check_family(model, "model")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("the model has no parameters")
        self.device = _device(device if device is not None else first.device)
        self.dtype = dtype if dtype is not None else first.dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"dtype must be torch.float32, torch.bfloat16 or torch.float16 (what espo.sample reads), "
                f"got {self.dtype}: pass dtype=torch.float32"
            )
        self._to(model)
        self.model = model
        self.max_batch, self.max_seq_len = int(max_batch), int(max_seq_len)
        self.attention = resolve_attention(attention, self.device, self.dtype)
        self.fused_ops = resolve_fused_ops(fused_ops, self.device)
        if self.device.type == "cuda":
            self._check_memory(model, value_source)
        try:
            self.policy = TransformerForward(
                model,
                what="model",
                max_seq_len=self.max_seq_len,
                slots=self.max_batch,
                device=self.device,
                dtype=self.dtype,
                attention=self.attention,
                fused=self.fused_ops,
            )
            if self.policy.lm_head is None:
                raise ValueError(f"the model ({type(model).__name__}) has no lm_head: pass a *ForCausalLM model")
            self.value_source = check_value_source(value_source, self.policy.hidden_size)
            self.critic: TransformerForward | None = None
            if isinstance(self.value_source, ValueHead):
                self._to_device(self.value_source)
            elif isinstance(self.value_source, Critic):
                check_family(self.value_source.model, "critic")
                self._to(self.value_source.model)
                self._to_device(self.value_source.head)
                self.critic = TransformerForward(
                    self.value_source.model,
                    what="critic",
                    max_seq_len=self.max_seq_len,
                    slots=self.max_batch,
                    device=self.device,
                    dtype=self.dtype,
                    attention=self.attention,
                    fused=self.fused_ops,
                )
                if self.critic.vocab_size < self.policy.vocab_size:
                    raise ValueError(
                        f"the critic's vocabulary ({self.critic.vocab_size}) is smaller than the policy's "
                        f"({self.policy.vocab_size}): it must read the policy's tokens"
                    )
                if self.critic.hidden_size != self.value_source.head.hidden_size:
                    raise ValueError(
                        f"the critic head maps hidden states of size {self.value_source.head.hidden_size}, "
                        f"the critic's are {self.critic.hidden_size}"
                    )
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(oom_message("cache", self.max_batch, self.max_seq_len)) from err
        self.vocab_size = self.policy.vocab_size
        S, dev = self.max_batch, self.device
        self.slots = Slots(S, dev)
        self.caches = [m.cache for m in (self.policy, self.critic) if m is not None]  # what compact moves
        self._arange = torch.arange(max(self.max_seq_len, S), device=dev)
        self.codes = FinishCodes(S, dev)  # a step draws at most S rows
        self.cuda_graphs = bool(cuda_graphs) and dev.type == "cuda"
        # (bucket, length, refill chunk tokens or 0) -> graph and its outputs
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._graph_pool = None
        self._batch_buckets = _batch_buckets(S)
        self.refill_chunks: list[RefillChunk] = []  # the refill chunk's sizes, smallest first; [] without one
        self._chunk_buf: torch.Tensor | None = None

    def use_refill_chunk(self, chunk: RefillChunk | None) -> None:
        """With CUDA graphs, admissions that fit ``chunk`` ride in the decode step's graph, each in the smallest of
        ``chunk.sizes()`` that fits it (a graph each), read from a static buffer (the graph's input); None:
        admissions always get a forward of their own."""
        self.refill_chunks = [] if chunk is None else chunk.sizes()
        self._graphs = {key: entry for key, entry in self._graphs.items() if not key[2]}  # they read the old buffer
        self._chunk_buf = None if chunk is None else torch.zeros(chunk.size, dtype=torch.int64, device=self.device)

    @property
    def refill_chunk(self) -> RefillChunk | None:
        """The refill chunk (its largest size: the limits of what rides in a graphed step), or None."""
        return self.refill_chunks[-1] if self.refill_chunks else None

    def chunk_for(self, tokens: int, rows: int) -> RefillChunk:
        """The smallest refill chunk size that holds ``tokens`` prompt tokens and ``rows`` rollouts."""
        return next(c for c in self.refill_chunks if c.fits(tokens, rows))

    # ------------------------------------------------------------------------------------------ setup

    def _to(self, module: nn.Module) -> None:
        p = next(module.parameters())
        if p.device != self.device or p.dtype != self.dtype:
            module.to(device=self.device, dtype=self.dtype)

    def _to_device(self, module: nn.Module) -> None:
        p = next(module.parameters())
        if p.device != self.device:
            module.to(self.device)

    def _check_memory(self, model: nn.Module, value_source) -> None:
        """Refuse up front a KV cache that cannot fit, naming the settings to lower."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        need = KVCache.nbytes_for(
            cfg.num_hidden_layers, self.max_batch, self.max_seq_len, kv_heads, head_dim, self.dtype
        )
        if isinstance(value_source, Critic):
            c = value_source.model.config
            c_hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            need += KVCache.nbytes_for(
                c.num_hidden_layers,
                self.max_batch,
                self.max_seq_len,
                getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                c_hd,
                self.dtype,
            )
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > free:
            raise torch.OutOfMemoryError(
                f"espo.Decoder: the KV cache needs {need / 2**30:.2f} GiB but {free / 2**30:.2f} GiB are free on "
                f"{self.device}: lower max_batch (now {self.max_batch}) or max_seq_len (now {self.max_seq_len})"
            )

    def refresh_weights(self) -> None:
        """Renew the copies of the models' weights that the fused path reads (``TransformerForward.refresh_weights``):
        run before each generate, so that a model trained between two calls decodes with its new weights."""
        for forward in (self.policy, self.critic):
            if forward is not None:
                forward.refresh_weights()

    def reset_graphs(self) -> None:
        """Drop the captured CUDA graphs (e.g. after replacing the model's parameter tensors, not in place)."""
        self._graphs.clear()

    # ------------------------------------------------------------------------------------------ steps

    def forward(self, ids, positions, *, decode=None, prefill=None, out_idx=None, select=None):
        """Logits and values (or None) of the policy (and critic) forward; rows ``select`` of them when given."""
        hidden = self.policy.forward(ids, positions, decode=decode, prefill=prefill, out_idx=out_idx)
        logits = self.policy.lm_head(hidden)
        values = None
        if isinstance(self.value_source, ValueHead):
            values = self.value_source(hidden)
        elif self.critic is not None:
            hidden = self.critic.forward(ids, positions, decode=decode, prefill=prefill, out_idx=out_idx)
            values = self.value_source.head(hidden)
        if select is not None:
            logits = logits[select]
            values = None if values is None else values[select]
        return logits, values

    def decode(self, b: int, length: int, adm: "Admission | None" = None):
        """Logits [b (+ k), V] and values (or None) of a decode step over the live slots 0..b-1 reading ``length``
        cached positions; it also prefills the admission ``adm`` (k rollouts, in slots b..b+k-1) in the same
        forward: eager, or with CUDA graphs from ``adm.chunk`` (a ``RefillChunk``) in the step's graph."""
        slots = self.slots
        if self.cuda_graphs:
            bb = next(s for s in self._batch_buckets if s >= b)
            chunk = None if adm is None else adm.chunk_layout
            if chunk is not None:
                self._chunk_buf[: chunk.size].copy_(adm.chunk)  # the graph's static input
            logits, values = self._decode_graphed(bb, length, chunk)
            k = 0 if adm is None else len(adm.rids)
            pick = (lambda t: t[:b]) if k == 0 else (lambda t: torch.cat((t[:b], t[bb : bb + k])))
            logits = pick(logits)
            values = None if values is None else pick(values)
        elif adm is None:
            logits, values = self._decode_forward(b, length)
        else:  # one forward: the b decode tokens, then the admitted rollouts' packed prompts
            rows = self._arange[:b]
            logits, values = self.forward(
                torch.cat([slots.tok[:b], adm.ids]),
                torch.cat([slots.seqlen[:b], adm.positions]),
                decode=self._decode_rows(b, length),
                prefill=adm.prefill,
                out_idx=torch.cat([rows, b + adm.last_idx]),
                select=torch.cat([rows, b + adm.ui]),
            )
        return logits, values

    def _decode_rows(self, b: int, length: int) -> DecodeRows:
        seqlens = self.slots.seqlen[:b]
        int32 = seqlens.to(torch.int32) if self.attention == "flash" else None  # in the forward: a graph's kernel
        return DecodeRows(seqlens, int32, self._arange[:b], length, self._arange)

    def _decode_forward(self, b: int, length: int, chunk: RefillChunk | None = None):
        """Logits and values (or None) of slots 0..b-1 ([b, V], [b]), eager; with ``chunk`` (a size of the refill
        chunk), also the refill packed in ``_chunk_buf`` as that size, whose rows follow ([b + chunk rows, V]).
        Reads only static tensors (a graph's inputs)."""
        slots, decode = self.slots, self._decode_rows(b, length)
        if chunk is None:
            return self.forward(slots.tok[:b], slots.seqlen[:b], decode=decode)
        c = chunk.views(self._chunk_buf[: chunk.size])
        prefill = PrefillRows([], None, chunk.tokens, c["dst_slots"], c["dst_pos"], c["src_idx"], seg=c["seg"])
        return self.forward(
            torch.cat((slots.tok[:b], c["ids"])), torch.cat((slots.seqlen[:b], c["positions"])),
            decode=decode, prefill=prefill, out_idx=torch.cat((self._arange[:b], b + c["out"])),
        )

    def _decode_graphed(self, b: int, length: int, chunk: RefillChunk | None = None):
        key = (b, length if self.attention == "sdpa" else 0, 0 if chunk is None else chunk.tokens)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(lambda: self._decode_forward(b, length, chunk))
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # a capture failure costs speed, never correctness
                out = self._decode_forward(b, length, chunk)
                if chunk is not None:
                    warnings.warn(f"espo.Decoder: CUDA graph capture of a refill step failed ({err!r}); refills "
                                  "get a forward of their own", RuntimeWarning)
                    self.use_refill_chunk(None)
                else:
                    warnings.warn(f"espo.Decoder: CUDA graph capture failed ({err!r}); decoding eagerly",
                                  RuntimeWarning)
                    self.cuda_graphs = False
                return out
            self._graphs[key] = entry
        graph, outputs = entry
        graph.replay()
        return outputs

    def _capture(self, forward):
        """A CUDA graph of ``forward()`` (run twice first, rewriting this step's K/V with the same values) and its
        outputs, which each replay overwrites."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            outputs = forward()
        return graph, outputs

    def length_bucket(self, need: int) -> int:
        """How many cached positions a decode step reads (SDPA): >= need; static buckets for CUDA graphs."""
        if self.attention == "flash":
            return self.max_seq_len  # unused: flash-attn reads each row's own length
        if not self.cuda_graphs:
            if self.device.type != "cuda":
                return need
            return min(-(-need // 64) * 64, self.max_seq_len)  # aligned masks suit the fused SDPA kernels
        bucket = 128
        while bucket < need:
            bucket *= 2
        return min(bucket, self.max_seq_len)

    # --------------------------------------------------------------------------------------- sampling

    def sample(self, req: "Request", records: list[tuple[torch.Tensor, torch.Tensor]], logits, values, idx):
        """Draw for the slots ``idx`` (a slice or an index tensor) under ``req``'s settings; append their rows
        (``RECORD_IDS``, ``RECORD_VALUES``) to ``records``; return the tokens and their finish codes (on the
        device)."""
        slots = self.slots
        if values is None and req.prompt_values is not None:
            values = slots.pval[idx]
        stopper = req.stopper
        out = sample(
            logits,
            params=req.sampling.with_seed(slots.seed[idx]),
            offset=slots.gen[idx],
            stopper=stopper,
            values=values if stopper is not None else None,
            stopper_rows=slots.srow[idx] if stopper is not None else None,
            validate=False,
        )
        vals = values.float() if values is not None else torch.zeros_like(out.logprobs)
        records.append((torch.stack((slots.rid[idx], out.tokens), dim=1),  # two launches a draw, no casts
                        torch.stack((out.logprobs, out.raw_logprobs, out.entropy, out.regret, vals), dim=1)))
        code = (~out.valid).to(torch.uint8) * CODE_INVALID
        if req.eos is not None:
            code |= torch.isin(out.tokens, req.eos).to(torch.uint8) * CODE_EOS
        if out.stop is not None:
            code |= out.stop.to(torch.uint8) * CODE_STOP
        return out.tokens, code
