"""``espo.sample``: one decoding step's token, its statistics and the ESPO stop mask, from one read of the logits.

The public op: its checks and its dispatch. The op's other homes share its name: ``espo.ops.reference``
(the definition), ``espo.ops.torch_backend`` (the "torch" backend: the reference's tokens in fewer passes),
``kernels/sample.py`` (Triton, ``espo.kernels.sample``),
``csrc/sample.cu`` with ``espo.ops.cuda`` (CUDA) and ``tests/ops/test_sample.py``. (This module is not named
``sample.py`` because the function ``espo.sample`` would hide it.)
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import torch

from espo.checks import is_integer, is_real

from .backends import resolve_backend
from .stopper import EarlyStopper
from .torch_backend import sample_torch

RowArg = Union[int, float, torch.Tensor]
_INT64_MIN, _UINT64_END = -(2**63), 2**64
MIN_TEMPERATURE = 2.0**-126  # the smallest normal float32: below it 1 / T overflows


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


def _can_check_values(t: torch.Tensor, validate: bool) -> bool:
    """Value checks read the tensor on the host (a device sync): skipped when asked, and during graph capture."""
    return validate and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _row_arg(name: str, value: RowArg, B: int, device: torch.device, integer: bool, validate: bool = True) -> RowArg:
    """A Python number (NumPy numbers accepted), or a [B] tensor moved to ``device`` as int64 or float32 (a float64
    value that float32 would round to 0 refused, when ``validate``)."""
    kind = type(value)  # the common case first: a plain Python number (a fixed cost on every call)
    if kind is float and not integer:
        return value
    if kind is int and (not integer or (_INT64_MIN <= value < 2**63 or name == "seed")):
        return value if integer else float(value)
    if isinstance(value, torch.Tensor):
        if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise TypeError(f"{name} must hold integers (e.g. torch.int64), got a {value.dtype} tensor")
        if not integer and not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold floats, got a {value.dtype} tensor")
        if value.dim() == 0:
            value = value.expand(B)
        if value.shape != (B,):
            raise ValueError(f"{name} must be a scalar or have one entry per row, shape ({B},); "
                             f"got {tuple(value.shape)}")
        converted = value.to(device=device, dtype=torch.int64 if integer else torch.float32).contiguous()
        if not integer and value.dtype == torch.float64 and _can_check_values(value, validate):
            flushed = (value != 0) & (converted == 0)  # e.g. 1e-50: non-zero in float64, 0 (greedy) in float32
            if bool(flushed.any()):
                raise ValueError(f"{name} holds {value[flushed][:4].tolist()}, which float32 rounds to 0: pass 0 or a "
                                 f"value float32 holds as a normal number (>= {MIN_TEMPERATURE:.4g})")
        return converted
    if integer:
        if not is_integer(value):
            raise TypeError(f"{name} must be an int or an integer tensor of shape ({B},), got {type(value).__name__}")
        value = int(value)
        if name != "seed" and not _INT64_MIN <= value < 2**63:  # seeds take the unsigned range too (_seed_int64)
            raise ValueError(f"{name} must fit in a signed 64-bit int, got {value}")
        return value
    if not is_real(value):
        raise TypeError(f"{name} must be a float or a float tensor of shape ({B},), got {type(value).__name__}")
    return float(value)


def _check(name: str, value: RowArg, ok, expected: str, validate: bool) -> None:
    if isinstance(value, torch.Tensor):
        if _can_check_values(value, validate) and not bool(ok(value).all()):
            raise ValueError(f"{name} must be {expected}; got {value[~ok(value)][:4].tolist()} in some rows")
    elif not ok(value):  # a Python number: checked without making a tensor (a fixed cost on every call)
        raise ValueError(f"{name} must be {expected}, got {value}")


def _finite(t: RowArg):
    return torch.isfinite(t) if isinstance(t, torch.Tensor) else math.isfinite(t)


def _seed_int64(seed: RowArg) -> RowArg:
    if isinstance(seed, int):
        if not _INT64_MIN <= seed < _UINT64_END:
            raise ValueError(f"seed must fit in 64 bits (signed or unsigned), got {seed}")
        return seed - _UINT64_END if seed >= 2**63 else seed
    return seed


def _triton(*args):
    from espo.kernels.sample import sample_triton

    return sample_triton(*args)


def _cuda(*args):
    from .cuda import sample_cuda

    return sample_cuda(*args)


# backend -> f(logits, temperature, top_k, top_p, seed, offset, stop) -> dict of the SampleOutput fields
_IMPLEMENTATIONS: dict[str, Callable[..., dict]] = {"torch": sample_torch, "triton": _triton, "cuda": _cuda}


def sample(
    logits: torch.Tensor,
    *,
    temperature: RowArg = 1.0,
    top_k: RowArg = 0,
    top_p: RowArg = 1.0,
    seed: RowArg = 0,
    offset: RowArg = 0,
    stopper: EarlyStopper | None = None,
    values: torch.Tensor | None = None,
    stopper_rows: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
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
    if logits.device.type == "meta":
        raise ValueError("logits are on the meta device (shapes without data): pass real logits, on the CPU or a GPU")
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits has an empty vocabulary (V == 0): there is no token to sample")
    device = logits.device
    temperature = _row_arg("temperature", temperature, B, device, integer=False, validate=validate)
    top_k = _row_arg("top_k", top_k, B, device, integer=True)
    top_p = _row_arg("top_p", top_p, B, device, integer=False, validate=validate)
    seed = _seed_int64(_row_arg("seed", seed, B, device, integer=True))
    offset = _row_arg("offset", offset, B, device, integer=True)
    _check("temperature", temperature, lambda t: ((t == 0) | (t >= MIN_TEMPERATURE)) & _finite(t),
           f"finite and 0 (greedy) or >= {MIN_TEMPERATURE:.4g} (so that 1 / T is a finite float32)", validate)
    _check("top_k", top_k, lambda k: k >= 0, ">= 0 (0 disables top-k)", validate)
    _check("top_p", top_p, lambda p: (p > 0) & (p <= 1), "in (0, 1] (1 disables top-p)", validate)
    _check("offset", offset, lambda o: o >= 0, ">= 0 (the token's position)", validate)
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
        if _can_check_values(stopper_rows, validate):
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
        if _can_check_values(values, validate) and not bool(torch.isfinite(values).all()):
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
    out = _IMPLEMENTATIONS[backend](logits, temperature, top_k, top_p, seed, offset, stop)
    if live is not None:  # the value rule reads the critic's value, not the logits: one [B] test after the draw
        out["stop"] = stopper.apply_value_rule(out["stop"], live, out["valid"], stopper_rows, values)
    return SampleOutput(**out)
