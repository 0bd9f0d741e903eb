"""``espo.Decoder``: continuous batching for transformers causal LMs that frees a row's compute the step it ends.

The decoder runs the model's own modules (embedding, norms, projections, MLPs, LM head) with its own
forward (``espo.engine.forward``) over its own slotted KV cache (``espo.engine.kv_cache``), so that:

* a fixed pool of ``max_batch`` slots holds the live rollouts; a rollout that ends (EOS, its length
  limit, or an ESPO stop) frees its slot at once, the next pending rollout is prefilled into it, and
  each decode step computes the live slots only (live rollouts are kept in the leading slots); an
  eager step prefills its refills in its own forward, so a refill costs no extra read of the weights;
* every token is drawn by ``espo.sample`` with the rollout's own seed and the token's position as the
  offset, so a rollout's tokens do not depend on which others share its batch: a run with a stopper
  draws the tokens of the same run without one, up to the stop;
* the ESPO stop rule runs inside the sampling op, one ``EarlyStopper`` row per slot;
* one host sync per decode step (the finished mask), which ``overlap_steps`` moves behind the next step's launch;
  on a GPU the decode forward is captured in CUDA graphs, one per bucket of live slots (and of cached length,
  with SDPA).

Supported model families: Llama, Mistral, Qwen2, Qwen3 (standard attention with RoPE).

This module holds the public face (``Decoder``, its arguments' checks, ``rollout_seed``; the results
``Rollout``/``Rollouts`` are ``espo.engine.sequence``'s) and wires two parts: ``espo.engine.scheduler.Scheduler``
decides which rollout runs in which slot and when, ``espo.engine.model_runner.ModelRunner`` runs the model over
the slots and draws the tokens.
"""

from __future__ import annotations

import os
import time
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from espo.checks import is_integer
from espo.ops.sampling_params import SamplingParams
from espo.ops.stopper import EarlyStopper

from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Request, Rollout, Rollouts, RunState
from .value_head import Critic, ValueHead, prompt_values_tensor

__all__ = ["Decoder", "Rollout", "Rollouts", "rollout_seed"]  # the results are defined in .sequence

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


# -------------------------------------------------------------------------------------------- decoder


