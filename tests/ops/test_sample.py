"""espo.sample: every backend against the PyTorch reference, the reference against the definitions,
sampling frequencies, exact top-k/top-p, batch invariance, determinism, invalid rows and bad input."""
import numpy as np
import pytest
import torch
from conftest import backend_device_pairs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_helpers import chi_square, chi_square_bound, kept_set

import espo
from espo.ops.reference import base2_logits, integer_masses, mass_shift

PAIRS = backend_device_pairs()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOAT_FIELDS = ("logprobs", "raw_logprobs", "entropy", "max_logprob", "regret")


def random_logits(B, V, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * scale).to(dtype).to(device)


def poison_rows(logits: torch.Tensor) -> list[bool]:
    """Make rows 0-4 of ``logits`` [B >= 5, V >= 4] the invalid-row cases, in place, and return the expected ``valid``:
    one NaN, all -inf, one +inf, a single finite logit left (valid and certain: its token is V - 1), NaN in many
    chunks; the other rows stay as they are (valid)."""
    V = logits.shape[1]
    logits[0, 5 % V] = torch.nan
    logits[1] = -torch.inf
    logits[2, V - 3] = torch.inf
    logits[3, : V - 1] = -torch.inf
    logits[4, : V // 2] = torch.nan
    return [False, False, False, True, False] + [True] * (logits.shape[0] - 5)


def assert_matches(out, ref, rtol=2e-5, atol=2e-5):
    """The same tokens and statistics (float tolerances). Sampling is exact integer arithmetic, so tokens
    are equal bit for bit on the CPU (the interpreter rounds exp2 as the reference does); on a GPU the
    kernels' ex2.approx may move a draw that falls within ~2**-22 of a token boundary (at most 0.1%)."""
    mismatched = (out.tokens != ref.tokens).sum().item()
    allowed = 0 if out.tokens.device.type == "cpu" else len(ref.tokens) // 1000
    assert mismatched <= allowed, f"{mismatched} of {len(ref.tokens)} tokens differ"
    same = out.tokens == ref.tokens
    torch.testing.assert_close(out.valid, ref.valid)
    for field in FLOAT_FIELDS:
        a, b = getattr(out, field)[same], getattr(ref, field)[same]
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{field}: {m}")


# ---------------------------------------------------------------- backends against the reference


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, V", [(1, 1), (3, 17), (5, 1000), (2, 4099)])
def test_backend_matches_reference(backend, device, dtype, B, V):
    logits = random_logits(B, V, dtype, device, seed=B * V)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.25][:B], device=device) if B > 1 else 0.9
    kw = dict(temperature=temperature, seed=torch.arange(B, device=device) * 977 - 5, offset=11)
    assert_matches(espo.sample(logits, backend=backend, **kw), espo.sample(logits, backend="torch", **kw))


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6])
def test_scalar_and_per_row_arguments_agree(backend, device, temperature):
    B, V = 4, 300
    logits = random_logits(B, V, device=device, seed=1)
    scalar = espo.sample(logits, temperature=temperature, seed=7, offset=3, backend=backend)
    per_row = espo.sample(
        logits,
        temperature=torch.full((B,), temperature, device=device),
        seed=torch.full((B,), 7, device=device),
        offset=torch.full((B,), 3, device=device),
        backend=backend,
    )
    for a, b in zip(scalar, per_row):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_scalar_seeds_and_offsets_at_32_bit_boundaries_match_reference(backend, device):
    """Triton types a Python int in [2**31, 2**32) as uint32: such seeds and offsets must still key the draw."""
    logits = random_logits(4, 300, device=device, seed=2)
    for value in (2**31 - 1, 2**31, 3144134225, 2**32 - 1, 2**32, -(2**31) - 1, 2**63 - 1):
        for kw in (dict(seed=value, offset=3), dict(seed=11, offset=abs(value))):
            assert_matches(espo.sample(logits, backend=backend, **kw), espo.sample(logits, backend="torch", **kw))


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (20, 0.5), (299, 0.999), (1, 0.3)])
def test_filtered_sampling_matches_reference(backend, device, top_k, top_p):
    B, V = 6, 300
    logits = random_logits(B, V, device=device, seed=top_k)
    kw = dict(temperature=0.8, top_k=top_k, top_p=top_p, seed=torch.arange(B, device=device), offset=2)
    assert_matches(espo.sample(logits, backend=backend, **kw), espo.sample(logits, backend="torch", **kw))


