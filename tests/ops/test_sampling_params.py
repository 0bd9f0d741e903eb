"""espo.SamplingParams: checked once where it is built (with espo.sample's own messages), frozen, per-row tensors,
``params=`` instead of the keywords (never both), the validate=False path, and the same draws either way on every
backend that runs here (Triton interpreted on the CPU)."""
import dataclasses
import inspect
import math
import sys

import numpy as np
import pytest
import torch
from conftest import backend_device_pairs

import espo
from espo import SamplingParams

FIELDS = ("tokens", "logprobs", "raw_logprobs", "entropy", "max_logprob", "regret", "valid", "stop")

# Settings espo.sample refuses whatever the batch: SamplingParams refuses them when built, with the same error.
BAD = [
    dict(temperature=-0.5),
    dict(temperature=float("nan")),
    dict(temperature=float("inf")),
    dict(temperature=1e-39),
    dict(temperature=1e-50),
    dict(temperature="hot"),
    dict(temperature=torch.tensor([1.0, -1.0])),
    dict(temperature=torch.tensor([True, False])),
    dict(temperature=torch.tensor(1e-50, dtype=torch.float64)),
    dict(temperature=torch.tensor([0.0, 1e-50], dtype=torch.float64)),
    dict(temperature=torch.tensor([0.5, 1e-39], dtype=torch.float64)),
    dict(top_k=-1),
    dict(top_k=2.5),
    dict(top_k=True),
    dict(top_k=2**70),
    dict(top_k=torch.tensor([1.0, 2.0])),
    dict(top_k=torch.tensor([3, -1])),
    dict(top_p=0.0),
    dict(top_p=1.5),
    dict(top_p=torch.tensor([1.0, 1e-50], dtype=torch.float64)),
    dict(top_p=torch.tensor([0.5, 0.0])),
    dict(seed=2**64),
    dict(seed=-(2**63) - 1),
    dict(seed=1.5),
    dict(seed=torch.tensor([0.0, 1.0])),
]


def logits_of(B, V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def error_of(fn):
    with pytest.raises((ValueError, TypeError)) as err:
        fn()
    return type(err.value), str(err.value)


@pytest.mark.parametrize("kwargs", BAD, ids=[f"{i}-{next(iter(b))}" for i, b in enumerate(BAD)])
def test_bad_settings_are_refused_when_built_with_espo_samples_message(kwargs):
    (name,) = kwargs
    built = error_of(lambda: SamplingParams(**kwargs))
    assert built == error_of(lambda: espo.sample(logits_of(2, 5), **kwargs))
    assert name in built[1]


def test_numbers_are_always_checked_tensor_values_only_when_validating():
    for kwargs in (dict(temperature=-0.5), dict(top_k=-1), dict(top_p=0.0), dict(top_k=2.5), dict(seed=2**64)):
        with pytest.raises((ValueError, TypeError)):
            SamplingParams(**kwargs, validate=False)
    with pytest.raises(TypeError, match="top_k must hold integers"):  # dtypes too
        SamplingParams(top_k=torch.tensor([1.0]), validate=False)
    unchecked = dict(temperature=torch.tensor([-1.0, 0.5]), top_k=torch.tensor([-3, 2]),
                     top_p=torch.tensor([1.0, 1e-50], dtype=torch.float64))
    params = SamplingParams(**unchecked, validate=False)  # values not read: no device sync
    assert params.top_p.dtype == torch.float32 and params.top_p[1] == 0
    for name, value in unchecked.items():
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: value})
    # espo.sample with the keywords and validate=False skips the same checks, and so draws
    out = espo.sample(logits_of(2, 7), temperature=torch.tensor([0.5, 0.7]), top_k=torch.tensor([-3, 2]),
                      validate=False)
    assert out.valid.all()


