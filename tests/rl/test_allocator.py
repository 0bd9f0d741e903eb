"""Tests of espo.rl.allocator.CeroAllocator: budget invariants, posteriors, state, bad input, usefulness."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espo.rl.allocator import CeroAllocator


def _snapshot(alloc: CeroAllocator) -> dict:
    """A deep copy of the state, comparable with _same_state."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in alloc.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if not torch.equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


def _check_counts(counts: torch.Tensor, m: int, alloc: CeroAllocator) -> np.ndarray:
    assert isinstance(counts, torch.Tensor)
    assert counts.dtype == torch.int64 and counts.device.type == "cpu" and counts.shape == (m,)
    c = counts.numpy()
    assert np.all((c == 0) | ((c >= alloc.n_min) & (c <= alloc.n_max))), c
    return c


# --------------------------------------------------------------------------------------------------
# budget invariants under random use
# --------------------------------------------------------------------------------------------------
@st.composite
def runs(draw):
    n = draw(st.integers(1, 24))
    epochs = draw(st.sampled_from([0.5, 1, 1.5, 2, 3, 5, 8]))
    n_min = draw(st.integers(1, 4))
    n_max = draw(st.integers(n_min, 20))
    planned = int(round(epochs * n))
    if planned < 1:
        epochs, planned = 1, n
    budget = draw(st.integers(0, planned * n_max))
    opts = draw(st.fixed_dictionaries({
        "forgetting": st.sampled_from([1.0, 0.8, 0.3]),
        "utility": st.sampled_from(["variance", "mixed"]),
        "pace_slack": st.sampled_from([0.0, 0.25, 1.0, 3.0]),
    }))
    # a schedule of batches that covers the planned visits exactly, then some extra calls
    batches = []
    left = planned
    while left > 0:
        m = draw(st.integers(1, min(n, left)))
        batches.append(draw(st.permutations(range(n)))[:m])
        left -= m
    extra = draw(st.integers(0, 3))
    for _ in range(extra):
        batches.append(draw(st.permutations(range(n)))[: draw(st.integers(1, n))])
    seed = draw(st.integers(0, 2**31 - 1))
    return n, epochs, budget, n_min, n_max, opts, batches, len(batches) - extra, seed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_budget_never_exceeded_and_spent_at_the_end(run):
    n, epochs, budget, n_min, n_max, opts, batches, planned_calls, seed = run
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, n)
    alloc = CeroAllocator(n, budget, epochs, n_min=n_min, n_max=n_max, **opts)
    total = 0
    for call, ids in enumerate(batches):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counts = alloc.allocate(ids)
        c = _check_counts(counts, len(ids), alloc)
        total += int(c.sum())
        assert alloc.spent == total <= budget
        assert alloc.remaining == budget - total >= 0
        if call >= planned_calls:  # beyond the plan: only leftovers, zeros plus a warning
            if c.sum() == 0:
                assert any(issubclass(w.category, RuntimeWarning) for w in caught)
        else:
            assert not caught
        s = rng.binomial(c, p[ids])
        # report fewer trials than allocated sometimes: allowed, must not change the spend
        trials = np.where(rng.random(len(ids)) < 0.1, c // 2, c)
        alloc.update(ids, np.minimum(s, trials), trials)
        if call == planned_calls - 1:
            # the run has ended as planned: the budget is spent to within one group
            assert alloc.remaining < max(n_min, 1) <= n_max, (alloc.remaining, n_min)


def test_more_calls_than_planned_give_zeros_and_warn():
    alloc = CeroAllocator(4, 64, 2, n_min=2, n_max=16)
    for _ in range(2):
        alloc.allocate([0, 1, 2, 3])
    assert alloc.remaining < 2
    spent = alloc.spent
    with pytest.warns(RuntimeWarning, match="after the planned"):
        counts = alloc.allocate([0, 1, 2, 3])
    assert counts.tolist() == [0, 0, 0, 0] and alloc.spent == spent


def test_first_pass_is_uniform_and_budget_lands_exactly():
    n, k_epochs, n_ref = 16, 5, 8
    alloc = CeroAllocator(n, n * k_epochs * n_ref, k_epochs)
    first = alloc.allocate(range(n))
    assert first.tolist() == [n_ref] * n
    rng = np.random.default_rng(0)
    for _ in range(k_epochs - 1):
        c = alloc.allocate(range(n)).numpy()
        alloc.update(range(n), rng.binomial(c, 0.5), c)
    assert alloc.remaining < alloc.n_min


def test_budget_that_cannot_be_spent_is_rejected():
    with pytest.raises(ValueError, match="total_budget=.*cannot be spent"):
        CeroAllocator(10, 10 * 3 * 16 + 1, 3, n_max=16)
    with pytest.raises(ValueError, match="n_max must be >= n_min"):
        CeroAllocator(10, 100, 3, n_min=8, n_max=4)
    with pytest.raises(ValueError, match="utility"):
        CeroAllocator(10, 100, 3, utility="entropy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="forgetting"):
        CeroAllocator(10, 100, 3, forgetting=1.5)
    with pytest.raises(TypeError, match="num_prompts"):
        CeroAllocator(10.0, 100, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epochs"):
        CeroAllocator(10, 100, 0)


# --------------------------------------------------------------------------------------------------
# posteriors
# --------------------------------------------------------------------------------------------------
def test_posterior_updates_match_hand_computed_beta():
    alloc = CeroAllocator(3, 96, 4, prior=(2.0, 3.0), forgetting=1.0)
    alloc.update([0, 1], successes=[3, 0], trials=[4, 5])
    alloc.update(np.array([0, 0, 2]), successes=torch.tensor([1, 2, 6]), trials=[1, 2, 6])  # repeats add up
    a, b = alloc.posterior([0, 1, 2])
    assert a.tolist() == [2 + 3 + 1 + 2, 2 + 0, 2 + 6]
    assert b.tolist() == [3 + 1, 3 + 5, 3 + 0]
    mean = alloc.posterior_mean([0, 1, 2])
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, torch.tensor([8 / 12, 2 / 10, 8 / 11]))
    v = alloc.value([0, 1, 2]).numpy()
    aa, bb = a.numpy(), b.numpy()
    np.testing.assert_allclose(v, aa * bb / ((aa + bb) * (aa + bb + 1)))
    assert alloc.posterior_mean([1], device="cpu").device.type == "cpu"


def test_mixed_utility_value_under_uniform_prior():
    # under Beta(1, 1), E[p^g] = 1 / (g + 1), so P(mixed group of g) = 1 - 2 / (g + 1)
    alloc = CeroAllocator(2, 32, 2, utility="mixed", mixed_group_size=8)
    np.testing.assert_allclose(alloc.value([0, 1]).numpy(), [1 - 2 / 9] * 2)
    alloc.update([0], [2], [3])  # Beta(3, 2): E[p^2] = 3*4/(5*6), E[(1-p)^2] = 2*3/(5*6)
    alloc2 = CeroAllocator(2, 32, 2, utility="mixed", mixed_group_size=2)
    alloc2.update([0], [2], [3])
    np.testing.assert_allclose(alloc2.value([0]).numpy(), [1 - 12 / 30 - 6 / 30])


def test_forgetting_pulls_toward_the_prior_once_per_epoch():
    rho = 0.5
    alloc = CeroAllocator(4, 4 * 3 * 8, 3, forgetting=rho, prior=(1.0, 1.0))
    alloc.allocate([0, 1])  # epoch 0, first half
    alloc.update([0, 1], [4, 0], [4, 8])
    alloc.allocate([2, 3])  # still epoch 0: no forgetting yet
    a, b = alloc.posterior([0, 1])
    assert a.tolist() == [5.0, 1.0] and b.tolist() == [1.0, 9.0]
    alloc.allocate([0, 1])  # first call of epoch 1: forget once
    a, b = alloc.posterior([0, 1])
    assert a.tolist() == [1 + rho * 4, 1.0] and b.tolist() == [1.0, 1 + rho * 8]
    alloc.allocate([2, 3])  # same epoch: nothing more
    a, _ = alloc.posterior([0])
    assert a.tolist() == [1 + rho * 4]


def test_no_forgetting_keeps_all_evidence():
    alloc = CeroAllocator(2, 2 * 4 * 8, 4, forgetting=1.0)
    for _ in range(4):
        alloc.allocate([0, 1])
        alloc.update([0, 1], [1, 2], [2, 2])
    a, b = alloc.posterior([0, 1])
    assert a.tolist() == [5.0, 9.0] and b.tolist() == [5.0, 1.0]


# --------------------------------------------------------------------------------------------------
# state round trip and determinism
# --------------------------------------------------------------------------------------------------
def _drive(alloc: CeroAllocator, steps: list[np.ndarray], p: np.ndarray, rng: np.random.Generator) -> list:
    out = []
    for ids in steps:
        c = alloc.allocate(ids).numpy()
        s = rng.binomial(c, p[ids])
        alloc.update(ids, s, c)
        out.append(c.tolist())
    return out


@pytest.mark.parametrize("utility", ["variance", "mixed"])
def test_resumed_run_allocates_as_an_uninterrupted_one(utility):
    n, epochs, batch = 40, 6, 10
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, n)
    steps = [rng.permutation(n)[:batch] for _ in range(epochs * n // batch)]
    cut = len(steps) // 2 + 1

    full = CeroAllocator(n, n * epochs * 8, epochs, utility=utility)
    ref = _drive(full, steps, p, np.random.default_rng(7))

    first = CeroAllocator(n, n * epochs * 8, epochs, utility=utility)
    rng2 = np.random.default_rng(7)
    got = _drive(first, steps[:cut], p, rng2)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = CeroAllocator(n, n * epochs * 8, epochs, utility=utility)
    resumed.load_state_dict(state)
    assert _same_state(_snapshot(resumed), _snapshot(first))
    got += _drive(resumed, steps[cut:], p, rng2)
    assert got == ref
    assert resumed.spent == full.spent and resumed.price == full.price


def test_load_state_from_another_config_is_rejected_and_leaves_state():
    a = CeroAllocator(8, 8 * 2 * 8, 2)
    a.allocate(range(8))
    state = a.state_dict()
    b = CeroAllocator(8, 8 * 2 * 8, 2, n_max=12)
    before = _snapshot(b)
    with pytest.raises(ValueError, match="another config.*n_max"):
        b.load_state_dict(state)
    assert _same_state(_snapshot(b), before)
    c = CeroAllocator(8, 8 * 2 * 8, 2)
    bad = dict(state, alpha=torch.ones(7, dtype=torch.float64))
    before = _snapshot(c)
    with pytest.raises(ValueError, match="alpha.*shape"):
        c.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing keys"):
        c.load_state_dict({"alpha": state["alpha"]})
    with pytest.raises(ValueError, match="spent"):
        c.load_state_dict(dict(state, spent=10**9))
    assert _same_state(_snapshot(c), before)


def test_state_dict_is_plain():
    alloc = CeroAllocator(5, 5 * 3 * 8, 3)
    alloc.allocate([0, 2, 4])
    for k, v in alloc.state_dict().items():
        assert isinstance(v, (torch.Tensor, int, float, dict)), k
        if isinstance(v, torch.Tensor):
            assert v.device.type == "cpu" and v.dtype in (torch.float64, torch.int64)


def test_id_types_are_interchangeable():
    results = []
    for ids in ([3, 1, 4, 0], np.array([3, 1, 4, 0]), torch.tensor([3, 1, 4, 0]), (3, 1, 4, 0),
                np.array([3.0, 1.0, 4.0, 0.0])):
        alloc = CeroAllocator(6, 6 * 2 * 8, 2)
        alloc.update(ids, [1, 0, 3, 2], [4, 4, 4, 4])
        results.append((alloc.allocate(ids).tolist(), alloc.posterior_mean(ids).tolist()))
    assert all(r == results[0] for r in results)


# --------------------------------------------------------------------------------------------------
# bad input: a clear error, state unchanged
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda a: a.allocate([0, 9]), ValueError, "unknown prompt ids \\[9\\]"),
        (lambda a: a.allocate([-1]), ValueError, "unknown prompt ids \\[-1\\]"),
        (lambda a: a.allocate([1, 1]), ValueError, "repeats ids \\[1\\]"),
        (lambda a: a.allocate([[0, 1]]), ValueError, "1-D"),
        (lambda a: a.allocate([0.5]), ValueError, "whole numbers"),
        (lambda a: a.allocate([True, False]), TypeError, "booleans"),
        (lambda a: a.allocate("01"), TypeError, "prompt_ids"),
        (lambda a: a.update([0, 1], [3, 1], [2, 4]), ValueError, "successes must not exceed trials"),
        (lambda a: a.update([0], [-1], [2]), ValueError, "successes must be non-negative"),
        (lambda a: a.update([0], [0], [-2]), ValueError, "trials must be non-negative"),
        (lambda a: a.update([0, 1], [1], [2, 2]), ValueError, "same length"),
        (lambda a: a.update([0, 8], [1, 1], [2, 2]), ValueError, "unknown prompt ids \\[8\\]"),
        (lambda a: a.posterior_mean([8]), ValueError, "unknown prompt ids"),
    ],
)
def test_bad_input_raises_and_leaves_state_unchanged(call, exc, match):
    alloc = CeroAllocator(8, 8 * 3 * 8, 3)
    alloc.allocate([0, 1, 2, 3])
    alloc.update([0, 1], [1, 2], [8, 8])
    before = _snapshot(alloc)
    with pytest.raises(exc, match=match):
        call(alloc)
    assert _same_state(_snapshot(alloc), before)