@pytest.mark.parametrize("backend, device", PAIRS)
def test_per_row_filters_match_reference(backend, device):
    B, V = 5, 257
    logits = random_logits(B, V, torch.bfloat16, device, seed=3)
    kw = dict(
        temperature=torch.tensor([1.0, 0.5, 0.0, 2.0, 0.9], device=device),
        top_k=torch.tensor([0, 10, 5, 1000, 3], device=device),
        top_p=torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0], device=device),
        seed=123,
        offset=torch.arange(B, device=device),
    )
    assert_matches(espo.sample(logits, backend=backend, **kw), espo.sample(logits, backend="torch", **kw))


# ---------------------------------------------------------------- the reference against the definitions


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_reference_statistics_follow_their_definitions(temperature):
    B, V = 8, 513
    logits = random_logits(B, V, seed=4)
    out = espo.sample(logits, temperature=temperature, seed=9, backend="torch")
    x = logits.double()
    logp = torch.log_softmax(x / temperature, dim=1)
    raw = torch.log_softmax(x, dim=1)
    rows = torch.arange(B)
    torch.testing.assert_close(out.logprobs.double(), logp[rows, out.tokens], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.raw_logprobs.double(), raw[rows, out.tokens], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), -(logp.exp() * logp).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.max_logprob.double(), logp.max(1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.regret, out.max_logprob - out.logprobs, rtol=1e-5, atol=1e-5)
    assert (out.regret >= 0).all()


def test_reference_filters_match_brute_force():
    g = np.random.default_rng(0)
    for trial in range(60):
        V = int(g.integers(1, 200))
        x = np.round(g.normal(size=V) * 2, 1).astype(np.float32)  # rounding makes ties
        k, p, t = int(g.integers(0, V + 2)), float(g.uniform(0.05, 1.0)), float(g.uniform(0.3, 2.0))
        from espo.ops.reference import _filter_mask

        xt = torch.from_numpy(x)[None]
        y = base2_logits(xt, 1.0 / torch.tensor([t], dtype=torch.float32))
        qg = integer_masses(y, torch.ceil(y.max()), mass_shift(V))  # the global integer masses
        got = _filter_mask(xt, qg, torch.tensor([k]), torch.tensor([p]))[0].numpy()
        np.testing.assert_array_equal(got, kept_set(x, t, k, p), err_msg=f"trial {trial}: V={V} k={k} p={p}")


def test_greedy_is_first_argmax_with_zero_regret():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    out = espo.sample(logits, temperature=0.0, backend="torch")
    assert out.tokens.tolist() == [1, 0]
    assert (out.regret == 0).all() and (out.logprobs == 0).all() and (out.entropy == 0).all()
    torch.testing.assert_close(out.raw_logprobs, torch.log_softmax(logits, 1)[[0, 1], [1, 0]])


# ---------------------------------------------------------------- sampling frequencies


def draw_many(logits_row, n, backend, device, **kw):
    """n draws of one distribution: n rows of the same logits with distinct offsets."""
    logits = logits_row.to(device).expand(n, -1).contiguous()
    return espo.sample(logits, seed=2024, offset=torch.arange(n, device=device), backend=backend, **kw).tokens.cpu()


def frequency_check(tokens, probs):
    counts = np.bincount(tokens.numpy(), minlength=probs.size)
    assert counts[probs == 0].sum() == 0, "a token of zero probability was drawn"
    assert chi_square(counts, probs) < chi_square_bound(int((probs > 0).sum()))


def test_frequency_check_fails_a_wrong_sampler():
    x = torch.randn(40, generator=torch.Generator().manual_seed(0)) * 1.5
    probs = torch.softmax(x.double(), 0).numpy()
    tokens = torch.distributions.Categorical(logits=x / 1.15).sample((50_000,))  # wrong temperature
    with pytest.raises(AssertionError):
        frequency_check(tokens, probs)
    with pytest.raises(AssertionError):
        frequency_check((torch.distributions.Categorical(logits=x).sample((50_000,)) + 1) % 40, probs)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 12, 1.0), (1.3, 0, 0.6)])
