"""``espo.sample``: one decoding step's token, its statistics and the ESPO stop mask, from one read of the logits.

The public op: its checks and its dispatch. The sampling settings are ``espo.ops.sampling_params``'s
``SamplingParams``, checked where built; the op's other homes: ``espo.ops.reference``
(the definition), ``espo.ops.torch_backend`` (the "torch" backend: the reference's tokens in fewer passes),
``kernels/sample.py`` (Triton, ``espo.kernels.sample``),
``csrc/sample_kernels.cuh`` with ``espo.ops.cuda`` (CUDA) and ``tests/ops/test_sample.py``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .backends import resolve_backend
from .sampling_params import (
    MIN_TEMPERATURE,
    RowArg,
    SamplingParams,
    can_check_values,
    check_values,
    number_or_rows,
    rows_of,
)
from .stopper import EarlyStopper
from .torch_backend import sample_torch

__all__ = ["MIN_TEMPERATURE", "RowArg", "SampleOutput", "SamplingParams", "sample"]


class SampleOutput(NamedTuple):
    """What ``espo.sample`` returns, one entry per row (all on the logits' device).

    tokens: int64, the sampled token; -1 where the row is invalid.
    logprobs: float32, log-probability of the token under the tempered distribution (before top-k/top-p).
    raw_logprobs: float32, the same at temperature 1 (what importance ratios against the policy need).
    entropy: float32, entropy of the tempered distribution.
    max_logprob: float32, the largest tempered log-probability.
    regret: float32, max_logprob - logprobs (>= 0; exactly 0 for greedy rows).
    valid: bool, False where the row held a NaN or +inf logit or no finite logit; its floats are NaN.
    stop: bool, the ESPO stop mask when a stopper was given, else None.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    raw_logprobs: torch.Tensor
    entropy: torch.Tensor
    max_logprob: torch.Tensor
    regret: torch.Tensor
    valid: torch.Tensor
    stop: torch.Tensor | None


class _Default(float):
    """A keyword's default, told apart from the same number passed on purpose (``params=`` excludes the keywords)."""


class _DefaultInt(int):
    """``_Default`` for the integer keywords."""


_TEMPERATURE, _TOP_P, _TOP_K, _SEED = _Default(1.0), _Default(1.0), _DefaultInt(0), _DefaultInt(0)


def _params_of(temperature, top_k, top_p, seed, params, validate: bool) -> SamplingParams:
    """The sampling settings: ``params``, or the keywords checked into a ``SamplingParams`` (never both)."""
    if params is None:
        return SamplingParams(1.0 if temperature is _TEMPERATURE else temperature, 0 if top_k is _TOP_K else top_k,
                              1.0 if top_p is _TOP_P else top_p, 0 if seed is _SEED else seed, validate)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be an espo.SamplingParams, got {type(params).__name__}")
    given = [name for name, value, default in (("temperature", temperature, _TEMPERATURE), ("top_k", top_k, _TOP_K),
                                               ("top_p", top_p, _TOP_P), ("seed", seed, _SEED)) if value is not default]
    if given:
        raise TypeError(f"pass the sampling settings either as params=SamplingParams(...) or as keywords, not both: "
                        f"got params and {', '.join(given)}")
    return params


def _triton(*args):
    from espo.kernels.sample import sample_triton

    return sample_triton(*args)


def _cuda(*args):
    from .cuda import sample_cuda

    return sample_cuda(*args)


# backend -> f(logits, params for these rows (SamplingParams.on_rows), offset, stop) -> dict of the SampleOutput fields
_IMPLEMENTATIONS: dict[str, Callable[..., dict]] = {"torch": sample_torch, "triton": _triton, "cuda": _cuda}


def sample(
    logits: torch.Tensor,
    *,
    temperature: RowArg = _TEMPERATURE,
    top_k: RowArg = _TOP_K,
    top_p: RowArg = _TOP_P,
    seed: RowArg = _SEED,
    offset: RowArg = 0,
    stopper: EarlyStopper | None = None,
    values: torch.Tensor | None = None,
    stopper_rows: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
    params: SamplingParams | None = None,
) -> SampleOutput:
    """Sample one token per row of ``logits`` [B, V] and return it with its statistics.

    Args:
        logits: [B, V] float32, bfloat16 or float16, any V >= 1.
        temperature: a scalar or [B]; 0 means greedy (the first maximal logit); otherwise >= 2**-126 (the smallest
            normal float32, so that 1 / T is finite).
        top_k: >= 0, a scalar or [B]; keep the k largest logits (ties kept); 0 keeps all. Applied first.
        top_p: in (0, 1], a scalar or [B]; keep the smallest most-likely set whose mass reaches top_p.
        seed, offset: int64 scalars or [B]; each row's draw comes from Philox keyed by its own (seed,
            offset) (``espo.ops.philox``), so a row samples the same token in any batch. Use the token's position
            as its offset.
        params: the four settings above as one ``espo.SamplingParams``, checked when it was built, instead of the
            keywords (TypeError when both are given).
        stopper: an ``EarlyStopper`` over these B rows; it is updated in place and ``stop`` is returned.
        values: [B] critic values of the prefixes, for the stop threshold; None uses the config's value floor.
            They must be finite (checked when ``validate``); unchecked, a NaN or infinite value counts as the floor.
        stopper_rows: int64 [B], the stopper row that each logits row updates (distinct); None means row i
            updates stopper row i, and then the stopper must have exactly B rows. A decoder with a pool of
            slots passes the live slots here.
        backend: "torch" (the reference), "triton", "cuda", or "auto" (the fastest available here).
        validate: check the values of per-row tensors (temperature >= 0, ...). Each check reads the tensor
            on the host, a device sync that costs more than the kernel at small B: hot loops that build
            their arguments themselves pass False. Shapes, dtypes and Python numbers are always checked.
            With ``params``, it covers offset, values and stopper_rows (params were checked when built).

    Invalid rows never raise and never yield a silent token: a NaN or +inf logit, no finite logit, or
    tempered logits that leave the float32 range (``|x| * log2(e) / T >= 3.4e38``; see ``espo.ops.reference``)
    are flagged False in ``valid`` with token -1 and NaN statistics, on every backend, and the stopper
    ignores them.
    Bad arguments raise ValueError or TypeError naming the argument.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [B, V] (rank 2), got rank {logits.dim()} "
                         f"with shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    device = logits.device
    if device.type == "meta":
        raise ValueError("logits are on the meta device (shapes without data): pass real logits, on the CPU or a GPU")
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits has an empty vocabulary (V == 0): there is no token to sample")
    params = _params_of(temperature, top_k, top_p, seed, params, validate).on_rows(B, device)
    offset = rows_of("offset", number_or_rows("offset", offset, integer=True), B, device)
    check_values("offset", offset, lambda o: o >= 0, ">= 0 (the token's position)", validate)
    if stopper is not None:
        if not isinstance(stopper, EarlyStopper):
            raise TypeError(f"stopper must be an espo.EarlyStopper, got {type(stopper).__name__}")
        if stopper.device != device:
            raise ValueError(f"stopper lives on {stopper.device}, but logits are on {device}")
        if stopper_rows is None and stopper.batch_size != B:
            raise ValueError(
                f"stopper holds {stopper.batch_size} rows but logits have {B}; pass stopper_rows to say which rows"
            )
    if stopper_rows is not None:
        if stopper is None:
            raise ValueError("stopper_rows needs a stopper")
        if not isinstance(stopper_rows, torch.Tensor) or stopper_rows.shape != (B,) or stopper_rows.is_floating_point():
            raise ValueError(f"stopper_rows must be an integer tensor of shape ({B},), got {stopper_rows!r:.80}")
        stopper_rows = stopper_rows.to(device=device, dtype=torch.int64).contiguous()
        if can_check_values(stopper_rows, validate):
            in_range = bool(((stopper_rows >= 0) & (stopper_rows < stopper.batch_size)).all())
            if not in_range or stopper_rows.unique().numel() != B:
                raise ValueError(f"stopper_rows must be distinct row indices in [0, {stopper.batch_size}), "
                                 f"got {stopper_rows[:8].tolist()}")
    if values is not None:
        if stopper is None:
            raise ValueError("values are only used by the stop rule: pass a stopper too, or drop values")
        if not isinstance(values, torch.Tensor) or values.shape != (B,) or not values.is_floating_point():
            raise ValueError(f"values must be a float tensor of shape ({B},), got {values!r:.80}")
        values = values.to(device=device, dtype=torch.float32).contiguous()
        if can_check_values(values, validate) and not bool(torch.isfinite(values).all()):
            raise ValueError(f"values must be finite; got {values[~torch.isfinite(values)][:4].tolist()} in some rows "
                             "(with validate=False a non-finite value counts as the value floor)")
    if logits.stride(1) != 1:
        logits = logits.contiguous()

    backend = resolve_backend(backend, device)
    if B == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return SampleOutput(empty.long(), empty, empty, empty, empty, empty, empty.bool(),
                            None if stopper is None else empty.bool())
    stop = None if stopper is None else stopper.state(stopper_rows, values)
    live = None if stopper is None else stopper.live(stopper_rows)
    out = _IMPLEMENTATIONS[backend](logits, params, offset, stop)
    if live is not None:  # the value rule reads the critic's value, not the logits: one [B] test after the draw
        out["stop"] = stopper.apply_value_rule(out["stop"], live, out["valid"], stopper_rows, values)
    return SampleOutput(**out)