# Plain numbers at and beyond the edges of each rule, for the quick test of plain Python numbers in SamplingParams
EDGES = dict(
    temperature=[0.0, -0.0, 2.0**-126, math.nextafter(2.0**-126, 0.0), 1e-300, -1e-30, 0.7, 1.0, 1e300,
                 sys.float_info.max, math.inf, -math.inf, math.nan, 1, 0, True, np.float64(0.5)],
    top_k=[0, 1, 50, 2**63 - 1, 2**63, -1, 0.0, 5.0, True, False, np.int64(3)],
    top_p=[1.0, 0.95, 5e-324, 0.0, -0.0, math.nextafter(1.0, 2.0), 1, math.nan, math.inf, np.float32(0.5)],
    seed=[0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 1.0, True, np.uint64(7)],
)


@pytest.mark.parametrize("name", list(EDGES))
def test_plain_numbers_are_held_as_the_checks_hold_them(name):
    """SamplingParams tells plain numbers that pass every check apart in one test; whatever it decides, a value is
    held or refused exactly as the checks themselves hold or refuse it."""
    from espo.ops.sampling_params import _checked

    defaults = dict(temperature=0.7, top_k=0, top_p=1.0, seed=0)
    for value in EDGES[name]:
        kwargs = {**defaults, name: value}
        try:
            expected = _checked(**kwargs, validate=True)
        except (ValueError, TypeError) as err:
            assert error_of(lambda: SamplingParams(**kwargs)) == (type(err), str(err)), value
            continue
        held = SamplingParams(**kwargs)
        for field, want in expected.items():
            got = getattr(held, field)
            assert type(got) is type(want) and repr(got) == repr(want), (name, value, field)


def test_frozen_and_compared_by_value():
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=11)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5
    assert [f.name for f in dataclasses.fields(params)] == ["temperature", "top_k", "top_p", "seed"]
    numpy = SamplingParams(temperature=np.float32(0.7), top_k=np.int64(5), top_p=np.float64(0.9), seed=np.int32(11))
    assert type(numpy.top_k) is int and type(numpy.temperature) is float
    assert numpy.temperature == float(np.float32(0.7)) and numpy.top_k == 5 and numpy.seed == 11
    a, b = SamplingParams(0.5, 3), SamplingParams(0.5, 3)
    assert a == b and hash(a) == hash(b) and a is not b
    assert SamplingParams(0.5, 3) != SamplingParams(0.5, 4) and SamplingParams() != "settings"
    rows = SamplingParams(temperature=torch.tensor([0.5, 1.0], dtype=torch.float64), top_k=torch.tensor([1, 2]))
    same = SamplingParams(temperature=torch.tensor([0.5, 1.0]), top_k=torch.tensor([1, 2], dtype=torch.int32))
    assert rows == same and hash(rows) == hash(same)
    assert rows != SamplingParams(temperature=torch.tensor([0.5, 2.0]), top_k=torch.tensor([1, 2]))
    assert rows != SamplingParams(temperature=0.5, top_k=torch.tensor([1, 2]))


def test_per_row_tensors_are_held_in_the_backends_dtypes_and_placed_on_the_rows():
    seed = torch.arange(3)
    params = SamplingParams(temperature=torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64),
                            top_k=torch.tensor([0, 1, 4], dtype=torch.int32), top_p=torch.tensor(0.9), seed=seed)
    assert params.per_row and not SamplingParams(0.5).per_row
    assert params.temperature.dtype == torch.float32 and params.top_k.dtype == torch.int64
    assert params.seed is seed  # kept, not copied
    rows = params.on_rows(3, torch.device("cpu"))
    assert rows.top_p.shape == (3,) and rows.top_p.is_contiguous() and torch.equal(rows.top_p, torch.full((3,), 0.9))
    with pytest.raises(ValueError, match=r"top_k must be a scalar or have one entry per row, shape \(2,\); got \(3,\)"):
        SamplingParams(top_k=params.top_k).on_rows(2, torch.device("cpu"))
    scalar = SamplingParams(0.5, 3, 0.9, 7)
    assert scalar.on_rows(4, torch.device("cpu")) is scalar  # nothing to place: no new object on the hot path
    assert SamplingParams(seed=2**64 - 1).on_rows(4, torch.device("cpu")).seed == -1  # the same 64 bits, signed