def test_reference_draws_follow_the_distribution(temperature, top_k, top_p):
    x = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 1.5
    x[[3, 17]] = -torch.inf  # masked tokens are never drawn
    keep = torch.from_numpy(kept_set(x.numpy(), temperature, top_k, top_p))
    probs = torch.softmax(torch.where(keep, x.double() / temperature, -torch.inf), 0).numpy()
    frequency_check(draw_many(x[None], 60_000, "torch", "cpu", temperature=temperature, top_k=top_k, top_p=top_p),
                    probs)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_backend_draws_follow_the_distribution(backend, device):
    n = 800 if device == "cpu" else 200_000  # the interpreter is slow; the GPU draws many
    x = torch.randn(16, generator=torch.Generator().manual_seed(2)) * 1.5
    x[[0, 9]] = -torch.inf
    probs = torch.softmax(x.double() / 0.8, 0).numpy()
    tokens = draw_many(x[None], n, backend, device, temperature=0.8)
    frequency_check(tokens, probs)
    mismatched = int((tokens != draw_many(x[None], n, "torch", "cpu", temperature=0.8)).sum())
    # exact on the CPU; on a GPU only ex2.approx's rounding can move a draw (~1e-6 of them at V = 16)
    assert mismatched == 0 if device == "cpu" else mismatched <= n * 1e-4


@pytest.mark.parametrize("backend, device", PAIRS)
def test_filtered_tokens_stay_in_the_kept_set(backend, device):
    B, V = 64, 200
    logits = torch.round(random_logits(B, V, seed=5) * 2) / 2  # many ties at the thresholds
    tokens = espo.sample(logits.to(device), temperature=0.9, top_k=7, top_p=0.7, seed=1,
                         offset=torch.arange(B, device=device), backend=backend).tokens.cpu()
    for b in range(B):
        assert kept_set(logits[b].numpy(), 0.9, 7, 0.7)[tokens[b]], f"row {b} drew a filtered token"


# ---------------------------------------------------------------- batch invariance and determinism