# --------------------------------------------------------------------------------------------------
# usefulness: more informative rollouts than uniform GRPO on a fixed simulated population
# --------------------------------------------------------------------------------------------------
def _informative_fraction(method: str, seed: int) -> float:
    n, epochs, batch, n_ref = 256, 8, 64, 8
    pop = np.random.default_rng(1234)
    kind = pop.choice(3, size=n, p=[0.35, 0.15, 0.5])
    logits = np.array([-4.0, 3.5, -0.5])[kind] + np.array([1.2, 1.0, 1.5])[kind] * pop.standard_normal(n)
    p = 1 / (1 + np.exp(-logits))
    rng = np.random.default_rng(seed)
    alloc = CeroAllocator(n, n * epochs * n_ref, epochs)
    spent = informative = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for j in range(0, n, batch):
            ids = order[j:j + batch]
            c = alloc.allocate(ids).numpy() if method == "cero" else np.full(ids.size, n_ref)
            s = rng.binomial(c, p[ids])
            if method == "cero":
                alloc.update(ids, s, c)
            spent += int(c.sum())
            informative += int(c[(s > 0) & (s < c)].sum())
    assert spent <= n * epochs * n_ref and spent > n * epochs * n_ref - 16
    return informative / spent


def test_cero_beats_uniform_on_informative_rollouts():
    for seed in (0, 1):
        uniform = _informative_fraction("uniform", seed)
        cero = _informative_fraction("cero", seed)
        # uniform lands about 0.50 of its rollouts in mixed groups, CERO about 0.73 (seeds 0, 1)
        assert cero >= uniform + 0.15, (cero, uniform)
