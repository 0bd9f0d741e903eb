"""``espo.Decoder``: continuous batching for transformers causal LMs that frees a row's compute the step it ends.

The decoder runs the model's own modules (embedding, norms, projections, MLPs, LM head) with its own
forward (``espo.forward``) over its own slotted KV cache (``espo.kv_cache``), so that:

* a fixed pool of ``max_batch`` slots holds the live rollouts; a rollout that ends (EOS, its length
  limit, or an ESPO stop) frees its slot at once, the next pending rollout is prefilled into it, and
  each decode step computes the live slots only (live rollouts are kept in the leading slots); an
  eager step prefills its refills in its own forward, so a refill costs no extra read of the weights;
* every token is drawn by ``espo.sample`` with the rollout's own seed and the token's position as the
  offset, so a rollout's tokens do not depend on which others share its batch: a run with a stopper
  draws the tokens of the same run without one, up to the stop;
* the ESPO stop rule runs inside the sampling op, one ``EarlyStopper`` row per slot;
* one host sync per decode step (the finished mask); on a GPU the decode forward is captured in CUDA
  graphs, one per bucket of live slots (and of cached length, with SDPA).

Supported model families: Llama, Mistral, Qwen2, Qwen3 (standard attention with RoPE).
"""
from __future__ import annotations

import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from torch import nn

from .checks import check_device, is_integer, is_real
from .forward import DecodeRows, PrefillRows, TransformerForward, check_family
from .kv_cache import KVCache, resolve_attention
from .models import load_causal_lm
from .sampling import MIN_TEMPERATURE, sample
from .slots import Slots
from .stopper import EarlyStopper
from .value_head import Critic, ValueHead, check_value_source, prompt_values_tensor

FINISH_REASONS = ("eos", "length", "stopped", "invalid")
_EOS, _STOP, _INVALID = 1, 2, 4
_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def rollout_seed(run_seed: int, rollout_id: int) -> int:
    """The sampling seed of rollout ``rollout_id`` in a run seeded ``run_seed`` (a signed 64-bit int).

    ``splitmix64(splitmix64(run_seed mod 2**64) XOR rollout_id)``, read as a signed int64. The rollout id
    is the rollout's index in ``Rollouts`` (prompt-major: prompt 0's n rollouts first). Each token of the
    rollout is drawn with this seed and offset = its index among the generated tokens (0 for the first).
    """
    s = _splitmix64(_splitmix64(int(run_seed) & _M64) ^ (int(rollout_id) & _M64))
    return s - (1 << 64) if s >= 1 << 63 else s


# --------------------------------------------------------------------------------------------- results


@dataclass
class Rollout:
    """One generated continuation.

    tokens: int64 [length], the generated tokens (an EOS that ended the rollout included; for a stopped
        rollout, the token that triggered the stop included).
    logprobs: float32 [length], under the tempered distribution; raw_logprobs: at temperature 1.
    entropy, regret: float32 [length], of the tempered distribution at each step.
    values: float32 [length] or None: V of the prefix each token was drawn from (prompt + tokens before it),
        from the decoder's value source or the prompt's constant; None without one.
    finish_reason: "eos", "length" (max_new_tokens or max_seq_len reached), "stopped" (ESPO; wins over eos
        and length at the same token, as the stopper counted it), or "invalid" (the model produced NaN/inf
        logits; the step is not kept).
    """

    rollout_id: int
    prompt_index: int
    sample_index: int
    seed: int
    tokens: torch.Tensor
    logprobs: torch.Tensor
    raw_logprobs: torch.Tensor
    entropy: torch.Tensor
    regret: torch.Tensor
    values: torch.Tensor | None
    finish_reason: str
    length: int


