"""The "cuda" backend: the compiled kernels of ``espo._C`` (csrc/), called through ``torch.ops.espo``.

Same contract as ``espo.kernels.sample.sample_triton`` and ``espo.ops.reference.sample_reference``: an
``espo.ops.sampling_params.SamplingParams`` for these rows and ``offset``, Python numbers or [B] tensors on the
logits' device (float32 temperature/top_p, int64 top_k/seed/offset), already checked by whoever built them and
``espo.sample``; the stop state is an ``espo.ops.stopper.StopState``; the
result is the dict of ``SampleOutput`` fields. The same Philox stream, chunking rule and exact integer sampling
rule (``espo.ops.reference``) as the Triton backend, with the same ex2.approx instruction, so both return the
same tokens for the same inputs, bit for bit. Works under torch.compile (the ops have meta implementations and
declare the stop state they update in place) and under CUDA graph capture (no host sync, no allocation outside
torch's caching allocator).
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from .sampling_params import SamplingParams
from .stopper import StopState

_FIELDS = ("tokens", "logprobs", "raw_logprobs", "entropy", "max_logprob", "regret", "valid")


@lru_cache(maxsize=None)
def load_extension():
    """Import ``espo._C``, which registers ``torch.ops.espo.sample`` and ``torch.ops.espo.sample_stop``."""
    return importlib.import_module("espo._C")


@lru_cache(maxsize=None)
def _ops():
    """The two ops' overloads, resolved once (calling an overload skips the packet's per-call overload lookup)."""
    load_extension()
    return torch.ops.espo.sample.default, torch.ops.espo.sample_stop.default


def _split(value, default):
    """A per-row argument as the op takes it: (tensor or None, the scalar used when the tensor is None)."""
    if isinstance(value, torch.Tensor):
        return value, default
    return None, value


def sample_cuda(logits, params: SamplingParams, offset, stop: StopState | None = None):
    """Run the fused op; returns tokens, logprobs, raw_logprobs, entropy, max_logprob, regret, valid, stop."""
    sample_op, sample_stop_op = _ops()
    args = (
        logits.detach() if logits.requires_grad else logits,
        *_split(params.temperature, 1.0),
        *_split(params.top_k, 0),
        *_split(params.top_p, 1.0),
        *_split(params.seed, 0),
        *_split(offset, 0),
    )
    if stop is None:
        out = dict(zip(_FIELDS, sample_op(*args)))
        out["stop"] = None
        return out
    res = sample_stop_op(
        *args,
        stop.z, stop.sum_g, stop.sum_g2, stop.count, stop.position, stop.stopped, stop.scalars, stop.rows, stop.values,
        stop.alpha_s, stop.clip, stop.delta, stop.value_floor, stop.min_tokens,
    )
    out = dict(zip(_FIELDS, res[:7]))
    out["stop"] = res[7]
    return out
