"""``SamplingParams``: how ``espo.sample`` draws (temperature, top-k, top-p, seed), checked once, where it is built.

``espo.sample`` takes one (``params=``) or builds one from its keywords; ``espo.Decoder.generate`` and the
transformers integration build one per call. It then goes down whole, with its per-row tensors placed on the
logits' rows (``SamplingParams.on_rows``), to the backend (``espo.ops.torch_backend``, ``espo.ops.reference``,
``espo.kernels.sample``, ``espo.ops.cuda``), which trusts it. The helpers below also check ``espo.sample``'s
other per-row argument, ``offset``, so that every per-row argument follows one rule.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Union

import torch

from espo.checks import is_integer, is_real

RowArg = Union[int, float, torch.Tensor]
MIN_TEMPERATURE = 2.0**-126  # the smallest normal float32: below it 1 / T overflows
_INT64_MIN, _INT64_END, _UINT64_END = -(2**63), 2**63, 2**64
_FLOAT_MAX = sys.float_info.max
_FIELDS = ("temperature", "top_k", "top_p", "seed")


def can_check_values(t: torch.Tensor, validate: bool) -> bool:
    """Value checks read the tensor on the host (a device sync): skipped when asked, and during graph capture."""
    return validate and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def number_or_rows(name: str, value: RowArg, *, integer: bool, validate: bool = True, unsigned: bool = False) -> RowArg:
    """``value`` as a Python int or float (NumPy numbers accepted), or a tensor as int64 or float32 on its own device
    (a float64 value that float32 would round to 0 refused, when ``validate``). An int must fit in a signed 64-bit
    int, or, with ``unsigned``, in 64 bits either way. A tensor's shape and layout are ``rows_of``'s."""
    kind = type(value)  # the common case first: a plain Python number (a fixed cost on every call)
    if kind is float and not integer:
        return value
    if kind is int and (not integer or _INT64_MIN <= value < (_UINT64_END if unsigned else _INT64_END)):
        return value if integer else float(value)
    if isinstance(value, torch.Tensor):
        if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise TypeError(f"{name} must hold integers (e.g. torch.int64), got a {value.dtype} tensor")
        if not integer and not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold floats, got a {value.dtype} tensor")
        dtype = torch.int64 if integer else torch.float32
        converted = value if value.dtype == dtype else value.to(dtype=dtype)
        if value.dtype == torch.float64 and can_check_values(value, validate):
            flushed = (value != 0) & (converted == 0)  # e.g. 1e-50: non-zero in float64, 0 (greedy) in float32
            if bool(flushed.any()):
                raise ValueError(f"{name} holds {value[flushed][:4].tolist()}, which float32 rounds to 0: pass 0 or a "
                                 f"value float32 holds as a normal number (>= {MIN_TEMPERATURE:.4g})")
        return converted
    if integer:
        if not is_integer(value):
            raise TypeError(f"{name} must be an int or an integer tensor of shape (B,), got {type(value).__name__}")
        value = int(value)
        if unsigned and not _INT64_MIN <= value < _UINT64_END:
            raise ValueError(f"{name} must fit in 64 bits (signed or unsigned), got {value}")
        if not unsigned and not _INT64_MIN <= value < _INT64_END:
            raise ValueError(f"{name} must fit in a signed 64-bit int, got {value}")
        return value
    if not is_real(value):
        raise TypeError(f"{name} must be a float or a float tensor of shape (B,), got {type(value).__name__}")
    return float(value)


def check_values(name: str, value: RowArg, ok: Callable, expected: str, validate: bool) -> None:
    """ValueError unless ``ok(value)`` holds (in every row of a tensor, read when ``can_check_values``)."""
    if isinstance(value, torch.Tensor):
        if can_check_values(value, validate) and not bool(ok(value).all()):
            raise ValueError(f"{name} must be {expected}; got {value[~ok(value)][:4].tolist()} in some rows")
    elif not ok(value):  # a Python number: checked without making a tensor (a fixed cost on every call)
        raise ValueError(f"{name} must be {expected}, got {value}")


def rows_of(name: str, value: RowArg, B: int, device: torch.device) -> RowArg:
    """A checked per-row argument for B rows on ``device``: a number as it is, a tensor as a contiguous [B] tensor
    there (a 0-d tensor broadcast to every row)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 0:
        value = value.expand(B)
    if value.shape != (B,):
        raise ValueError(f"{name} must be a scalar or have one entry per row, shape ({B},); got {tuple(value.shape)}")
    if value.device != device:
        value = value.to(device=device)
    return value.contiguous()


