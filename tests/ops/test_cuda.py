"""The "cuda" backend (espo._C) on the GPU: against the reference on odd shapes and every dtype, against the
Triton backend token for token over a million draws, the stop state, torch.compile, CUDA graphs, memory
layouts and bad input. Skipped where there is no GPU or espo._C is not built.

The generic backend tests (tests/ops/test_sample.py, tests/ops/test_stopper.py) also run on "cuda" once it is
available; these add what only a compiled backend needs.
"""
import math

import pytest
import torch
from test_sample import FLOAT_FIELDS, assert_matches, poison_rows  # noqa: E402  (one definition of "matches")
from test_stopper import assert_same_stop_history

import espo

INFO = espo.backends()
CUDA_OK = torch.cuda.is_available() and INFO["cuda"].available
TRITON_OK = torch.cuda.is_available() and INFO["triton"].available
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA_OK, reason=f"cuda backend unavailable: {INFO['cuda'].reason or 'no CUDA GPU'}"),
]
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton backend unavailable")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FIELDS = ("tokens",) + FLOAT_FIELDS + ("valid",)
DEV = "cuda:0"  # an explicit index: tensors made on "cuda" report cuda:0, and stoppers compare devices


def random_logits(B, V, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(B, V, device=DEV, generator=g) * scale).to(dtype)


def assert_identical(a, b):
    for field in FIELDS:
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{field}: {m}")


# ---------------------------------------------------------------- against the reference

SHAPES = [(1, 1), (3, 17), (2, 769), (5, 1000), (2, 4099), (4, 32000), (3, 151936), (2, 300_007), (1, 1_100_000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, V", SHAPES)
def test_cuda_matches_reference(dtype, B, V):
    logits = random_logits(B, V, dtype, seed=B * V)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.25][:B], device=DEV) if B > 1 else 0.9
    kw = dict(temperature=temperature, seed=torch.arange(B, device=DEV) * 977 - 5, offset=11)
    assert_matches(espo.sample(logits, backend="cuda", **kw), espo.sample(logits, backend="torch", **kw), rtol=5e-5,
                   atol=5e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.1, 50.0])
@pytest.mark.parametrize("V", [17, 5000, 151936])
def test_cuda_scalar_temperatures_match_reference(temperature, V):
    B = 8
    logits = random_logits(B, V, torch.bfloat16, seed=V)
    kw = dict(temperature=temperature, seed=3, offset=torch.arange(B, device=DEV))
    assert_matches(espo.sample(logits, backend="cuda", **kw), espo.sample(logits, backend="torch", **kw), rtol=5e-5,
                   atol=5e-5)


@pytest.mark.parametrize("V, dtype", [(300, torch.float32), (32000, torch.bfloat16), (4099, torch.float16)])
@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (20, 0.5), (299, 0.999), (1, 0.3), (0, 1.0)])
def test_cuda_filtered_sampling_matches_reference(V, dtype, top_k, top_p):
    B = 6
    logits = random_logits(B, V, dtype, seed=top_k + V)
    kw = dict(temperature=0.8, top_k=top_k, top_p=top_p, seed=torch.arange(B, device=DEV), offset=2)
    assert_matches(espo.sample(logits, backend="cuda", **kw), espo.sample(logits, backend="torch", **kw))


def test_cuda_per_row_filters_match_reference():
    B, V = 6, 257
    logits = random_logits(B, V, torch.bfloat16, seed=3)
    kw = dict(
        temperature=torch.tensor([1.0, 0.5, 0.0, 2.0, 0.9, 0.7], device=DEV),
        top_k=torch.tensor([0, 10, 5, 1000, 3, 256], device=DEV),
        top_p=torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0, 0.95], device=DEV),
        seed=123,
        offset=torch.arange(B, device=DEV),
    )
    assert_matches(espo.sample(logits, backend="cuda", **kw), espo.sample(logits, backend="torch", **kw))