@pytest.mark.parametrize("backend, device", PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_row_samples_the_same_alone_or_in_any_batch(backend, device, top_p):
    B, V = 9, 700
    logits = random_logits(B, V, torch.bfloat16, device, seed=6)
    seed = torch.arange(B, device=device) * 31 + 1
    offset = torch.arange(B, device=device) + 100
    batch = espo.sample(logits, temperature=0.9, top_p=top_p, seed=seed, offset=offset, backend=backend)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(0)).to(device)
    shuffled = espo.sample(logits[perm], temperature=0.9, top_p=top_p, seed=seed[perm], offset=offset[perm],
                           backend=backend)
    for i in (0, 4, 8):
        alone = espo.sample(logits[i : i + 1], temperature=0.9, top_p=top_p, seed=int(seed[i]), offset=int(offset[i]),
                            backend=backend)
        for a, b in zip(alone[:7], batch[:7]):
            torch.testing.assert_close(a[0], b[i], rtol=0, atol=0)
    for a, b in zip(shuffled[:7], batch[:7]):
        torch.testing.assert_close(a, b[perm], rtol=0, atol=0)
    again = espo.sample(logits, temperature=0.9, top_p=top_p, seed=seed, offset=offset, backend=backend)
    for a, b in zip(again[:7], batch[:7]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_different_offsets_draw_differently():
    logits = torch.zeros(1, 1000)
    tokens = {espo.sample(logits, seed=1, offset=o, backend="torch").tokens.item() for o in range(50)}
    assert len(tokens) > 40


# ---------------------------------------------------------------- invalid rows and bad input


@pytest.mark.parametrize("backend, device", PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_invalid_rows_are_flagged_not_sampled(backend, device, dtype):
    logits = random_logits(5, 37, dtype, device, seed=7)
    logits[0, 5] = torch.nan
    logits[1] = -torch.inf
    logits[2, 30] = torch.inf
    logits[3, :36] = -torch.inf  # one finite logit left: a valid, certain row
    for kw in (dict(), dict(temperature=0.0), dict(top_k=3, top_p=0.5)):
        out = espo.sample(logits, backend=backend, **kw)
        assert out.valid.tolist() == [False, False, False, True, True]
        assert out.tokens[:3].tolist() == [-1, -1, -1]
        assert out.tokens[3].item() == 36
        for field in FLOAT_FIELDS:
            assert torch.isnan(getattr(out, field)[:3]).all()
            assert torch.isfinite(getattr(out, field)[3:]).all()


EVERY_BACKEND = PAIRS + [pytest.param("torch", "cpu", id="torch-cpu")]


@pytest.mark.parametrize("backend, device", EVERY_BACKEND)
def test_tempered_overflow_is_flagged_alike_on_every_backend(backend, device):
    """Rows whose tempered logits leave the float32 range: flagged invalid (never a silent token), the same rows
    on every backend; rows of huge but representable logits sample exactly as the reference does."""
    V = 37
    huge = torch.zeros(V)
    huge[5] = 2.4e38  # x * log2(e) overflows at T = 1 (and for greedy)
    lows = torch.full((V,), -3.4e38)  # float32's lowest: -inf once tempered at T <= 1.41
    cases = [  # (row, temperature, valid)
        (huge, 1.0, False), (huge, 0.0, False), (huge, 2.0, True), (lows, 1.0, False), (lows, 2.0, True),
        (random_logits(1, V, seed=3)[0], 1e-39, False), (random_logits(1, V, seed=4)[0] * 10, 1e-37, False),
        (random_logits(1, V, seed=5)[0], 1e-30, True),
    ]
    logits = torch.stack([c[0] for c in cases]).to(device)
    kw = dict(temperature=torch.tensor([c[1] for c in cases], device=device),
              seed=torch.arange(len(cases), device=device), offset=3, validate=False)
    for extra in (dict(), dict(top_k=4), dict(top_p=0.5)):
        out = espo.sample(logits, backend=backend, **kw, **extra)
        assert out.valid.tolist() == [c[2] for c in cases]
        assert (out.tokens[~out.valid] == -1).all()
        assert_matches(out, espo.sample(logits, backend="torch", **kw, **extra))
        assert out.tokens[2].item() == 5  # at T = 2 the huge logit holds all the mass
        assert torch.isfinite(out.logprobs[out.valid]).all()
    row = espo.sample(logits[4:5], temperature=2.0, backend=backend)  # equal lowest logits: uniform, log(1/V)
    assert row.logprobs.item() == pytest.approx(-np.log(V), rel=1e-5)


@pytest.mark.parametrize("backend, device", EVERY_BACKEND)
def test_non_finite_values_count_as_the_value_floor(backend, device):
    """Unchecked (validate=False) NaN or infinite critic values use the floor, identically on every backend."""
    B, V = 4, 50
    logits = random_logits(B, V, device=device, seed=9, scale=4.0)
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.2], device=device)
    stops = []
    for v in (values, None):
        stopper = espo.EarlyStopper(espo.ESPOConfig(beta=0.5, beta_min=0.1, alpha_s=0.0, clip=3.0), B, device)
        espo.sample(logits, stopper=stopper, seed=1, backend=backend)
        stopper.end_batch()
        stopper.arm()
        out = espo.sample(logits, stopper=stopper, values=v, seed=torch.arange(B, device=device), offset=1,
                          backend=backend, validate=False)
        stops.append(out.stop.tolist())
    assert any(stops[1]) and stops[0] == stops[1]  # as with no values at all: every row at the floor
    with pytest.raises(ValueError, match="values must be finite"):
        espo.sample(logits, stopper=stopper, values=values, backend=backend)


def test_numpy_numbers_are_accepted():
    logits = random_logits(3, 40, seed=2)
    kw = dict(temperature=0.7, top_k=5, top_p=0.9, seed=11, offset=4)
    numpy_kw = dict(temperature=np.float32(0.7), top_k=np.int64(5), top_p=np.float64(0.9), seed=np.int64(11),
                    offset=np.int32(4))
    assert espo.sample(logits, **numpy_kw).tokens.tolist() == espo.sample(logits, **kw).tokens.tolist()


