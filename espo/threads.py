"""How many CPU threads torch should use for a run on the CPU, given what else the machine is running.

torch starts one intra-op thread per core. On a machine whose cores other processes already keep busy, those
threads wait on each other at every op and a run slows several-fold (issue 26 measured 4 runs sharing 2 cores:
12.7 s with 2 threads each, 1.4 s with 1; not a committed results file). So a run takes the cores that the recent
load leaves free, at least one, unless the user chose: ``--threads N`` on the command line, or OMP_NUM_THREADS /
MKL_NUM_THREADS in the environment, always win, up to :data:`THREADS_PER_CORE` threads per core (more only waste
memory and switches; a count in the thousands crashes the process).
"""
from __future__ import annotations

import os

import torch

#: the most threads a run may ask for, per core this process may use
THREADS_PER_CORE = 4


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_cores() -> int:
    """Usable cores minus the 1-minute load average (the runnable processes elsewhere), at least 1."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this OS: assume the machine is ours
        return cores
    return max(1, min(cores, cores - round(load)))


def max_threads() -> int:
    """The most CPU threads a run may use: THREADS_PER_CORE per usable core."""
    return THREADS_PER_CORE * usable_cores()


def _too_many(count: int, what: str) -> ValueError:
    return ValueError(f"{what} {count} is more than {max_threads()} ({THREADS_PER_CORE} per core of the "
                      f"{usable_cores()} this process may use); choose at most {max_threads()}")


def choose_cpu_threads(requested: int | None = None) -> tuple[int, str]:
    """The thread count for a CPU run and why: ``requested``, the environment's, or the free cores. A count over
    :func:`max_threads` is refused (ValueError naming where it came from)."""
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise ValueError(f"threads must be a positive int, got {requested!r}")
        if requested > max_threads():
            raise _too_many(requested, "threads")
        return requested, "--threads"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            if value.isdigit() and int(value) > max_threads():
                raise _too_many(int(value), name)
            return torch.get_num_threads(), name
    free = free_cores()
    if free < usable_cores():
        return free, f"{usable_cores()} cores, {usable_cores() - free} kept busy by other processes (load average)"
    return free, f"{free} idle cores"


def use_cpu_threads(requested: int | None = None) -> str:
    """Set torch's intra-op threads by ``choose_cpu_threads``; returns a one-line account for the log."""
    threads, why = choose_cpu_threads(requested)
    torch.set_num_threads(threads)
    return f"{threads} CPU thread{'s' if threads != 1 else ''} ({why})"
