"""What every benchmark and study (studies/common.py) records beside its numbers: the machine, the versions, the
date and the command."""
from __future__ import annotations

import datetime
import importlib
import platform
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

# A benchmark run from a checkout measures that checkout's code, not an older espo installed in site-packages
# (python puts bench/, not the repository root, on sys.path). Every bench script imports this module first.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def environment(device: str, bandwidth: float | None = None, **extra) -> dict:
    """The run's environment: device name, torch/triton/transformers/flash-attn versions, espo's backends."""
    env = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    for name in ("triton", "transformers", "flash_attn"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception:  # an optional peer that is missing or broken is recorded as absent
            env[name] = None
    try:
        import espo

        env["backends"] = {k: v.available for k, v in espo.backends().items()}
    except ImportError:
        pass
    if bandwidth:
        env["copy_bandwidth_TBps"] = bandwidth / 1e12
    return env | extra


NOTES = "## About these numbers"


def write_report(path: Path, text: str) -> None:
    """Write a results .md, carrying over the hand-written "About these numbers" section of the report it replaces
    (dates, loads and caveats that README links to), marked for a second look; the rest is the script's."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if NOTES in old and NOTES not in text:
        start = old.index(NOTES)
        end = old.find("\n## ", start + len(NOTES))
        notes = old[start:] if end < 0 else old[start:end + 1]
        carried = "(Carried over from the report this run replaced: check that it still holds for these numbers.)"
        notes = notes.rstrip("\n").removesuffix(carried).rstrip("\n")  # carried once, however many reruns
        text = text.rstrip("\n") + "\n\n" + notes + "\n\n" + carried + "\n"
    path.write_text(text)


# What a kernel (or, on the CPU, an aten op) is, by its name: the first pattern that matches. GEMMs are cuBLAS's and
# CUTLASS's names (and aten's on the CPU); espo's own are its Triton kernels and csrc/'s.
KERNEL_KINDS = (
    ("attention", r"attention|fmha|flash|attn"),  # first: SDPA's kernels are CUTLASS's too
    ("gemm", r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitk|aten::(mm|addmm|bmm|linear|matmul)$"),
    ("espo sample", r"chunk_stats|finish_kernel|pivot_stats|pivot_round|sample_kernel|espo::sample"),
    ("espo fused", r"rms_norm|rope|silu_mul|gate_up_silu"),
    ("copy", r"memcpy|memset|copy|index|gather|scatter"),
)


def kernel_kind(name: str) -> str:
    """The kind of a kernel by its name (``KERNEL_KINDS``), "other" (torch's elementwise and reductions) if none."""
    low = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, low)), "other")


def device_times(fn: Callable[[], object], device: str, calls: int = 10) -> dict[str, dict[str, float]]:
    """Per call of ``fn()``: each kernel's launches and device microseconds, by kernel name, from torch.profiler over
    ``calls`` calls after one warm-up (on the CPU: each aten op's calls and its own CPU time). Kernels inside a CUDA
    graph's replay count too (CUPTI traces them), so a graphed step's device time is told apart from its gaps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    out: dict[str, dict[str, float]] = {}
    for evt in prof.key_averages():
        on_device = evt.device_type == torch.autograd.DeviceType.CUDA
        if cuda != on_device:
            continue
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if us > 0 or not cuda:
            out[evt.key] = {"launches": evt.count / calls, "us": us / calls}
    return out


def by_kind(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``device_times``' kernels summed by ``kernel_kind``, and "all"."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"launches": 0.0, "us": 0.0})
    for name, t in times.items():
        for kind in (kernel_kind(name), "all"):
            out[kind]["launches"] += t["launches"]
            out[kind]["us"] += t["us"]
    return dict(out)