@dataclass
class Rollouts:
    """The rollouts of one ``generate`` call, in rollout-id order (prompt-major), with run totals."""

    rollouts: list[Rollout]
    prompts: list[list[int]]
    tokens_generated: int
    decode_steps: int
    prefill_tokens: int
    time_s: float
    seed: int
    finish_counts: dict[str, int] = field(default_factory=dict)
    slot_moves: int = 0  # live rollouts moved down into a freed slot (the live slots stay leading)

    def __len__(self) -> int:
        return len(self.rollouts)

    def __iter__(self) -> Iterator[Rollout]:
        return iter(self.rollouts)

    def __getitem__(self, i: int) -> Rollout:
        return self.rollouts[i]

    def for_prompt(self, prompt_index: int) -> list[Rollout]:
        """The rollouts of one prompt, in sample order."""
        return [r for r in self.rollouts if r.prompt_index == prompt_index]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.time_s if self.time_s > 0 else float("nan")

    @property
    def stop_rate(self) -> float:
        return self.finish_counts.get("stopped", 0) / len(self.rollouts) if self.rollouts else 0.0


# -------------------------------------------------------------------------------------------- decoder


def _device(device) -> torch.device:
    """``device`` with its index made explicit ("cuda" -> "cuda:0"), as tensors report theirs."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _rollout_seeds(rollout_seeds: object, R: int) -> list[int]:
    """``generate``'s rollout_seeds checked: one int64 per rollout (a float is refused, not truncated)."""
    if isinstance(rollout_seeds, (str, bytes)) or not isinstance(rollout_seeds, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"rollout_seeds must be a list of ints, one per rollout ({R}), "
                        f"got {type(rollout_seeds).__name__}")
    seeds = rollout_seeds.tolist() if isinstance(rollout_seeds, (np.ndarray, torch.Tensor)) else list(rollout_seeds)
    bad = [s for s in seeds if not is_integer(s)]
    if bad:
        raise TypeError(f"rollout_seeds must hold ints (each rollout's Rollout.seed), got {bad[:4]!r}")
    if len(seeds) != R or not all(-(2**63) <= s < 2**63 for s in seeds):
        raise ValueError(f"rollout_seeds must hold one int64 per rollout ({R}), got {len(seeds)} values")
    return [int(s) for s in seeds]


def _batch_buckets(max_batch: int) -> list[int]:
    sizes, p = {1, max_batch}, 1
    while p < max_batch:
        sizes.update({p, p + p // 2})
        p *= 2
    return sorted(s for s in sizes if s <= max_batch)


def _oom_message(where: str, max_batch: int, max_seq_len: int, prefill_tokens: int) -> str:
    hint = {
        "cache": f"lower max_batch (now {max_batch}) or max_seq_len (now {max_seq_len})",
        "prefill": f"lower prefill_tokens (now {prefill_tokens}) or max_batch (now {max_batch}), "
        f"or max_seq_len (now {max_seq_len})",
        "decode": f"lower max_batch (now {max_batch}) or max_seq_len (now {max_seq_len}), or pass cuda_graphs=False",
    }[where]
    return f"espo.Decoder ran out of GPU memory ({'allocating the KV cache' if where == 'cache' else where}): {hint}"


def _as_prompt(p: object, i: int, vocab: int, max_seq_len: int) -> list[int]:
    if isinstance(p, torch.Tensor):
        p = p.detach().cpu().numpy()
    if isinstance(p, (int, np.integer)):
        raise TypeError(
            "prompts must be a list of prompts, each a list of token ids; got a list of ints "
            "(wrap one prompt as [prompt])"
        )
    if isinstance(p, str):
        raise TypeError(f"prompt {i} is a string: tokenize it first (the decoder takes token ids)")
    try:
        arr = np.asarray(p)
    except Exception as err:
        raise TypeError(f"prompt {i} is not a sequence of token ids: {type(p).__name__}") from err
    if arr.size == 0:
        raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (e.g. BOS)")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(
            f"prompt {i} must be a flat sequence of int token ids, got dtype {arr.dtype} and shape {arr.shape}"
        )
    bad = arr[(arr < 0) | (arr >= vocab)]
    if bad.size:
        raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab}): {bad[:5].tolist()}")
    if arr.size >= max_seq_len:
        raise ValueError(
            f"prompt {i} has {arr.size} tokens, longer than max_seq_len - 1 = {max_seq_len - 1} (room for at least "
            "one generated token is needed): raise max_seq_len or shorten the prompt"
        )
    return arr.astype(np.int64).tolist()