def _finite(t: RowArg):
    return torch.isfinite(t) if isinstance(t, torch.Tensor) else math.isfinite(t)


def _temperature_ok(t: RowArg):
    return ((t == 0) | (t >= MIN_TEMPERATURE)) & _finite(t)


_TEMPERATURE_RULE = f"finite and 0 (greedy) or >= {MIN_TEMPERATURE:.4g} (so that 1 / T is a finite float32)"


def _temperature(value: RowArg, validate: bool) -> RowArg:
    value = number_or_rows("temperature", value, integer=False, validate=validate)
    check_values("temperature", value, _temperature_ok, _TEMPERATURE_RULE, validate)
    return value


def _top_k(value: RowArg, validate: bool) -> RowArg:
    value = number_or_rows("top_k", value, integer=True)
    check_values("top_k", value, lambda k: k >= 0, ">= 0 (0 disables top-k)", validate)
    return value


def _top_p(value: RowArg, validate: bool) -> RowArg:
    value = number_or_rows("top_p", value, integer=False, validate=validate)
    check_values("top_p", value, lambda p: (p > 0) & (p <= 1), "in (0, 1] (1 disables top-p)", validate)
    return value


def _seed(value: RowArg) -> RowArg:
    return number_or_rows("seed", value, integer=True, unsigned=True)


def _checked(temperature: RowArg, top_k: RowArg, top_p: RowArg, seed: RowArg, validate: bool) -> dict:
    """The four settings checked (ValueError or TypeError naming a wrong one), as ``SamplingParams`` holds them."""
    return dict(temperature=_temperature(temperature, validate), top_k=_top_k(top_k, validate),
                top_p=_top_p(top_p, validate), seed=_seed(seed))