def _rollout_seeds(rollout_seeds: object, R: int) -> list[int]:
    """``generate``'s rollout_seeds checked: one int64 per rollout (a float is refused, not truncated)."""
    if isinstance(rollout_seeds, (str, bytes)) or not isinstance(rollout_seeds, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(
            f"rollout_seeds must be a list of ints, one per rollout ({R}), got {type(rollout_seeds).__name__}"
        )
    seeds = rollout_seeds.tolist() if isinstance(rollout_seeds, (np.ndarray, torch.Tensor)) else list(rollout_seeds)
    bad = [s for s in seeds if not is_integer(s)]
    if bad:
        raise TypeError(f"rollout_seeds must hold ints (each rollout's Rollout.seed), got {bad[:4]!r}")
    if len(seeds) != R or not all(-(2**63) <= s < 2**63 for s in seeds):
        raise ValueError(f"rollout_seeds must hold one int64 per rollout ({R}), got {len(seeds)} values")
    return [int(s) for s in seeds]


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
            is live). Default: ``max(1, max_batch // 8)`` with CUDA graphs, where such an admission is an eager
            prefill forward of its own (rollouts that end at scattered steps would otherwise cost one per step)
            and fewer free slots are refilled inside the graphed decode step (``refill_tokens``); 1 without, where
            refills ride in the decode step's own forward.
        refill_tokens: with CUDA graphs, the graphed decode step also prefills up to this many prompt tokens (a
            prompt counted once per rollout) of pending rollouts into free slots, fewer than refill_batch of them,
            so that a rollout that ends (an ESPO stop, EOS) is replaced at the next step without a forward of its
            own. The chunk has fixed sizes (refill_tokens halved down to 32 tokens, a CUDA graph each): a refill
            rides in the smallest that holds it and costs that size's compute, padding included. 0: off.
        progress: default of ``generate(progress=...)``: a tqdm bar over finished rollouts.
        fused_ops: run the RMSNorms (each with the residual add before it), the RoPE of q and k (with a decode
            step's two KV-cache writes) and a silu MLP's activation as one Triton kernel each
            (``espo.engine.fused_ops``) instead of the modules' eager ops, which launch ~9, ~12 and 2 kernels;
            the q, k and v projections as one GEMM, from a copy of their weights (5% more weight memory on
            Qwen2.5-0.5B, 12% on SmolLM2-135M; not for Qwen3, whose q/k norms read q and k whole), renewed at each
            ``generate``; and, in bf16/fp16, a decode step's gate and up projections with silu * up as one Triton
            GEMM (``fused_ops.gate_up_silu``, its float32 sums in another order than cuBLAS's).
            False (default, until a GPU run has timed them and held them to the unfused rollouts) or True;
            None: on where the model is on a CUDA device and the Triton backend is available. True where they cannot
            run (no Triton, or a CPU device without ``TRITON_INTERPRET=1``) is a ValueError.
            The kernels round where the eager ops do; see ``espo.engine.fused_ops`` for where they can differ.
        overlap_steps: launch each decode step before reading the previous step's finish codes (which rollouts
            ended), so that the host's work between two steps (reading the codes, freeing and compacting slots,
            packing refills) runs while the device computes, not while it waits. A rollout that ended is then drawn
            once more by the step already launched; that draw is undone (its stopper row restored, its record never
            collected), so the rollouts, their records and the stopper's state are those of ``overlap_steps=False``,
            and a freed slot is refilled one step later. False (default, until a GPU run has timed it) or True;
            None: on where the model runs on a CUDA device (elsewhere the device does not run ahead of the host).

    The model's modules are used as they are (not copied, but for the fused q/k/v weights, renewed at each
    ``generate``): updating its weights in place, as an optimizer does, is seen by the next ``generate``.
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
        fused_ops: bool | None = False,
        refill_tokens: int = 256,
        overlap_steps: bool | None = False,
    ):
        sizes = (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("prefill_tokens", prefill_tokens))
        for name, v in sizes + ((("refill_batch", refill_batch),) if refill_batch is not None else ()):
            if not is_integer(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not is_integer(refill_tokens) or refill_tokens < 0:
            raise ValueError(f"refill_tokens must be an int >= 0 (0: off), got {refill_tokens!r}")
        if overlap_steps is not None and not isinstance(overlap_steps, bool):
            raise TypeError(f"overlap_steps must be True, False or None, got {overlap_steps!r}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (a prompt token and a generated one), got {max_seq_len}")
        self.runner = ModelRunner(
            model,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            device=device,
            dtype=dtype,
            value_source=value_source,
            attention=attention,
            cuda_graphs=cuda_graphs,
            fused_ops=fused_ops,
        )
        if overlap_steps is None:
            overlap_steps = self.runner.device.type == "cuda"
        self.scheduler = Scheduler(self.runner, prefill_tokens=int(prefill_tokens), refill_batch=refill_batch,
                                   refill_tokens=int(refill_tokens), overlap_steps=overlap_steps)
        self.progress = progress

    # ------------------------------------------------------------------------- the runner's and scheduler's

    model = property(lambda self: self.runner.model, doc="the policy model (moved to ``device``, ``dtype``)")
    device = property(lambda self: self.runner.device, doc="where the model runs (its index explicit)")
    dtype = property(lambda self: self.runner.dtype)
    attention = property(lambda self: self.runner.attention, doc='"flash" or "sdpa", as resolved')
    fused_ops = property(lambda self: self.runner.fused_ops, doc="whether the fused kernels run, as resolved")
    max_batch = property(lambda self: self.runner.max_batch)
    max_seq_len = property(lambda self: self.runner.max_seq_len)
    vocab_size = property(lambda self: self.runner.vocab_size)
    value_source = property(lambda self: self.runner.value_source)
    policy = property(lambda self: self.runner.policy, doc="the policy's TransformerForward")
    critic = property(lambda self: self.runner.critic, doc="the critic's TransformerForward, or None")
    slots = property(lambda self: self.runner.slots, doc="the per-slot state (espo.engine.slots.Slots)")
    prefill_tokens = property(lambda self: self.scheduler.prefill_tokens)
    refill_batch = property(lambda self: self.scheduler.refill_batch)
    refill_tokens = property(lambda self: self.scheduler.refill_tokens)
    overlap_steps = property(lambda self: self.scheduler.overlap_steps, doc="whether steps overlap, as resolved")

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs (False off a GPU, or once a capture failed)."""
        return self.runner.cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        self.runner.cuda_graphs = on

    def reset_graphs(self) -> None:
        """Drop the captured CUDA graphs (e.g. after replacing the model's parameter tensors, not in place)."""
        self.runner.reset_graphs()

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
            prompts,
            n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stopper=stopper,
            eos_token_id=eos_token_id,
            prompt_values=prompt_values,
            rollout_seeds=rollout_seeds,
        )
        run = RunState.of(request, self.max_seq_len)
        self.runner.refresh_weights()
        show = self.progress if progress is None else progress
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=run.R, desc="rollouts", unit="rollout")
        try:
            self.scheduler.run(run, bar)
        finally:
            if bar is not None:
                bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.scheduler.collect(run, time.perf_counter() - t0)

    def _request(
        self,
        prompts,
        n,
        *,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stopper,
        eos_token_id,
        prompt_values,
        rollout_seeds,
    ) -> Request:
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
        sampling = SamplingParams.shared(temperature=temperature, top_k=top_k, top_p=top_p)
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
        given_eos = eos_token_id is not None
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
            if given_eos and e >= self.vocab_size:  # never sampled: every rollout would run to its length limit
                raise ValueError(f"eos_token_id {int(e)} is outside the model's vocabulary [0, {self.vocab_size}): "
                                 "no rollout could end with it; pass ids of the model's own end tokens")
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
        return Request(
            prompts=plist,
            counts=counts,
            max_new_tokens=int(max_new_tokens),
            sampling=sampling,
            seed=int(seed),
            seeds=seeds,
            stopper=stopper,
            eos=torch.tensor(eos, dtype=torch.int64, device=self.device) if eos else None,
            prompt_values=pvals,
            has_values=self.value_source is not None or pvals is not None,
        )