class Decoder:
    """Batched sampling from a transformers causal LM with continuous batching over ``max_batch`` slots.

    Args:
        model: a Llama, Mistral, Qwen2 or Qwen3 causal LM (``transformers`` model object), or the path of
            a local checkpoint to load with ``AutoModelForCausalLM.from_pretrained``.
        max_batch: number of slots (rollouts decoded at once); the KV cache holds max_batch x max_seq_len.
        max_seq_len: longest prompt + generation a slot holds; a rollout reaching it ends with "length".
        device, dtype: where and in what the model runs; default: the model's. The model (and a value head
            or critic) is moved there in place when it is elsewhere.
        value_source: an ``espo.ValueHead`` on the policy's last hidden state, an ``espo.Critic(model, head)``
            stepped in lockstep, or None (then ``generate(prompt_values=...)`` can give a constant per prompt).
        attention: "auto" (flash-attn's KV-cache kernels when importable on a GPU in fp16/bf16, else SDPA),
            "flash" or "sdpa".
        cuda_graphs: capture the decode forward in CUDA graphs (on a GPU only), one per bucket of live slots.
        prefill_tokens: most prompt tokens prefilled in one packed forward (one prompt always fits).
        refill_batch: admit pending rollouts only once this many slots are free (or fewer are pending, or none
            is live). Default: ``max(1, max_batch // 8)`` with CUDA graphs, where each admission is an eager
            prefill forward of its own (rollouts that end at scattered steps would otherwise cost one per step);
            1 without, where refills ride in the decode step's own forward.
        progress: default of ``generate(progress=...)``: a tqdm bar over finished rollouts.

    The model's modules are used as they are (not copied): updating its weights in place, as an
    optimizer does, is seen by the next ``generate``.
    """

    def __init__(
        self,
        model: Union[nn.Module, str, os.PathLike],
        *,
        max_batch: int,
        max_seq_len: int,
        device: Union[torch.device, str, None] = None,
        dtype: torch.dtype | None = None,
        value_source: ValueHead | Critic | None = None,
        attention: str = "auto",
        cuda_graphs: bool = True,
        prefill_tokens: int = 8192,
        refill_batch: int | None = None,
        progress: bool = False,
    ):
        sizes = (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("prefill_tokens", prefill_tokens))
        for name, v in sizes + ((("refill_batch", refill_batch),) if refill_batch is not None else ()):
            if not is_integer(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (a prompt token and a generated one), got {max_seq_len}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if device is not None:
            check_device("device", device)
        if isinstance(model, (str, os.PathLike)):
            model = self._load(model, dtype)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a transformers model or a checkpoint path, got {type(model).__name__}")
        check_family(model, "model")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("the model has no parameters")
        self.device = _device(device if device is not None else first.device)
        self.dtype = dtype if dtype is not None else first.dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16 (what espo.sample reads), "
                            f"got {self.dtype}: pass dtype=torch.float32")
        self._to(model)
        self.model = model
        self.max_batch, self.max_seq_len, self.prefill_tokens = int(max_batch), int(max_seq_len), int(prefill_tokens)
        self.progress = progress
        self.attention = resolve_attention(attention, self.device, self.dtype)
        if self.device.type == "cuda":
            self._check_memory(model, value_source)
        try:
            self.policy = TransformerForward(
                model, what="model", max_seq_len=self.max_seq_len, slots=self.max_batch, device=self.device,
                dtype=self.dtype, attention=self.attention,
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
                    self.value_source.model, what="critic", max_seq_len=self.max_seq_len, slots=self.max_batch,
                    device=self.device, dtype=self.dtype, attention=self.attention,
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
            message = _oom_message("cache", self.max_batch, self.max_seq_len, self.prefill_tokens)
            raise torch.OutOfMemoryError(message) from err
        self.vocab_size = self.policy.vocab_size
        S, dev = self.max_batch, self.device
        self.slots = Slots(S, dev)
        self._caches = [m.cache for m in (self.policy, self.critic) if m is not None]  # what compact moves
        self._arange = torch.arange(max(self.max_seq_len, S), device=dev)
        self.cuda_graphs = bool(cuda_graphs) and dev.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._graph_pool = None
        self._batch_buckets = _batch_buckets(S)
        default_refill = max(1, S // 8) if self.cuda_graphs else 1
        self.refill_batch = min(S, int(refill_batch) if refill_batch is not None else default_refill)

    # ------------------------------------------------------------------------------------------ setup

    @staticmethod
    def _load(path, dtype):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no checkpoint directory at {path!r} (the decoder loads local checkpoints only)")
        return load_causal_lm(path, dtype=dtype)

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
                c.num_hidden_layers, self.max_batch, self.max_seq_len,
                getattr(c, "num_key_value_heads", None) or c.num_attention_heads, c_hd, self.dtype,
            )
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > free:
            raise torch.OutOfMemoryError(
                f"espo.Decoder: the KV cache needs {need / 2**30:.2f} GiB but {free / 2**30:.2f} GiB are free on "
                f"{self.device}: lower max_batch (now {self.max_batch}) or max_seq_len (now {self.max_seq_len})"
            )

    def reset_graphs(self) -> None:
        """Drop the captured CUDA graphs (e.g. after replacing the model's parameter tensors, not in place)."""
        self._graphs.clear()

    # ------------------------------------------------------------------------------------------ steps

    def _forward(self, ids, positions, *, decode=None, prefill=None, out_idx=None, select=None):
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

    def _decode_rows(self, b: int, length: int) -> DecodeRows:
        return DecodeRows(self.slots.seqlen[:b], self.slots.seqlen32[:b], self._arange[:b], length, self._arange)

    def _decode_forward(self, b: int, length: int):
        """Logits [b, V] and values [b] (or None) of slots 0..b-1, eager."""
        return self._forward(self.slots.tok[:b], self.slots.seqlen[:b], decode=self._decode_rows(b, length))

    def _decode_graphed(self, b: int, length: int):
        key = (b, length if self.attention == "sdpa" else 0)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(b, length)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # a capture failure costs speed, never correctness
                warnings.warn(f"espo.Decoder: CUDA graph capture failed ({err!r}); decoding eagerly", RuntimeWarning)
                self.cuda_graphs = False
                return self._decode_forward(b, length)
            self._graphs[key] = entry
        graph, outputs = entry
        graph.replay()
        return outputs

    def _capture(self, b: int, length: int):
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: rewrites this step's K/V with the same values
            for _ in range(2):
                self._decode_forward(b, length)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            outputs = self._decode_forward(b, length)
        return graph, outputs

    def _length_bucket(self, need: int) -> int:
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

    # --------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: Union[int, Sequence[int]] = 1,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stopper: EarlyStopper | None = None,
        eos_token_id: Union[int, Sequence[int], None] = None,
        prompt_values: Sequence[float] | torch.Tensor | None = None,
        rollout_seeds: Sequence[int] | None = None,
        progress: bool | None = None,
    ) -> Rollouts:
        """Sample ``n`` rollouts of each prompt (token-id lists); ``n`` is an int or one int per prompt.

        temperature 0 is greedy. ``eos_token_id`` (an int or a list) defaults to the model's
        generation_config; pass [] to generate to the length limit. Each rollout generates at most
        ``max_new_tokens``, and at most up to ``max_seq_len`` tokens with its prompt. With a ``stopper``
        (an ``espo.EarlyStopper`` of batch_size == max_batch), rows whose stop mask fires end "stopped";
        the decoder resets a stopper row when it gives it a new rollout, and leaves ``end_batch`` to the
        caller. ``prompt_values`` (one float per prompt) is the constant critic value of each prompt's
        rollouts, when the decoder has no value source. ``rollout_seeds`` (one int per rollout, prompt-major)
        replaces ``rollout_seed(seed, rollout_id)``: passing a rollout's ``Rollout.seed`` redraws it exactly,
        e.g. to continue a stopped rollout past its stop.
        """
        t0 = time.perf_counter()
        request = self._request(
            prompts, n, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stopper=stopper, eos_token_id=eos_token_id, prompt_values=prompt_values, rollout_seeds=rollout_seeds,
        )
        run = _Run.of(request, self.max_seq_len)
        self.slots.reset()
        show = self.progress if progress is None else progress
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=run.R, desc="rollouts", unit="rollout")
        try:
            self._run(run, bar)
        finally:
            if bar is not None:
                bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self._collect(run, time.perf_counter() - t0)

    def _request(
        self, prompts, n, *, max_new_tokens, temperature, top_k, top_p, seed, stopper, eos_token_id, prompt_values,
        rollout_seeds,
    ) -> "_Request":
        """``generate``'s arguments checked, each error naming what was wrong and how to fix it."""
        if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
            prompts = list(prompts)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
            raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        plist = [_as_prompt(p, i, self.vocab_size, self.max_seq_len) for i, p in enumerate(prompts)]
        P = len(plist)
        if is_integer(n):
            counts = [int(n)] * P
        elif isinstance(n, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(n, str):
            counts = [c for c in (n.tolist() if hasattr(n, "tolist") else list(n))]
            if len(counts) != P:
                raise ValueError(f"n must be an int or one int per prompt ({P}), got {len(counts)} entries")
        else:
            raise TypeError(f"n must be an int or a list of ints, got {type(n).__name__}")
        for i, c in enumerate(counts):
            if not is_integer(c) or c < 1:
                raise ValueError(f"n must be >= 1 for every prompt; got n={c!r} for prompt {i}")
        if not is_integer(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not is_real(temperature) or not np.isfinite(temperature) or not (
            temperature == 0 or temperature >= MIN_TEMPERATURE
        ):
            raise ValueError(f"temperature must be finite and 0 (greedy) or >= {MIN_TEMPERATURE:.4g} (so that 1 / T "
                             f"is a finite float32), got {temperature!r}")
        if not is_integer(top_k) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
        if not is_real(top_p) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 disables it), got {top_p!r}")
        if not is_integer(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if stopper is not None:
            if not isinstance(stopper, EarlyStopper):
                raise TypeError(f"stopper must be an espo.EarlyStopper, got {type(stopper).__name__}")
            if stopper.batch_size != self.max_batch:
                raise ValueError(
                    f"stopper.batch_size ({stopper.batch_size}) must equal the decoder's max_batch ({self.max_batch}): "
                    "the decoder gives each slot one stopper row; build it as "
                    "espo.EarlyStopper(config, max_batch, device)"
                )
            if stopper.device != self.device:  # espo.sample compares them as they are ("cuda" != "cuda:0")
                raise ValueError(
                    f"the stopper lives on {stopper.device}, the decoder on {self.device}: build it with "
                    "espo.EarlyStopper(config, max_batch, decoder.device)"
                )
        if eos_token_id is None:
            gc = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(gc, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = getattr(self.model.config, "eos_token_id", None)
        if eos_token_id is None:
            eos = []
        else:
            eos = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
        for e in eos:
            if not is_integer(e) or not 0 <= e < 2**63:
                raise ValueError(f"eos_token_id must be token ids >= 0 (int64), got {eos_token_id!r}")
        pvals = None
        if prompt_values is not None:
            if self.value_source is not None:
                raise ValueError("prompt_values and the decoder's value_source are two value sources: give one")
            pvals = prompt_values_tensor(prompt_values, P)
        R = sum(counts)
        if rollout_seeds is None:
            seeds = [rollout_seed(seed, r) for r in range(R)]
        else:
            seeds = _rollout_seeds(rollout_seeds, R)
        return _Request(
            prompts=plist, counts=counts, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
            top_k=int(top_k), top_p=float(top_p), seed=int(seed), seeds=seeds, stopper=stopper,
            eos=torch.tensor(eos, dtype=torch.int64, device=self.device) if eos else None, prompt_values=pvals,
            has_values=self.value_source is not None or pvals is not None,
        )

    def _run(self, run: "_Run", bar) -> None:
        where, slots = "prefill", self.slots
        try:
            while run.pending or slots.live.any():
                # Eager steps take refills into the decode step's own forward; the graphed step's shapes are
                # fixed, so with CUDA graphs (and when no rollout is live) refills get a forward of their own.
                if self.cuda_graphs or not slots.live.any():
                    while self._may_refill(run):
                        where = "prefill"
                        self._release(self._admit(run), bar)
                    if not slots.live.any():
                        continue
                slots.compact(self._caches)
                where = "decode"
                self._release(self._step(run), bar)
        except torch.OutOfMemoryError as err:
            message = _oom_message(where, self.max_batch, self.max_seq_len, self.prefill_tokens)
            raise torch.OutOfMemoryError(message) from err

    def _may_refill(self, run: "_Run") -> bool:
        """Whether to admit pending rollouts now: enough slots are free (refill_batch, or all that are pending),
        or no rollout is live."""
        live = self.slots.n_live
        free = self.max_batch - live
        return bool(run.pending) and free > 0 and (live == 0 or free >= min(self.refill_batch, len(run.pending)))

    def _sample(self, run: "_Run", logits, values, idx):
        """Draw for the slots ``idx`` (a slice or an index tensor); record; return the tokens and host finish codes."""
        slots, req = self.slots, run.request
        if values is None and req.prompt_values is not None:
            values = slots.pval[idx]
        stopper = req.stopper
        out = sample(
            logits, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=slots.seed[idx],
            offset=slots.gen[idx], stopper=stopper, values=values if stopper is not None else None,
            stopper_rows=slots.srow[idx] if stopper is not None else None, validate=False,
        )
        vals = values if values is not None else torch.zeros_like(out.logprobs)
        columns = (slots.rid[idx], out.tokens, out.logprobs, out.raw_logprobs, out.entropy, out.regret, vals)
        run.records.append(torch.stack([c.double() for c in columns], dim=1))  # in RECORD_COLUMNS order
        code = (~out.valid).to(torch.uint8) * _INVALID
        if req.eos is not None:
            code |= torch.isin(out.tokens, req.eos).to(torch.uint8) * _EOS
        if out.stop is not None:
            code |= out.stop.to(torch.uint8) * _STOP
        return out.tokens, code

    def _take_pending(self, run: "_Run", holes: np.ndarray) -> "_Admission | None":
        """Give pending rollouts the first of the free slots ``holes`` (one packed prefill, within prefill_tokens).

        Sets the slots' state (prompt length, offset 0, seed, stopper row, value) for their first draw.
        """
        rids, uniq, budget = [], {}, 0
        for _ in holes:
            if not run.pending:
                break
            r = run.pending[0]
            p = int(run.prompt_of[r])
            if p not in uniq:
                if uniq and budget + run.plen[p] > self.prefill_tokens:
                    break
                uniq[p] = len(uniq)
                budget += int(run.plen[p])
            rids.append(run.pending.popleft())
        k = len(rids)
        if k == 0:
            return None
        slots = holes[:k]
        uprompts = list(uniq)
        lens = run.plen[uprompts]
        offs = np.concatenate([[0], np.cumsum(lens)[:-1]])
        ids = np.concatenate([np.asarray(run.request.prompts[p], dtype=np.int64) for p in uprompts])
        positions = np.concatenate([np.arange(L, dtype=np.int64) for L in lens])
        ui = np.array([uniq[int(run.prompt_of[r])] for r in rids], dtype=np.int64)
        dst_slots = np.repeat(slots, lens[ui])
        dst_pos = np.concatenate([np.arange(lens[u], dtype=np.int64) for u in ui])
        src_idx = np.concatenate([offs[u] + np.arange(lens[u], dtype=np.int64) for u in ui])
        last_idx = offs + lens - 1
        srows = self.slots.take_stopper_rows(k)
        seeds = np.array([run.request.seeds[r] for r in rids], dtype=np.int64)
        rid_arr = np.asarray(rids, dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lens)])
        parts = [ids, positions, dst_slots, dst_pos, src_idx, last_idx, ui, slots, lens[ui], seeds, rid_arr, srows, cu]
        sizes = [len(a) for a in parts]
        flat = torch.from_numpy(np.concatenate(parts)).to(self.device, non_blocking=True)  # one transfer
        (ids_t, pos_t, dsl_t, dpo_t, src_t, last_t, ui_t, slots_t, len_t, seed_t, rid_t, srow_t, cu_t) = torch.split(
            flat, sizes
        )

        pvals = run.request.prompt_values
        values = None if pvals is None else pvals[torch.from_numpy(run.prompt_of[rids])].to(self.device)
        self.slots.admit(slots, rid_arr, lens[ui], srows, (slots_t, len_t, seed_t, rid_t, srow_t), values)
        if run.request.stopper is not None:
            mask = torch.zeros(self.max_batch, dtype=torch.bool)
            mask[torch.from_numpy(srows)] = True
            run.request.stopper.reset_rows(mask.to(self.device))
        segments = [(int(o), int(L)) for o, L in zip(offs, lens)]
        prefill = PrefillRows(segments, cu_t.to(torch.int32), int(lens.max()), dsl_t, dpo_t, src_t)
        return _Admission(rid_arr, slots, ids_t, pos_t, prefill, last_t, ui_t, slots_t)

    def _admitted(self, run: "_Run", adm: "_Admission") -> None:
        """The admitted rollouts drew their first tokens."""
        run.prefill_tokens += int(adm.ids.shape[0])
        run.gen[adm.rids] += 1

    def _admit(self, run: "_Run") -> np.ndarray:
        """Prefill pending rollouts into the lowest free slots in a forward of their own; draw their first tokens."""
        adm = self._take_pending(run, np.flatnonzero(~self.slots.live))
        logits, values = self._forward(adm.ids, adm.positions, prefill=adm.prefill, out_idx=adm.last_idx, select=adm.ui)
        tokens, code = self._sample(run, logits, values, adm.slots_t)
        self.slots.advance(adm.slots_t, tokens, decoded=0)
        code = code.cpu().numpy()  # the one host sync of this prefill
        self._admitted(run, adm)
        return self._endings(run, adm.slots, code)

    def _step(self, run: "_Run") -> np.ndarray:
        """One decode step over the live slots 0..b-1; eager, it also prefills pending rollouts into slots b..b+k-1."""
        slots = self.slots
        b = slots.n_live
        need = int(slots.length[:b].max()) + 1
        length = self._length_bucket(need)
        adm = None
        if not self.cuda_graphs and self._may_refill(run):
            adm = self._take_pending(run, np.arange(b, self.max_batch))
        if self.cuda_graphs:
            bb = next(s for s in self._batch_buckets if s >= b)
            logits, values = self._decode_graphed(bb, length)
            logits = logits[:b]
            values = None if values is None else values[:b]
        elif adm is None:
            logits, values = self._decode_forward(b, length)
        else:  # one forward: the b decode tokens, then the admitted rollouts' packed prompts
            rows = self._arange[:b]
            logits, values = self._forward(
                torch.cat([slots.tok[:b], adm.ids]), torch.cat([slots.seqlen[:b], adm.positions]),
                decode=self._decode_rows(b, length), prefill=adm.prefill,
                out_idx=torch.cat([rows, b + adm.last_idx]), select=torch.cat([rows, b + adm.ui]),
            )
        n = b + (0 if adm is None else len(adm.rids))
        tokens, code = self._sample(run, logits, values, slice(0, n))
        slots.advance(slice(0, n), tokens, decoded=b)
        code = code.cpu().numpy()  # the one host sync of this step
        run.decode_steps += 1
        run.gen[slots.rollout[:b]] += 1
        if adm is not None:
            self._admitted(run, adm)
        return self._endings(run, np.arange(n), code)

    def _endings(self, run: "_Run", slots: np.ndarray, code: np.ndarray) -> np.ndarray:
        """Record why the rollouts in ``slots`` ended, for those that did; return their slots."""
        rids = self.slots.rollout[slots]
        at_limit = run.gen[rids] >= run.limit[rids]
        ended = (code != 0) | at_limit
        for r, c in zip(rids[ended], code[ended]):
            if c & _STOP:
                reason, length = "stopped", run.gen[r]
            elif c & _INVALID:
                reason, length = "invalid", run.gen[r] - 1
            elif c & _EOS:
                reason, length = "eos", run.gen[r]
            else:
                reason, length = "length", run.gen[r]
            run.reason[r], run.length[r] = reason, length
        return slots[ended]

    def _release(self, slots: np.ndarray, bar) -> None:
        """Free the slots of rollouts that ended."""
        if len(slots) == 0:
            return
        self.slots.free(slots)
        if bar is not None:
            bar.update(len(slots))

    def _collect(self, run: "_Run", elapsed: float) -> Rollouts:
        rec = torch.cat(run.records).cpu().numpy() if run.records else np.zeros((0, len(RECORD_COLUMNS)))
        rid, token, logprob, raw_logprob, entropy, regret, value = range(len(RECORD_COLUMNS))
        order = np.argsort(rec[:, rid], kind="stable")
        rec = rec[order]
        starts = np.searchsorted(rec[:, rid], np.arange(run.R))
        req = run.request
        out, counts = [], {k: 0 for k in FINISH_REASONS}
        for r in range(run.R):
            L = int(run.length[r])
            block = rec[starts[r] : starts[r] + L]
            f32 = lambda j: torch.from_numpy(block[:, j].astype(np.float32))  # noqa: E731
            counts[run.reason[r]] += 1
            out.append(
                Rollout(
                    rollout_id=r, prompt_index=int(run.prompt_of[r]), sample_index=int(run.sample_of[r]),
                    seed=req.seeds[r], tokens=torch.from_numpy(block[:, token].astype(np.int64)),
                    logprobs=f32(logprob), raw_logprobs=f32(raw_logprob), entropy=f32(entropy), regret=f32(regret),
                    values=f32(value) if req.has_values else None, finish_reason=run.reason[r], length=L,
                )
            )
        return Rollouts(
            rollouts=out, prompts=req.prompts, tokens_generated=int(run.length.sum()), decode_steps=run.decode_steps,
            prefill_tokens=run.prefill_tokens, time_s=elapsed, seed=req.seed, finish_counts=counts,
            slot_moves=self.slots.moves,
        )


# One row per drawn token, in this column order.
RECORD_COLUMNS = ("rollout_id", "token", "logprob", "raw_logprob", "entropy", "regret", "value")


@dataclass
class _Request:
    """``generate``'s inputs, checked.

    prompts: P token-id lists; counts: rollouts per prompt [P]; seeds: each rollout's sampling seed [R];
    eos: the EOS ids on the device, or None; prompt_values: [P] constant values, or None; has_values: the
    rollouts carry values (from the decoder's value source or ``prompt_values``).
    """

    prompts: list[list[int]]
    counts: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    seeds: list[int]
    stopper: EarlyStopper | None
    eos: torch.Tensor | None
    prompt_values: torch.Tensor | None
    has_values: bool


@dataclass
class _Run:
    """The host-side progress of one generate call, per rollout [R] (ids in prompt-major order).

    prompt_of, sample_of: each rollout's prompt and its index among that prompt's rollouts; plen: prompt
    lengths [P]; limit: the most tokens each may generate; gen: tokens generated so far; length, reason:
    set when it ends; pending: rollouts not yet admitted; records: [tokens, len(RECORD_COLUMNS)] blocks.
    """

    request: _Request
    prompt_of: np.ndarray
    sample_of: np.ndarray
    plen: np.ndarray
    limit: np.ndarray
    gen: np.ndarray
    length: np.ndarray
    reason: list[str]
    pending: deque
    records: list[torch.Tensor] = field(default_factory=list)
    decode_steps: int = 0
    prefill_tokens: int = 0

    @property
    def R(self) -> int:
        return len(self.reason)

    @classmethod
    def of(cls, request: _Request, max_seq_len: int) -> "_Run":
        counts = request.counts
        R, P = sum(counts), len(counts)
        prompt_of = np.repeat(np.arange(P, dtype=np.int64), counts)
        plen = np.array([len(p) for p in request.prompts], dtype=np.int64)
        return cls(
            request=request,
            prompt_of=prompt_of,
            sample_of=np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if P else np.zeros(0, np.int64),
            plen=plen,
            limit=np.minimum(request.max_new_tokens, max_seq_len - plen[prompt_of]) if R else np.zeros(0, np.int64),
            gen=np.zeros(R, dtype=np.int64),
            length=np.zeros(R, dtype=np.int64),
            reason=[""] * R,
            pending=deque(range(R)),
        )


@dataclass
class _Admission:
    """Pending rollouts given free slots: their packed prompts (each prompt once) and where each one's K/V go.

    rids, slots [k]: the rollouts and their slots (host); ids, positions [N]: the packed prompt tokens;
    last_idx [U]: each prompt's last token in them; ui [k]: each rollout's prompt among the U; slots_t [k]:
    the slots on the device.
    """

    rids: np.ndarray
    slots: np.ndarray
    ids: torch.Tensor
    positions: torch.Tensor
    prefill: PrefillRows
    last_idx: torch.Tensor
    ui: torch.Tensor
    slots_t: torch.Tensor