def test_cuda_filtered_ties_stay_in_the_kept_set():
    B, V = 64, 5000
    logits = torch.round(random_logits(B, V, seed=5) * 2) / 2  # many ties at the thresholds
    kw = dict(temperature=0.9, top_k=7, top_p=0.7, seed=1, offset=torch.arange(B, device=DEV))
    out = espo.sample(logits, backend="cuda", **kw)
    ref = espo.sample(logits, backend="torch", **kw)
    assert (out.tokens != ref.tokens).sum() <= 1
    kth = logits.sort(dim=1, descending=True).values[:, 6:7]
    assert (logits.gather(1, out.tokens[:, None]) >= kth).all()


def test_cuda_greedy_takes_the_first_max_across_chunks():
    V = 151936
    logits = torch.full((3, V), -5.0, device=DEV)
    logits[0, [100_000, 7, 150_000]] = 9.0  # ties in three chunks: the first index wins
    logits[1, [4096, 4095]] = 2.0           # ties on both sides of a chunk boundary
    logits[2, -1] = 1.0                     # the last token
    out = espo.sample(logits.bfloat16(), temperature=0.0, backend="cuda")
    assert out.tokens.tolist() == [7, 4095, V - 1]
    assert (out.regret == 0).all() and (out.logprobs == 0).all() and (out.entropy == 0).all()


# ---------------------------------------------------------------- invariances the kernels must keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [17, 1001, 151936])
def test_cuda_results_do_not_depend_on_memory_layout(dtype, V):
    """Unaligned rows (scalar loads) give exactly what aligned rows (vector loads) give."""
    B = 4
    wide = random_logits(B, V + 3, dtype, seed=V)
    views = [wide[:, 1 : V + 1], wide[:, 3:], wide[:, 1 : V + 1].contiguous(), wide[:, 3:].contiguous()]
    kw = dict(temperature=torch.tensor([0.0, 0.8, 1.0, 1.7], device=DEV), seed=9, offset=torch.arange(B, device=DEV))
    a, b, c, d = (espo.sample(v, backend="cuda", **kw) for v in views)
    assert_identical(a, c)
    assert_identical(b, d)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_cuda_row_samples_the_same_alone_or_in_a_large_batch(top_p):
    B, V = 96, 151936
    logits = random_logits(B, V, torch.bfloat16, seed=6)
    seed = torch.arange(B, device=DEV) * 31 + 1
    offset = torch.arange(B, device=DEV) + 100
    kw = dict(temperature=0.9, top_p=top_p, backend="cuda")
    batch = espo.sample(logits, seed=seed, offset=offset, **kw)
    for i in (0, 17, B - 1):
        alone = espo.sample(logits[i : i + 1], seed=int(seed[i]), offset=int(offset[i]), **kw)
        for field in FIELDS:
            torch.testing.assert_close(getattr(alone, field)[0], getattr(batch, field)[i], rtol=0, atol=0)
    again = espo.sample(logits, seed=seed, offset=offset, **kw)
    assert_identical(again, batch)


# ---------------------------------------------------------------- the same tokens as the Triton backend