@dataclass(frozen=True, init=False, eq=False)
class SamplingParams:
    """How ``espo.sample`` draws each row, checked when built (ValueError or TypeError naming the setting).

    Each setting is a Python number (NumPy numbers accepted), the same for every row, or a tensor with one entry
    per row ([B], or 0-d for all rows; moved to the logits' device at the draw):

    temperature: 0 is greedy (the first maximal logit); otherwise finite and >= 2**-126 (the smallest normal
        float32, so that 1 / T is finite). Float tensors are held as float32, which they must not round to 0.
    top_k: >= 0; keep the k largest logits (ties kept); 0 keeps all. Applied first. Held as int64.
    top_p: in (0, 1]; keep the smallest most-likely set whose mass reaches top_p; 1 keeps all. Held as float32.
    seed: a 64-bit int, signed or unsigned (2**64 - 1 draws as -1); with the token's offset it keys the row's
        Philox draw (``espo.ops.philox``). Held as int64.
    validate: check the values of tensors (temperature >= 0, ...). Each check reads the tensor on the host, a
        device sync: code that builds its tensors itself passes False. Types, dtypes and numbers are always
        checked. An argument, not a field: it only says how much is checked here.

    Tensors are kept, not copied (when they already have the held dtype): changing one in place afterwards
    skips its check. ``params == other`` compares values (tensors with ``torch.equal``).
    """

    temperature: RowArg = 1.0
    top_k: RowArg = 0
    top_p: RowArg = 1.0
    seed: RowArg = 0

    def __init__(self, temperature: RowArg = 1.0, top_k: RowArg = 0, top_p: RowArg = 1.0, seed: RowArg = 0,
                 validate: bool = True) -> None:
        # espo.sample builds one per call from its keywords, so this runs on every draw: written out, without the
        # generated __init__'s frozen setattr per field and a __post_init__ that would set each one again. Plain
        # Python numbers that every check passes unchanged are told apart first, in one test; anything else (a
        # tensor, an int temperature, a value to refuse) goes through the checks, which say what is wrong.
        if (type(temperature) is float and type(top_k) is int and type(top_p) is float and type(seed) is int
                and (temperature == 0.0 or MIN_TEMPERATURE <= temperature <= _FLOAT_MAX) and 0 <= top_k < _INT64_END
                and 0.0 < top_p <= 1.0 and _INT64_MIN <= seed < _UINT64_END):
            self.__dict__.update(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        else:
            self.__dict__.update(_checked(temperature, top_k, top_p, seed, validate))

    @classmethod
    def shared(cls, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> "SamplingParams":
        """Settings shared by every row, numbers only (TypeError naming a tensor), checked as ``SamplingParams``
        checks them: how ``espo.Decoder.generate`` and the transformers integration take theirs."""
        for name, value in zip(_FIELDS, (temperature, top_k, top_p, seed)):
            if isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be one number for every rollout here, got a tensor")
        return cls(temperature, top_k, top_p, seed)

    @property
    def per_row(self) -> bool:
        """Whether any setting is a tensor (one value per row) rather than one number for every row."""
        tensor = torch.Tensor
        return (isinstance(self.temperature, tensor) or isinstance(self.top_k, tensor)
                or isinstance(self.top_p, tensor) or isinstance(self.seed, tensor))

    def with_seed(self, seed: RowArg) -> "SamplingParams":
        """These settings with another seed, e.g. each row's own ([B] int64); only the new seed is checked."""
        return self._trusted(self.temperature, self.top_k, self.top_p, _seed(seed))

    def on_rows(self, B: int, device: torch.device) -> "SamplingParams":
        """These settings for B rows of logits on ``device``, as the backends take them: each tensor a contiguous
        [B] tensor there (ValueError naming it when its shape is not (B,) or ()), the seed a signed int64."""
        seed = self.seed
        if type(seed) is int and seed >= _INT64_END:
            seed -= _UINT64_END  # the same 64 bits, read as the signed int64 the kernels take
        elif not self.per_row:
            return self
        temperature = rows_of("temperature", self.temperature, B, device)
        top_k, top_p = rows_of("top_k", self.top_k, B, device), rows_of("top_p", self.top_p, B, device)
        seed = rows_of("seed", seed, B, device)
        if temperature is self.temperature and top_k is self.top_k and top_p is self.top_p and seed is self.seed:
            return self  # already in place (a hot loop's own [B] tensors): no new object per draw
        return self._trusted(temperature, top_k, top_p, seed)

    @classmethod
    def _trusted(cls, temperature: RowArg, top_k: RowArg, top_p: RowArg, seed: RowArg) -> "SamplingParams":
        """Settings already checked (by this class), bound without checking them again."""
        params = object.__new__(cls)
        params.__dict__.update(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return params

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SamplingParams):
            return NotImplemented
        return all(_same(getattr(self, name), getattr(other, name)) for name in _FIELDS)

    def __hash__(self) -> int:
        return hash(tuple(_hash_key(getattr(self, name)) for name in _FIELDS))


def _same(a: RowArg, b: RowArg) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.device == b.device and torch.equal(a, b))
    return a == b


def _hash_key(value: RowArg):
    """Equal settings hash alike: a tensor by what ``_same`` compares before its values."""
    return ("tensor", value.dtype, str(value.device), tuple(value.shape)) if isinstance(value, torch.Tensor) else value
