"""The CUDA sample op (csrc/sample.cu and its kernels) run on the CPU by the emulator, under the backends' contract.

``sample_emulated(logits, params, offset, stop)`` takes what ``espo.ops.cuda.sample_cuda`` takes (CPU tensors) and
returns the same dict of ``SampleOutput`` fields, so it can stand in for the "cuda" backend in ``espo.sample``
(``sample_on_cpu_emulation``). The argument conversion is csrc/bindings.cpp's: the row stride (V for one row), per-row
tensors or scalars, the stop state's constants.
"""
from __future__ import annotations

import ctypes
from functools import partial
from unittest import mock

import torch

import espo
from espo.ops import sample as sample_module
from espo.ops.sampling_params import SamplingParams
from espo.ops.stopper import StopState

from .build import load_sample_library

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_P, _F, _D, _I64 = ctypes.c_void_p, ctypes.c_float, ctypes.c_double, ctypes.c_int64


class EmulatedLaunchError(RuntimeError):
    """The emulated launch failed (deadlock, misaligned or out-of-bounds read, bad argument): the emulator's text."""


def _library() -> ctypes.CDLL:
    lib = load_sample_library()
    if not getattr(lib, "_espo_typed", False):
        lib.espo_emu_sample.restype = ctypes.c_int
        lib.espo_emu_sample.argtypes = [
            _P, ctypes.c_int, _I64, _I64, _I64,
            _P, _D, _P, _I64, _P, _D, _P, _I64, _P, _I64,
            _P, _P, _P, _P, _P, _P, _P,
            _P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _D, _D, _D, _D, _I64,
        ]
        lib.espo_emu_last_error.restype = ctypes.c_char_p
        lib.espo_emu_set_schedule.argtypes = [ctypes.c_ulonglong]
        lib.espo_emu_vector_loads.restype = ctypes.c_ulonglong
        lib._espo_typed = True
    return lib


def vector_loads() -> int:
    """8- and 16-byte vector loads the emulated kernels have issued since the library was loaded."""
    return int(_library().espo_emu_vector_loads())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _split(value, dtype):
    """(pointer or None, scalar): a per-row tensor (kept alive by the caller's `keep`) or a number."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype).contiguous(), 0
    return None, value


def sample_emulated(logits: torch.Tensor, params: SamplingParams, offset, stop: StopState | None = None,
                    schedule: int = 0) -> dict:
    """One call of the CUDA op on CPU tensors; ``schedule`` (not 0) permutes the order of blocks and threads."""
    lib = _library()
    if logits.device.type != "cpu":
        raise ValueError(f"the emulated op takes CPU tensors, got logits on {logits.device}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    keep = []
    row_args = []
    for value, dtype in ((params.temperature, torch.float32), (params.top_k, torch.int64),
                         (params.top_p, torch.float32), (params.seed, torch.int64), (offset, torch.int64)):
        t, scalar = _split(value, dtype)
        keep.append(t)
        row_args += [_ptr(t), scalar]
    out = {
        "tokens": torch.empty(B, dtype=torch.int64),
        **{k: torch.empty(B) for k in ("logprobs", "raw_logprobs", "entropy", "max_logprob", "regret")},
        "valid": torch.empty(B, dtype=torch.bool),
    }
    if stop is None:
        stop_args = [None] * 7 + [0, None, None, None, 0.0, 0.0, 0.0, 0.0, 0]
        out["stop"] = None
    else:
        out["stop"] = torch.empty(B, dtype=torch.bool)
        rows = None if stop.rows is None else stop.rows.to(torch.int64).contiguous()
        values = None if stop.values is None else stop.values.to(torch.float32).contiguous()
        keep += [rows, values]
        stop_args = [_ptr(stop.z), _ptr(stop.sum_g), _ptr(stop.sum_g2), _ptr(stop.count), _ptr(stop.position),
                     _ptr(stop.stopped), _ptr(stop.scalars), stop.z.numel(), _ptr(rows), _ptr(values),
                     _ptr(out["stop"]), stop.alpha_s, stop.clip, stop.delta, stop.value_floor, stop.min_tokens]
    lib.espo_emu_set_schedule(schedule)
    err = lib.espo_emu_sample(
        logits.data_ptr(), _DTYPES[logits.dtype], B, V, logits.stride(0) if B > 1 else V, *row_args,
        *(out[k].data_ptr() for k in ("tokens", "logprobs", "raw_logprobs", "entropy", "max_logprob", "regret",
                                       "valid")),
        *stop_args,
    )
    lib.espo_emu_set_schedule(0)
    if err != 0:
        raise EmulatedLaunchError(f"sample_launch returned {err}: {lib.espo_emu_last_error().decode()}")
    return out


def sample_with(implementation, logits: torch.Tensor, **kwargs):
    """``espo.sample(logits, **kwargs)`` on CPU tensors with ``implementation`` (what a backend's entry takes:
    ``sample_emulated``, ``espo.ops.reference.sample_reference``) in place of the torch backend: espo.sample's own
    argument handling and stopper plumbing, then that implementation."""
    with mock.patch.dict(sample_module._IMPLEMENTATIONS, {"torch": implementation}):
        return espo.sample(logits, backend="torch", **kwargs)


def sample_on_cpu_emulation(logits: torch.Tensor, schedule: int = 0, **kwargs):
    """``espo.sample(logits, **kwargs)`` by the CUDA kernels on the emulator (``schedule``: see ``sample_emulated``)."""
    return sample_with(partial(sample_emulated, schedule=schedule), logits, **kwargs)
