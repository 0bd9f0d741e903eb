"""espo.stats: held to published values, at its edges, and by simulation (coverage of its intervals)."""
import numpy as np
import pytest

from espo.stats import (
    MIN_PAIRS,
    beyond_noise,
    bootstrap_indices,
    newcombe_interval,
    paired_saving,
    quantile_interval,
    wilson_interval,
)


def _rounded(interval: tuple[float, float]) -> tuple[float, float]:
    return round(interval[0], 4), round(interval[1], 4)


@pytest.mark.parametrize("hits, n, expected", [
    (0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)), (10, 10, (0.7225, 1.0)),  # z^2 / (n + z^2) = 0.2775
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson)
    (81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)), (0, 20, (0.0, 0.1611)), (1, 29, (0.0061, 0.1718)),
])
def test_wilson_interval_matches_the_published_values(hits, n, expected):
    assert _rounded(wilson_interval(hits, n)) == expected


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) is None  # no trials: no rate
    lo, hi = wilson_interval(7, 7)
    assert hi == 1.0 and 0 < lo < 1  # all hits: the interval ends at 1, its lower end is still below 1
    lo, hi = wilson_interval(0, 7)
    assert lo == 0.0 and 0 < hi < 1
    narrow, wide = wilson_interval(500, 1000), wilson_interval(5, 10)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    for hits, n in ((-1, 10), (11, 10), (0, -1)):
        with pytest.raises(ValueError, match="0 <= hits <= n"):
            wilson_interval(hits, n)


def test_newcombe_interval_matches_the_published_example():
    """Newcombe (1998), method 10: 56/70 - 48/80 = 0.200, 95% interval 0.0524 to 0.3339."""
    lo, hi = newcombe_interval(48, 80, 56, 70)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)


@pytest.mark.parametrize("a, b, expected", [
    # Newcombe (1998), "Interval estimation for the difference between independent proportions", Table II,
    # method 10: rate b - rate a
    ((3, 10), (9, 10), (0.1705, 0.8090)), ((0, 29), (5, 56), (-0.0381, 0.1926)),
    ((0, 20), (0, 10), (-0.1611, 0.2775)), ((0, 10), (0, 10), (-0.2775, 0.2775)),
])
def test_newcombe_interval_matches_the_papers_other_examples(a, b, expected):
    assert _rounded(newcombe_interval(*a, *b)) == expected


def test_newcombe_interval_is_antisymmetric_and_rejects_an_empty_sample():
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert (round(lo, 4), round(hi, 4)) == (-0.3339, -0.0524)
    with pytest.raises(ValueError, match="n_a=0"):
        newcombe_interval(0, 0, 3, 10)


def test_wilson_interval_covers_the_true_rate_about_95_percent_of_the_time():
    """Simulated binomials over a grid of rates and sizes (fixed seed): the share of intervals that hold the true
    rate is near the nominal 95% overall, and never far below it for any one rate."""
    rng = np.random.default_rng(2026)
    covered = []
    for n in (20, 50, 200):
        for p in (0.1, 0.3, 0.5, 0.7, 0.9):
            hits = rng.binomial(n, p, size=2000)
            inside = [lo <= p <= hi for lo, hi in (wilson_interval(int(h), n) for h in hits)]
            assert np.mean(inside) > 0.90, (n, p, np.mean(inside))
            covered += inside
    assert 0.935 < np.mean(covered) < 0.97  # 0.957 here; z = 1.645 (a 90% interval) or 2.576 (99%) fall outside


def test_bootstrap_indices_and_quantile_interval():
    idx = bootstrap_indices(5, 300, np.random.default_rng(0))
    assert idx.shape == (300, 5) and idx.min() >= 0 and idx.max() <= 4 and len(np.unique(idx)) == 5
    assert np.array_equal(idx, bootstrap_indices(5, 300, np.random.default_rng(0)))  # a seed gives the same draws
    assert quantile_interval(np.arange(1001)) == pytest.approx((25.0, 975.0))
    assert quantile_interval(np.arange(101), level=0.5) == pytest.approx((25.0, 75.0))
    draws = np.random.default_rng(3).normal(size=999)
    assert quantile_interval(draws) == (np.quantile(draws, 0.025), np.quantile(draws, 0.975))  # to the last bit
    for level in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match="level"):
            quantile_interval(draws, level=level)


def test_paired_saving_is_the_ratio_of_sums_with_a_percentile_bootstrap_over_the_pairs():
    """Held to the plain computation (the demo's numbers before the move to espo.stats), on random step times."""
    rng = np.random.default_rng(11)
    for n in (MIN_PAIRS, 9, 30):
        base, other = rng.uniform(5, 15, n), rng.uniform(3, 15, n)
        idx = np.random.default_rng(4).integers(0, n, size=(500, n))
        draws = 1 - other[idx].sum(axis=1) / base[idx].sum(axis=1)
        saving, interval = paired_saving(base.tolist(), other.tolist(), resamples=500, seed=4)
        assert saving == pytest.approx(1 - other.sum() / base.sum(), rel=1e-12)
        assert interval == pytest.approx((np.quantile(draws, 0.025), np.quantile(draws, 0.975)), rel=1e-12)


def test_paired_saving_edges():
    assert paired_saving([], []) == (0.0, None)  # no pairs
    assert paired_saving([0.0] * 8, [1.0] * 8) == (0.0, None)  # nothing to save from
    few = [10.0] * (MIN_PAIRS - 1)
    assert paired_saving(few, [8.0] * (MIN_PAIRS - 1)) == (pytest.approx(0.2), None)  # too few pairs: no interval
    saving, interval = paired_saving([10.0] * MIN_PAIRS + [99.0], [8.0] * MIN_PAIRS)  # the extra step is unpaired
    assert saving == pytest.approx(0.2) and interval == (pytest.approx(0.2), pytest.approx(0.2))
    assert paired_saving([10.0] * 8, [10.0] * 8) == (0.0, (0.0, 0.0))
    assert not beyond_noise(None) and not beyond_noise((-0.1, 0.2)) and not beyond_noise((0.0, 0.2))
    assert beyond_noise((0.05, 0.2)) and beyond_noise((-0.3, -0.01))


def test_paired_saving_interval_holds_the_true_saving_in_most_simulated_runs():
    """Runs whose steps share a load that varies from step to step (so both runs of a pair see it), each 30% faster
    than its partner in expectation, with its own noise: the interval over 12 pairs holds 30% in most runs, and one
    run against a copy of itself under independent noise is called beyond noise in few."""
    rng = np.random.default_rng(7)
    held, false_alarms, runs = 0, 0, 200
    for seed in range(runs):
        load = rng.lognormal(0.0, 0.5, size=12)
        base = 10.0 * load * rng.normal(1.0, 0.05, size=12)
        other = 7.0 * load * rng.normal(1.0, 0.05, size=12)
        saving, (lo, hi) = paired_saving(base.tolist(), other.tolist(), seed=seed)
        held += lo <= 0.3 <= hi
        assert lo <= saving <= hi
        same = 10.0 * load * rng.normal(1.0, 0.05, size=12)
        false_alarms += beyond_noise(paired_saving(base.tolist(), same.tolist(), seed=seed)[1])
    # 86.5% and 11% here: a percentile bootstrap over 12 pairs is a little narrow (nominally 95% and 5%)
    assert held / runs > 0.8
    assert false_alarms / runs < 0.2
