"""espo.ops.torch_backend (the "torch" backend) against espo.ops.reference: the same tokens bit for bit, regret,
max_logprob, logprobs and raw_logprobs bit for bit, the entropy within float tolerance, on random inputs (odd
shapes, every dtype, per-row filters, -inf, NaN, huge values) and on the stop state it updates."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import espo
from espo.ops.philox import _uniform_numpy, philox4x32
from espo.ops.reference import sample_reference
from espo.ops.sampling_params import SamplingParams
from espo.ops.torch_backend import sample_torch

EXACT_FIELDS = ("tokens", "valid", "regret", "max_logprob", "logprobs", "raw_logprobs")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_same_as_reference(logits, temperature, top_k, top_p, seed, offset):
    params = SamplingParams(temperature, top_k, top_p, seed)
    ref = sample_reference(logits, params, offset)
    out = sample_torch(logits, params, offset)
    for field in EXACT_FIELDS:
        a, b = out[field], ref[field]
        assert torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)) and torch.equal(a.isnan(), b.isnan()), field
    torch.testing.assert_close(out["entropy"], ref["entropy"], rtol=2e-5, atol=2e-5, equal_nan=True)


def logits_of(B, V, dtype, data_seed, scale, specials):
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(B, V, generator=g) * scale
    if specials:  # a row of mostly -inf, a NaN row, a +inf row, a row of float32's extremes
        x[0, : V // 2 + 1] = -torch.inf
        if B > 1:
            x[1, V // 3] = torch.nan
        if B > 2:
            x[2, 0] = torch.inf
        if B > 3:
            x[3] = torch.where(torch.rand(V, generator=g) < 0.5, -3.0e38, 3.0e38)
    return x.to(dtype)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 6),
    V=st.integers(1, 5000),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([0.01, 1.0, 3.0, 30.0, 1e4]),
    temperature=st.one_of(st.sampled_from([0.0, 0.25, 0.7, 1.0, 1.7]), st.just("per-row")),
    top_k=st.one_of(st.sampled_from([0, 1, 7, 100]), st.just("per-row")),
    top_p=st.one_of(st.sampled_from([1.0, 0.95, 0.5, 0.01]), st.just("per-row")),
    specials=st.booleans(),
    seed=st.integers(-(2**63), 2**63 - 1),
    data_seed=st.integers(0, 2**31),
)
def test_torch_backend_equals_reference(B, V, dtype, scale, temperature, top_k, top_p, specials, seed, data_seed):
    logits = logits_of(B, V, dtype, data_seed, scale, specials)
    g = torch.Generator().manual_seed(data_seed + 1)
    if temperature == "per-row":
        temperature = torch.tensor([0.0, 0.3, 1.0, 1.0, 2.0, 0.9])[torch.randperm(6, generator=g)[:B]]
    if top_k == "per-row":
        top_k = torch.randint(0, V + 2, (B,), generator=g)
    if top_p == "per-row":
        top_p = torch.where(torch.rand(B, generator=g) < 0.3, 1.0, torch.rand(B, generator=g) * 0.999 + 0.001)
    seeds = seed ^ torch.arange(B, dtype=torch.int64)
    offsets = torch.randint(0, 2**40, (B,), generator=g)
    assert_same_as_reference(logits, temperature, top_k, top_p, seeds, offsets)


@pytest.mark.parametrize("V", [49152, 32000, 151936])
def test_top_p_threshold_search_at_real_vocabularies(V):
    """Real vocabularies: the nucleus found by growing top-k searches equals the reference's sort, from a few
    tokens (peaked rows) to most of the vocabulary (flat rows), with ties at the threshold."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(6, V, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [8.0], [20.0], [1.0]])
    logits[5] = torch.round(logits[5] * 2) / 2  # many equal logits: ties at the threshold
    for top_p in (0.5, 0.9, 0.95, 0.999):
        assert_same_as_reference(logits, 0.8, 0, top_p, torch.arange(6) * 31 + 1, torch.full((6,), 9))


def test_torch_backend_updates_the_stop_state_as_the_reference():
    B, V, steps = 8, 300, 40
    stoppers = [espo.EarlyStopper(batch_size=B, config=espo.ESPOConfig(min_tokens=0, clip=10.0)) for _ in range(2)]
    for stopper in stoppers:
        stopper.set_statistics(mean=0.5, var=0.25, beta=0.3)
        stopper.arm()
    g = torch.Generator().manual_seed(3)
    for t in range(steps):
        logits = torch.randn(B, V, generator=g) * 4
        outs = [
            backend(logits, SamplingParams(0.9, 0, 0.95, torch.arange(B)), torch.full((B,), t), stopper.state())
            for backend, stopper in zip((sample_reference, sample_torch), stoppers)
        ]
        assert torch.equal(outs[0]["stop"], outs[1]["stop"])
    assert stoppers[0].rows["stopped"].any(), "the test must exercise stops"
    for name, row in stoppers[0].rows.items():
        assert torch.equal(row, stoppers[1].rows[name]), name


def test_numpy_philox_equals_the_torch_definition():
    g = torch.Generator().manual_seed(0)
    seed = torch.cat([torch.randint(-(2**63), 2**63 - 1, (20000,), generator=g), torch.tensor([-1, 0, 2**63 - 1])])
    offset = torch.cat([torch.randint(0, 2**62, (20000,), generator=g), torch.tensor([0, 2**32 - 1, 2**62])])
    zero = torch.zeros_like(offset)
    for stream in (0, 1, 2**32 - 1):
        r0, _, _, _ = philox4x32(seed, seed >> 32, offset, offset >> 32, zero + stream, zero)
        assert torch.equal(_uniform_numpy(seed, offset, stream), (r0 >> 8).to(torch.float32) * 2.0**-24)