def test_with_seed_checks_only_the_new_seed():
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1)
    seeds = torch.tensor([3, 4])
    moved = params.with_seed(seeds)
    assert moved.seed is seeds and (moved.temperature, moved.top_k, moved.top_p) == (0.7, 5, 0.9)
    assert params.seed == 1  # frozen: a new object
    with pytest.raises(TypeError, match="seed must hold integers"):
        params.with_seed(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        params.with_seed(2**64)


def test_shared_settings_refuse_tensors():
    assert SamplingParams.shared(temperature=0.5, top_k=2) == SamplingParams(0.5, 2)
    with pytest.raises(TypeError, match="top_p must be one number for every rollout here, got a tensor"):
        SamplingParams.shared(top_p=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="temperature must be finite and 0"):
        SamplingParams.shared(temperature=1e-50)


def test_params_or_keywords_never_both():
    logits = logits_of(2, 9)
    params = SamplingParams(temperature=0.7, top_k=3)
    for keyword in (dict(temperature=0.7), dict(temperature=1.0), dict(top_k=0), dict(top_p=1.0), dict(seed=0)):
        with pytest.raises(TypeError, match=f"not both: got params and {next(iter(keyword))}"):
            espo.sample(logits, params=params, **keyword)
    with pytest.raises(TypeError, match="params must be an espo.SamplingParams, got dict"):
        espo.sample(logits, params=dict(temperature=0.7))
    defaults = {name: p.default for name, p in inspect.signature(espo.sample).parameters.items()}
    assert [repr(defaults[k]) for k in ("temperature", "top_k", "top_p", "seed")] == ["1.0", "0", "1.0", "0"]
    assert espo.sample(logits).tokens.tolist() == espo.sample(logits, params=SamplingParams()).tokens.tolist()


def backends_here():
    return [pytest.param("torch", "cpu", id="torch-cpu")] + backend_device_pairs()


def assert_same_outputs(a, b):
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        if x is None or y is None:
            assert x is None and y is None, field
        else:
            assert torch.equal(x.nan_to_num(0.5) if x.is_floating_point() else x,
                               y.nan_to_num(0.5) if y.is_floating_point() else y), field


@pytest.mark.parametrize("backend, device", backends_here())
@pytest.mark.parametrize("per_row", [False, True])
def test_params_and_keywords_draw_the_same(backend, device, per_row):
    B, V = 5, 301
    logits = logits_of(B, V, seed=4).to(device)
    logits[1, 7] = torch.nan  # an invalid row
    if per_row:
        settings = dict(temperature=torch.tensor([0.0, 0.7, 1.0, 1.3, 0.5], device=device),
                        top_k=torch.tensor([0, 5, 0, 40, 3], device=device),
                        top_p=torch.tensor([1.0, 0.9, 0.5, 1.0, 1.0], device=device),
                        seed=torch.tensor([1, 2**63 - 1, -5, 0, 9], device=device))
    else:
        settings = dict(temperature=0.8, top_k=20, top_p=0.9, seed=2**64 - 3)  # an unsigned seed
    offset = torch.arange(B, device=device) * 3
    stoppers = [espo.EarlyStopper(batch_size=B, config=espo.ESPOConfig(min_tokens=0), device=device) for _ in "ab"]
    for stopper in stoppers:
        stopper.set_statistics(mean=0.1, var=0.01, beta=0.05)
        stopper.arm()
    by_keywords = espo.sample(logits, **settings, offset=offset, stopper=stoppers[0], backend=backend)
    by_params = espo.sample(logits, params=SamplingParams(**settings), offset=offset, stopper=stoppers[1],
                            backend=backend)
    assert_same_outputs(by_keywords, by_params)
    assert by_keywords.valid.tolist() == [True, False, True, True, True]
    for name, row in stoppers[0].rows.items():
        assert torch.equal(row, stoppers[1].rows[name]), name
    if backend != "torch" and device == "cpu":  # the interpreted kernel draws the reference's tokens (a GPU's
        # ex2.approx may move a rare draw: tests/ops/test_sample.py bounds that)
        reference = espo.sample(logits.cpu(), params=SamplingParams(**{k: v.cpu() if isinstance(v, torch.Tensor)
                                                                         else v for k, v in settings.items()}),
                                offset=offset.cpu(), backend="torch")
        assert torch.equal(by_params.tokens.cpu(), reference.tokens)
