"""Argument checks for the public API: each names the argument, what it must be, and what it got.

Python and NumPy numbers are accepted alike (``np.int64(3)`` is an int, ``np.float32(0.5)`` a float); a
bool is never a number here, because ``True`` passed for a count is always a mistake.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any


def is_integer(value: Any) -> bool:
    """An int or a NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_real(value: Any) -> bool:
    """An int, a float or a NumPy number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int within [minimum, maximum]; ValueError/TypeError naming ``name`` otherwise."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a finite Python float with ``minimum <= value <= maximum`` and ``above < value < below``."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be > {above}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` when it is a bool (or a NumPy bool); TypeError otherwise (1 and "yes" are not bools)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_device(name: str, value: Any) -> str:
    """A device string torch understands and this machine has ("cpu", "cuda", "cuda:1", ...)."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {value!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {value!r} but this machine has no usable CUDA GPU "
                             f"(torch {torch.__version__}); use device 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name} is {value!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"{name} must be 'cpu' or a CUDA device, got {value!r}")
    return str(value)


def setting(default: Any, help: str, **bounds: Any) -> Any:
    """A config dataclass field with its help line (shown by ``espo train --help``) and the bounds that
    :func:`check_fields` applies to it (``minimum``, ``maximum``, ``above``, ``below``)."""
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds})


def check_fields(config: Any) -> None:
    """Check every int, float and bool field of the dataclass ``config`` against its type and its bounds, and
    store the checked Python value (frozen dataclasses included)."""
    checkers = {"int": check_int, "float": check_float, "bool": check_bool}
    for f in dataclasses.fields(config):
        check = checkers.get(str(f.type))
        if check is not None:
            value = check(f"{type(config).__name__}.{f.name}", getattr(config, f.name), **f.metadata.get("bounds", {}))
            object.__setattr__(config, f.name, value)


def short_repr(obj: Any, limit: int = 200) -> str:
    """``repr(obj)`` cut to ``limit`` characters, for error messages that quote a user's value."""
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."
