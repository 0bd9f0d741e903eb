"""Which implementations of the ops can run here, and which one ``backend="auto"`` picks."""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

BACKENDS = ("torch", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run on this machine (the message says why and what to do)."""


@dataclass(frozen=True)
class BackendInfo:
    """``available`` says whether the backend runs on this machine; ``reason`` says why not."""

    name: str
    available: bool
    reason: str = ""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def register_checkout_kernels() -> None:
    """Make ``import espo.kernels`` work in a source checkout as it does in an installed package.

    The Triton kernels live in the top-level ``kernels/`` folder, which the wheel installs as ``espo.kernels``
    (pyproject's package-dir). Run from a checkout (``python -m pytest``, scripts), ``espo/kernels`` does not
    exist, so the folder is registered under that name once, when espo is imported; nothing else loads it.
    The folder has no ``__init__.py`` on purpose: as a bare folder it is at most a namespace portion named
    ``kernels``, which never shadows the ``kernels`` distribution that transformers imports, even from a
    checkout's root (tests/test_package.py checks this).
    """
    package = sys.modules["espo"]
    if "espo.kernels" in sys.modules or importlib.util.find_spec("espo.kernels") is not None:
        return
    src = Path(__file__).resolve().parents[2] / "kernels"
    if not (src / "sample.py").is_file():
        return  # an installed package without its kernels: backends() reports triton unavailable
    spec = importlib.machinery.ModuleSpec("espo.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(src)]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "Triton kernels of espo (the checkout's kernels/ folder); espo.sample dispatches to them."
    sys.modules["espo.kernels"] = module
    package.kernels = module


@lru_cache(maxsize=None)
def _triton_reason() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    if importlib.util.find_spec("espo.kernels") is None:
        return "espo.kernels is missing from this install: reinstall espo-rl"
    if not torch.cuda.is_available() and not _interpreting():
        return "no CUDA GPU; set TRITON_INTERPRET=1 before importing espo to run the Triton kernels on the CPU (slow)"
    return ""


@lru_cache(maxsize=None)
def _cuda_reason() -> str:
    if importlib.util.find_spec("espo._C") is None:
        return "espo._C is not built: run `pip install --no-build-isolation .` with nvcc and a CUDA build of torch"
    try:
        importlib.import_module("espo._C")
    except (ImportError, OSError) as err:
        return f"espo._C does not load ({err}); rebuild it against this torch"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return ""


def backends() -> dict[str, BackendInfo]:
    """Every backend, whether it is usable on this machine, and if not, why."""
    reasons = {"torch": "", "triton": _triton_reason(), "cuda": _cuda_reason()}
    return {name: BackendInfo(name, not reason, reason) for name, reason in reasons.items()}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run for tensors on ``device``: ``backend`` itself, checked, or the fastest for "auto"."""
    device_type = device.type  # TRITON_INTERPRET matters only to the triton backend off a GPU: read only then
    return _resolve(backend, device_type, backend == "triton" and device_type != "cuda" and _interpreting())


@lru_cache(maxsize=64)  # on every call of espo.sample: what runs where does not change within a process
def _resolve(backend: str, device_type: str, interpreting: bool) -> str:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    info = backends()
    if backend == "auto":
        if device_type != "cuda":
            return "torch"
        return next((b for b in ("cuda", "triton") if info[b].available), "torch")
    if not info[backend].available:
        raise BackendUnavailable(f"backend {backend!r} is not available: {info[backend].reason}")
    if backend != "torch" and device_type != "cuda" and not (backend == "triton" and interpreting):
        raise ValueError(f"backend {backend!r} needs CUDA tensors, got tensors on {device_type}; use backend='torch'")
    return backend


register_checkout_kernels()