def _mismatches(V, dtype, draws, B, top_k=0, top_p=1.0, first="cuda", other="triton", chunk_rows=None):
    """(tokens that differ between backends `first` and `other`, draws): B rows a step, fresh logits now and then."""
    temperature = torch.tensor([0.6, 0.8, 1.0, 1.3], device=DEV).repeat(B // 4)
    seed = torch.arange(B, device=DEV) * 7919 + 17
    steps = math.ceil(draws / B)
    total = mismatched = 0
    logits = None
    for step in range(steps):
        if step % 16 == 0:  # fresh logits now and then: flat, medium and peaked distributions
            logits = random_logits(B, V, dtype, seed=step, scale=(1.0, 3.0, 6.0)[(step // 16) % 3])
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=step, validate=False)
        a = espo.sample(logits, backend=first, **kw)
        if other == "torch" and chunk_rows:  # the reference holds [B, V] float64 temporaries: a slice at a time
            parts = [espo.sample(logits[i : i + chunk_rows], backend="torch",
                                 **{**kw, "temperature": temperature[i : i + chunk_rows],
                                    "seed": seed[i : i + chunk_rows]})
                     for i in range(0, B, chunk_rows)]
            b_tokens = torch.cat([p.tokens for p in parts])
            b_valid = torch.cat([p.valid for p in parts])
        else:
            b = espo.sample(logits, backend=other, **kw)
            b_tokens, b_valid = b.tokens, b.valid
        assert torch.equal(a.valid, b_valid)
        mismatched += int((a.tokens != b_tokens).sum())
        total += B
    return mismatched, total


@needs_triton
@pytest.mark.parametrize("V, dtype, B", [(151936, torch.bfloat16, 2048), (32000, torch.float32, 8192)])
def test_cuda_and_triton_draw_the_same_tokens(V, dtype, B):
    """Integer sampling with the same ex2.approx in both kernels: exactly the same tokens."""
    mismatched, total = _mismatches(V, dtype, 1_000_000, B)
    print(f"\ncuda vs triton, V={V} {dtype}: {mismatched} of {total} tokens differ (rate {mismatched / total:.2e})")
    assert total >= 1_000_000
    assert mismatched == 0


@needs_triton
def test_cuda_and_triton_draw_the_same_filtered_tokens():
    mismatched, total = _mismatches(4096, torch.bfloat16, 100_000, 4096, top_k=50, top_p=0.9)
    print(f"\ncuda vs triton, top-k 50 / top-p 0.9: {mismatched} of {total} tokens differ")
    assert mismatched == 0


@pytest.mark.parametrize("backend", ["cuda"] + (["triton"] if TRITON_OK else []))
def test_gpu_backends_draw_the_reference_tokens(backend):
    """Against the reference only the rounding of exp2 differs (correctly rounded there, ex2.approx on the
    GPU): expected ~1e-4 of the draws at V = 151936."""
    mismatched, total = _mismatches(151936, torch.bfloat16, 262_144, 1024, first=backend, other="torch", chunk_rows=256)
    print(f"\n{backend} vs reference, V=151936 bf16: {mismatched} of {total} tokens differ "
          f"(rate {mismatched / total:.2e})")
    assert mismatched / total < 1e-3


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_and_triton_agree_on_statistics(dtype):
    B, V = 64, 151936
    logits = random_logits(B, V, dtype, seed=11)
    kw = dict(temperature=torch.linspace(0, 2, B, device=DEV), seed=5, offset=torch.arange(B, device=DEV))
    assert_matches(espo.sample(logits, backend="cuda", **kw), espo.sample(logits, backend="triton", **kw), rtol=1e-5,
                   atol=1e-5)


# ---------------------------------------------------------------- the ESPO stop state


def _drive_stopper(backend, steps=12, slots=12, B=8, V=3000):
    cfg = espo.ESPOConfig(beta=0.6, beta_min=0.1, min_tokens=2, alpha_s=0.7)
    stopper = espo.EarlyStopper(cfg, slots, DEV)
    stopper.scalars[:] = torch.tensor([0.4, 0.5, 0.6, 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(slots, generator=g)[:B].to(DEV)
    history = []
    for step in range(steps):
        logits = (torch.randn(B, V, generator=g) * 2.5).to(DEV)
        if step == 3:
            logits[1, 7] = torch.nan  # an invalid row is ignored by the stop rule
        values = torch.rand(B, generator=g).to(DEV)
        out = espo.sample(logits, temperature=1.3, seed=step, offset=torch.arange(B, device=DEV) + step,
                          stopper=stopper, values=values, stopper_rows=rows, backend=backend)
        history.append((out, {k: v.clone() for k, v in stopper.rows.items()}))
    return history


@pytest.mark.parametrize("other", ["torch"] + (["triton"] if TRITON_OK else []))
def test_cuda_stop_state_equals_other_backends(other):
    ours, theirs = _drive_stopper("cuda"), _drive_stopper(other)

    def same_tokens(a, b, step):
        assert torch.equal(a.tokens, b.tokens), f"step {step}"

    assert_same_stop_history(ours, theirs, same_tokens)


# ---------------------------------------------------------------- torch.compile and CUDA graphs


def test_cuda_op_under_torch_compile_fullgraph():
    from espo.ops.cuda import load_extension

    load_extension()
    B, V = 16, 32000

    def step(logits, offset, z, sum_g, sum_g2, count, position, stopped, scalars):
        res = torch.ops.espo.sample_stop(logits, None, 0.8, None, 0, None, 1.0, None, 1, offset, 0, z, sum_g, sum_g2,
                                         count, position, stopped, scalars, None, None, 0.9, 3.0, 1e-6, 0.2, 0)
        return res[0], res[5], res[7]

    eager_stopper, compiled_stopper = (espo.EarlyStopper(batch_size=B, device=DEV) for _ in range(2))
    for s in (eager_stopper, compiled_stopper):
        s.scalars[:] = torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0])
    compiled = torch.compile(step, fullgraph=True)
    for t in range(4):
        logits = random_logits(B, V, torch.bfloat16, seed=t)
        offset = torch.full((B,), t, device=DEV)
        state = lambda s: [s.rows[k] for k in ("z", "sum_g", "sum_g2", "count", "position", "stopped")] + [s.scalars]  # noqa: E731
        want = step(logits, offset, *state(eager_stopper))
        got = compiled(logits, offset, *state(compiled_stopper))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        for k in eager_stopper.rows:
            assert torch.equal(compiled_stopper.rows[k], eager_stopper.rows[k]), k


def test_cuda_sample_under_torch_compile():
    B, V = 8, 5000
    stopper = espo.EarlyStopper(batch_size=B, device=DEV)

    def step(logits, offset):
        return espo.sample(logits, temperature=0.7, seed=3, offset=offset, stopper=stopper, backend="cuda",
                           validate=False)

    logits = random_logits(B, V, seed=1)
    offset = torch.arange(B, device=DEV)
    got = torch.compile(step)(logits, offset)
    want = espo.sample(logits, temperature=0.7, seed=3, offset=offset, backend="cuda")
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.regret, want.regret)
    assert stopper.position.tolist() == [1] * B


def test_cuda_sample_in_a_cuda_graph():
    B, V = 4, 151936
    logits = random_logits(B, V, torch.bfloat16, seed=2)
    offset = torch.zeros(B, dtype=torch.int64, device=DEV)
    seed = torch.arange(B, device=DEV)
    stopper = espo.EarlyStopper(batch_size=B, device=DEV)
    stopper.scalars[:] = torch.tensor([0.5, 1.0, 2.0, 1.0, 1.0])
    eager_stopper = espo.EarlyStopper(batch_size=B, device=DEV)
    eager_stopper.load_state_dict(stopper.state_dict())
    kw = dict(temperature=0.8, seed=seed, offset=offset, backend="cuda", validate=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        espo.sample(logits, **kw)  # warm-up off the graph (loads the extension)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = espo.sample(logits, stopper=stopper, **kw)
    for t in range(5):
        offset.fill_(t)
        logits.copy_(random_logits(B, V, torch.bfloat16, seed=100 + t))
        graph.replay()
        want = espo.sample(logits, stopper=eager_stopper, **kw)
        assert_identical(out, want)
        assert torch.equal(out.stop, want.stop)
        for k in stopper.rows:
            assert torch.equal(stopper.rows[k], eager_stopper.rows[k]), k
    # every replay advanced the live rows; a stopped row changes no more (its position stays where it stopped)
    assert ((stopper.position == 5) | stopper.stopped).all() and (stopper.position <= 5).all()


# ---------------------------------------------------------------- invalid rows and bad input


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [37, 151936])
def test_cuda_invalid_rows_are_flagged_not_sampled(dtype, V):
    logits = random_logits(6, V, dtype, seed=7)
    valid = poison_rows(logits)
    for kw in (dict(), dict(temperature=0.0), dict(temperature=0.5), dict(top_k=3, top_p=0.5)):
        out = espo.sample(logits, backend="cuda", **kw)
        assert out.valid.tolist() == valid
        assert out.tokens[[0, 1, 2, 4]].tolist() == [-1, -1, -1, -1]
        assert out.tokens[3].item() == V - 1
        for field in FLOAT_FIELDS:
            assert torch.isnan(getattr(out, field)[[0, 1, 2, 4]]).all()
            assert torch.isfinite(getattr(out, field)[[3, 5]]).all()


def _z(*shape, **kw):
    return torch.zeros(*shape, device=DEV, **kw)


def _stopper(n, device=DEV):
    return espo.EarlyStopper(batch_size=n, device=device)


# Bad arguments, each built when its test runs (no GPU tensor at collection time); logits default to [2, 5].
BAD = [
    lambda: dict(logits=_z(3)),
    lambda: dict(logits=_z(2, 3, 4)),
    lambda: dict(logits=_z(2, 3, dtype=torch.int64)),
    lambda: dict(logits=_z(2, 0)),
    lambda: dict(temperature=-0.5),
    lambda: dict(temperature=torch.tensor([1.0, -1.0], device=DEV)),
    lambda: dict(temperature=torch.ones(3, device=DEV)),
    lambda: dict(temperature=float("nan")),
    lambda: dict(top_p=0.0),
    lambda: dict(top_p=1.5),
    lambda: dict(top_k=-1),
    lambda: dict(top_k=2.5),
    lambda: dict(top_k=torch.tensor([1.0, 2.0], device=DEV)),
    lambda: dict(seed=torch.zeros(5, dtype=torch.int64, device=DEV)),
    lambda: dict(seed=2**64),
    lambda: dict(offset=-1),
    lambda: dict(offset=torch.tensor([0, -3], device=DEV)),
    lambda: dict(values=_z(2)),
    lambda: dict(stopper=_stopper(3)),
    lambda: dict(stopper=_stopper(2, "cpu")),
    lambda: dict(stopper=_stopper(4), stopper_rows=torch.tensor([1, 1], device=DEV)),
    lambda: dict(stopper=_stopper(4), stopper_rows=torch.tensor([0, 4], device=DEV)),
    lambda: dict(stopper=_stopper(2), values=_z(2, dtype=torch.int64)),
]
CPU_LOGITS = len(BAD)
BAD.append(lambda: dict(logits=torch.zeros(2, 5)))  # CPU logits: the compiled backends refuse them


@pytest.mark.parametrize("case", range(len(BAD)))
def test_cuda_bad_input_behaves_as_the_other_backends(case):
    def outcome(backend):
        kwargs = BAD[case]()
        logits = kwargs.pop("logits", _z(2, 5))
        try:
            espo.sample(logits, backend=backend, **kwargs)
        except Exception as err:  # noqa: BLE001 - the exception itself is what is compared
            return type(err), str(err).replace(f"'{backend}'", "'B'")
        return None

    got = outcome("cuda")
    assert got is not None, "bad input must raise"
    others = (["torch"] if case != CPU_LOGITS else []) + (["triton"] if TRITON_OK else [])
    for other in others:
        want = outcome(other)
        assert got == want, f"cuda raised {got}, {other} raised {want}"


def test_cuda_empty_batch():
    out = espo.sample(torch.zeros(0, 7, device=DEV), backend="cuda")
    assert out.tokens.shape == (0,) and out.tokens.dtype == torch.int64 and out.valid.dtype == torch.bool
