"""The statistics that ``espo demo`` and the studies (studies/) report their numbers with.

- ``wilson_interval``: a rate's 95% Wilson score interval (accuracy, false-stop share).
- ``newcombe_interval``: the 95% interval of a difference of two rates, from their Wilson intervals.
- ``bootstrap_indices`` and ``quantile_interval``: a bootstrap's resamples and the central interval of its draws.
- ``paired_saving`` and ``beyond_noise``: a time saving over paired repeats, its bootstrap interval over the pairs,
  and whether that interval excludes 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "MIN_PAIRS",
    "beyond_noise",
    "bootstrap_indices",
    "newcombe_interval",
    "paired_saving",
    "quantile_interval",
    "wilson_interval",
]

MIN_PAIRS = 6  # fewer paired steps give too few distinct bootstrap resamples (4 pairs: 35) for an interval


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a rate of ``hits`` in ``n`` (None when n == 0); ``z`` sets the level."""
    if n < 0 or not 0 <= hits <= max(n, 0):
        raise ValueError(f"wilson_interval: hits={hits} and n={n} need 0 <= hits <= n")
    if n == 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(hits_a: int, n_a: int, hits_b: int, n_b: int) -> tuple[float, float]:
    """Newcombe's 95% interval (his method 10, from the two Wilson intervals) for rate b - rate a. It treats the two
    samples as independent, which is conservative where both rates come from the same problems."""
    if n_a <= 0 or n_b <= 0:
        raise ValueError(f"newcombe_interval: n_a={n_a} and n_b={n_b} must both be positive (a rate needs a trial)")
    pa, pb = hits_a / n_a, hits_b / n_b
    (la, ua), (lb, ub) = wilson_interval(hits_a, n_a), wilson_interval(hits_b, n_b)
    d = pb - pa
    return d - ((pb - lb) ** 2 + (ua - pa) ** 2) ** 0.5, d + ((ub - pb) ** 2 + (pa - la) ** 2) ** 0.5


def bootstrap_indices(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] indices drawn with replacement from range(n): one bootstrap resample a row."""
    return rng.integers(0, n, size=(resamples, n))


def quantile_interval(draws: np.ndarray | Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of ``draws`` (a bootstrap's or a simulation's), by their quantiles."""
    if not 0 < level < 1:
        raise ValueError(f"quantile_interval: level={level} must lie strictly between 0 and 1 (0.95 for 95%)")
    tail = round((1 - level) / 2, 12)  # 0.025 exactly for 0.95, not 1 - 0.95's 0.0250000000000000222
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))


def paired_saving(base: Sequence[float], other: Sequence[float], resamples: int = 2000,
                  seed: int = 0) -> tuple[float, tuple[float, float] | None]:
    """``1 - sum(other) / sum(base)`` over paired repeats (step k of one run against step k of the other, run one
    after the other, so a change of load falls on both), with its 95% bootstrap interval over the pairs (None with
    fewer than ``MIN_PAIRS`` pairs: too few distinct resamples). A saving whose interval holds 0 is inside its
    noise."""
    n = min(len(base), len(other))
    if n == 0 or sum(base[:n]) <= 0:
        return 0.0, None
    b, o = np.asarray(base[:n], dtype=float), np.asarray(other[:n], dtype=float)
    saving = float(1 - o.sum() / b.sum())
    if n < MIN_PAIRS:
        return saving, None
    idx = bootstrap_indices(n, resamples, np.random.default_rng(seed))
    return saving, quantile_interval(1 - o[idx].sum(axis=1) / b[idx].sum(axis=1))


def beyond_noise(interval: tuple[float, float] | None) -> bool:
    """Whether a saving's interval (``paired_saving``'s) lies wholly on one side of 0."""
    return interval is not None and (interval[0] > 0 or interval[1] < 0)