BAD = [
    (dict(logits=torch.zeros(3)), ValueError, "rank 2"),
    (dict(logits=torch.zeros(2, 3, 4)), ValueError, "rank 2"),
    (dict(logits=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "float32, bfloat16 or float16"),
    (dict(logits=torch.zeros(2, 0)), ValueError, "V == 0"),
    (dict(logits=[[1.0, 2.0]]), TypeError, "torch.Tensor"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=torch.tensor([1.0, -1.0])), ValueError, "temperature"),
    (dict(temperature=torch.ones(3)), ValueError, "temperature must be a scalar or have one entry per row"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k"),
    (dict(seed=torch.zeros(5, dtype=torch.int64)), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(values=torch.zeros(2)), ValueError, "stopper"),
    (dict(stopper=espo.EarlyStopper(batch_size=3)), ValueError, "stopper_rows"),
    (dict(backend="fastest"), ValueError, "backend"),
    (dict(temperature=1e-39), ValueError, "temperature"),
    (dict(temperature=1e-50), ValueError, "temperature"),
    (dict(temperature=torch.tensor(1e-50, dtype=torch.float64)), ValueError, "temperature .*float32 rounds to 0"),
    (dict(temperature=torch.tensor([0.0, 1e-50], dtype=torch.float64)), ValueError, "temperature .*rounds to 0"),
    (dict(temperature=torch.tensor([0.5, 1e-39], dtype=torch.float64)), ValueError, "temperature"),
    (dict(top_p=torch.tensor([1.0, 1e-50], dtype=torch.float64)), ValueError, "top_p"),
    (dict(top_k=2**70), ValueError, "top_k must fit"),
    (dict(offset=2**70), ValueError, "offset must fit"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(logits=torch.zeros(2, 5, device="meta")), ValueError, "meta device"),
    (dict(stopper=espo.EarlyStopper(batch_size=2), values=torch.tensor([float("nan"), 0.0])), ValueError, "finite"),
]


@pytest.mark.parametrize("kwargs, error, words", BAD, ids=[f"{i}-{b[2][:20]}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(kwargs, error, words):
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits", torch.zeros(2, 5))
    with pytest.raises(error, match=words):
        espo.sample(logits, **kwargs)


def test_empty_batch_returns_empty_outputs():
    out = espo.sample(torch.zeros(0, 5), backend="torch")
    assert out.tokens.shape == (0,) and out.valid.dtype == torch.bool


# ---------------------------------------------------------------- property tests


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 4),
    V=st.integers(1, 90),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    top_k=st.integers(0, 100),
    top_p=st.floats(0.05, 1.0),
    seed=st.integers(-(2**63), 2**64 - 1),
    offset=st.integers(0, 2**40),
    data_seed=st.integers(0, 2**31),
)
def test_reference_properties(B, V, temperature, top_k, top_p, seed, offset, data_seed):
    logits = random_logits(B, V, seed=data_seed)
    out = espo.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=offset,
                      backend="torch")
    assert out.valid.all()
    assert ((out.tokens >= 0) & (out.tokens < V)).all()
    assert (out.regret >= 0).all() and (out.logprobs <= out.max_logprob + 1e-6).all()
    assert (out.entropy >= -1e-5).all() and (out.entropy <= np.log(V) + 1e-4).all()
    if temperature > 0:
        for b in range(B):
            assert kept_set(logits[b].numpy(), temperature, top_k, top_p)[out.tokens[b]]


TRITON_CPU = [p for p in PAIRS if p.values == ("triton", "cpu")]


@pytest.mark.skipif(not TRITON_CPU, reason="triton interpreter unavailable")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3),
    V=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.5]),
    top_k=st.sampled_from([0, 1, 4, 50]),
    top_p=st.sampled_from([1.0, 0.95, 0.5]),
    seed=st.integers(-(2**63), 2**63 - 1),
    data_seed=st.integers(0, 2**31),
)
def test_triton_equals_reference_on_random_cases(B, V, dtype, temperature, top_k, top_p, seed, data_seed):
    logits = random_logits(B, V, dtype, seed=data_seed)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=torch.arange(B))
    assert_matches(espo.sample(logits, backend="triton", **kw), espo.sample(logits, backend="torch", **kw))
