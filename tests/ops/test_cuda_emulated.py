"""The CUDA kernels (csrc/sample_kernels.cuh) compiled with g++ and run on the CPU by the emulator in tests/cuda_cpu,
held to ``espo.sample_reference`` on every CI run, GPU or not.

What this proves: the kernel's own source -- its indexing, chunking, vector and scalar load paths, block and warp
reductions, the last-block-finishes-the-row protocol, the exact top-k/top-p search, the integer inverse-CDF draw and
the ESPO stop update -- computes the reference's tokens bit for bit (the emulated ex2 is correctly rounded, as the
reference's exp2 is) and its statistics within the GPU tests' tolerances, whatever the order in which blocks and
threads run. The emulator also fails a launch on a deadlock, a warp primitive a lane leaves by returning, a
misaligned vector load, or a read through __ldg/__ldcg outside the buffers the op was given.
What it cannot prove: data races and memory-model bugs (threads interleave only at barriers and warp primitives,
and blocks run one at a time), divergence quirks of real warps, the rounding of the real ex2.approx (the GPU's
tokens differ from the reference on ~1e-4 of the draws at V = 151936: tests/ops/test_cuda.py), register or shared
memory limits, and speed. Those stay with tests/ops/test_cuda.py on a GPU.
"""
import os
import subprocess
import sys

import pytest
import torch
from cuda_cpu.build import ROOT, SANITIZE_ENV, BuildUnavailable, asan_runtime, compiler, load_sample_library, sanitized
from cuda_cpu.sample_op import sample_on_cpu_emulation, sample_with, vector_loads
from test_sample import FLOAT_FIELDS, assert_matches, poison_rows, random_logits  # noqa: E402  (one "matches")
from test_sample_filters import CONFIGS, EXACT_GOALS, HARD, repeated, rows
from test_stopper import assert_same_stop_history

import espo
from espo.ops.philox import uniform
from espo.ops.reference import sample_reference

pytestmark = pytest.mark.skipif(compiler() is None, reason="g++ is not on PATH: the CPU emulation of the CUDA kernels "
                                                           "needs a C++17 compiler (or set ESPO_CUDA_CPU_CXX)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FIELDS = ("tokens",) + FLOAT_FIELDS + ("valid",)


@pytest.fixture(scope="module", autouse=True)
def library():
    """Build once per run (cached by content); a compile error fails every test here, it never skips."""
    try:
        return load_sample_library()
    except BuildUnavailable as err:
        pytest.skip(str(err))


def emulated(logits, **kw):
    return sample_on_cpu_emulation(logits, **kw)


def reference(logits, **kw):
    return sample_with(sample_reference, logits, **kw)


def assert_reference(logits, **kw):
    """The emulated kernel against the reference: the same tokens and validity, statistics within the GPU tests'
    tolerance (the reference sums in another order); returns the emulated output."""
    out = emulated(logits, **kw)
    assert_matches(out, reference(logits, **kw), rtol=5e-5, atol=5e-5)
    return out


def assert_identical(a, b):
    for field in FIELDS:
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{field}: {m}")


# ---------------------------------------------------------------- against the reference

SHAPES = [(1, 1), (3, 7), (5, 100), (3, 1000), (1, 4097), (5, 4097), (3, 32003)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, V", SHAPES)
def test_emulated_kernel_matches_reference(dtype, B, V):
    logits = random_logits(B, V, dtype, seed=B * V)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.25][:B]) if B > 1 else 0.9
    assert_reference(logits, temperature=temperature, seed=torch.arange(B) * 977 - 5, offset=11)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_kernel_matches_reference_at_a_real_vocabulary(dtype):
    B, V = 2, 151936
    logits = random_logits(B, V, dtype, seed=V)
    assert_reference(logits, temperature=torch.tensor([0.9, 0.0]), seed=5, offset=torch.tensor([3, 4]))
    if dtype == torch.bfloat16:  # one filtered pass at this size: per-row top-k and top-p
        assert_reference(logits, temperature=0.8, top_k=torch.tensor([50, 0]), top_p=torch.tensor([0.95, 0.9]),
                         seed=7, offset=1)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.1, 50.0])
@pytest.mark.parametrize("V", [17, 5000])
def test_emulated_scalar_temperatures_match_reference(temperature, V):
    B = 6
    logits = random_logits(B, V, torch.bfloat16, seed=V)
    assert_reference(logits, temperature=temperature, seed=3, offset=torch.arange(B))


FILTERS = [(5, 1.0), (0, 0.8), (20, 0.5), (299, 0.999), (1, 0.3), (0, 1.0), (0, 0.9), (10**6, 1.0), (10**6, 0.5)]


@pytest.mark.parametrize("V, dtype", [(300, torch.float32), (4099, torch.float16), (32003, torch.bfloat16)])
@pytest.mark.parametrize("top_k, top_p", FILTERS)
def test_emulated_filtered_sampling_matches_reference(V, dtype, top_k, top_p):
    B = 3
    logits = random_logits(B, V, dtype, seed=top_k % 1000 + V)
    assert_reference(logits, temperature=0.8, top_k=top_k, top_p=top_p, seed=torch.arange(B), offset=2)


def test_emulated_per_row_settings_match_reference():
    B, V = 6, 257
    logits = random_logits(B, V, torch.bfloat16, seed=3)
    assert_reference(
        logits,
        temperature=torch.tensor([1.0, 0.5, 0.0, 2.0, 0.9, 0.7]),
        top_k=torch.tensor([0, 10, 5, 1000, 3, 256]),
        top_p=torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0, 0.95]),
        seed=torch.tensor([123, -1, 2**62, 0, 7, 2**31]),
        offset=torch.arange(B) * 1000003,
    )


@pytest.mark.parametrize("kind, dtype", HARD, ids=[f"{k}-{str(d)[6:]}" for k, d in HARD])
def test_emulated_thresholds_match_reference_on_hard_rows(kind, dtype):
    """tests/ops/test_sample_filters.py's rows (ties at the thresholds, flat, peaked, extreme magnitudes, -inf)."""
    V, copies = 300, 2
    row = rows(kind, V)
    if dtype == torch.float16:
        row = row.clamp(-6e4, 6e4)
    logits = repeated(row.to(dtype), copies * len(CONFIGS), "cpu")
    k = torch.tensor([V - 1 if k < 0 else k for k, _ in CONFIGS]).repeat_interleave(copies)
    p = torch.tensor([p for _, p in CONFIGS]).repeat_interleave(copies)
    B = logits.shape[0]
    assert_reference(logits, temperature=0.9, top_k=k, top_p=p, seed=torch.arange(B) * 7919 + 1, offset=3)
    assert_reference(logits[:2], temperature=torch.tensor([0.0, 1.0]), seed=1, offset=3)  # greedy: the first max


@pytest.mark.parametrize("make_row, top_p, kept", EXACT_GOALS, ids=["first", "second", "among-candidates"])
def test_emulated_top_p_goal_reached_exactly_keeps_the_smallest_set(make_row, top_p, kept):
    assert_reference(repeated(make_row(), 64, "cpu"), temperature=1.0, top_p=top_p, seed=torch.arange(64) * 7919 + 1,
                     offset=3)


def test_emulated_threshold_inside_more_ties_than_a_gather_holds():
    """2000 tied tops (the gather holds 1024): the search ends on a single key, not a sort (csrc/filter.cuh)."""
    V = 5000
    x = torch.randn(V, generator=torch.Generator().manual_seed(2)) - 6.0
    x[:2000] = 1.0
    logits = repeated(x, 4, "cpu")
    assert_reference(logits, top_k=torch.tensor([1500, 2500, 0, 0]), top_p=torch.tensor([0.5, 0.9999, 0.3, 0.999]),
                     seed=torch.arange(4) * 7919 + 1, offset=3)


def test_emulated_searches_that_need_round_two_and_passes_of_their_own():
    """Thresholds that round 1 leaves among thousands of tokens: round 2 (over the chunks) decides the first search,
    the row's own passes the second (top-p after a wide top-k) and any third."""
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(6, 20000, generator=g) * 3.0).to(torch.bfloat16)
    assert_reference(logits, temperature=0.8, top_k=torch.tensor([2000, 2000, 0, 0, 5000, 19000]),
                     top_p=torch.tensor([1.0, 0.9, 0.95, 0.5, 0.999, 0.7]), seed=torch.arange(6), offset=9)


@pytest.mark.parametrize("kind", ["ties", "peaked", "two_level", "flat"])
def test_emulated_hard_rows_across_many_chunks(kind):
    V = 4097  # 33 chunks of 128: ties and the peak fall in different chunks
    logits = repeated(rows(kind, V, seed=1), 4, "cpu")
    kw = dict(top_k=torch.tensor([0, 7, 0, 1]), top_p=torch.tensor([1.0, 0.7, 0.9, 1.0]), seed=torch.arange(4))
    assert_reference(logits, temperature=0.9, offset=5, **kw)
    assert_reference(logits, temperature=0.0, offset=5, **kw)


def test_emulated_greedy_takes_the_first_max_across_chunks():
    V = 4097
    logits = torch.full((3, V), -5.0)
    logits[0, [3000, 7, 4000]] = 9.0  # ties in three chunks: the first index wins
    logits[1, [128, 127]] = 2.0       # ties on both sides of a chunk boundary
    logits[2, -1] = 1.0               # the last token, alone in its chunk
    out = assert_reference(logits.bfloat16(), temperature=0.0)
    assert out.tokens.tolist() == [7, 127, V - 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [37, 4097])
def test_emulated_invalid_rows_are_flagged_not_sampled(dtype, V):
    logits = random_logits(7, V, dtype, seed=7)
    valid = poison_rows(logits)
    logits[5, ::3] = -torch.inf  # -inf entries in a valid row
    for kw in (dict(), dict(temperature=0.0), dict(temperature=0.5), dict(top_k=3, top_p=0.5)):
        out = assert_reference(logits, seed=2, offset=torch.arange(7), **kw)
        assert out.valid.tolist() == valid
        assert out.tokens[3].item() == V - 1


def test_emulated_tempered_overflow_is_invalid():
    """|x| * log2(e) / T beyond float32: the tempered row leaves the range (espo.ops.reference)."""
    logits = random_logits(3, 600, seed=1)
    logits[0, 9] = 3.0e38
    logits[1] = -3.4e38
    logits[1, 17] = 1.0e38
    out = assert_reference(logits, temperature=torch.tensor([0.5, 0.5, 2e-38]), seed=4)
    assert out.valid.tolist() == [False, True, False]


# (seed, offset) pairs whose uniform is exactly 0 (found by search): the target is 0, the one draw where "the first
# cumulative mass > target" and ">= target" differ in practice (a 2**-24 chance a draw, so it happens in a long run).
ZERO_UNIFORM = [(0, 14883995), (1, 16902731), (7, 32245323)]


def test_emulated_zero_uniform_draws_the_first_token_with_mass():
    seed, offset = (torch.tensor(v).repeat(2) for v in zip(*ZERO_UNIFORM))
    assert (uniform(seed, offset) == 0).all()
    V = 4097  # chunks of 128
    logits = random_logits(6, V, seed=3)
    logits[0, :1000] = -torch.inf  # whole leading chunks without mass
    logits[1, :5] = -torch.inf     # leading tokens of the first chunk without mass
    logits[2, :128] = -torch.inf   # exactly the first chunk
    logits[3, 0] = -torch.inf
    logits[4, :300] = -40.0        # mass that rounds to 0 in the integer masses
    kw = dict(seed=seed, offset=offset, temperature=0.7)
    for filters in (dict(), dict(top_k=50), dict(top_p=0.9), dict(top_k=7, top_p=0.5)):
        out = assert_reference(logits, **filters, **kw)
        assert torch.isfinite(logits.gather(1, out.tokens[:, None])).all()
        assert out.tokens[0] >= 1000 and out.tokens[1] >= 5 and out.tokens[2] >= 128 and out.tokens[4] >= 300


# ---------------------------------------------------------------- what the kernels must not depend on


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [17, 1001, 7001])
def test_emulated_results_do_not_depend_on_memory_layout(dtype, V):
    """A row stride > V and rows that start off a 16-byte boundary (scalar loads) give exactly what contiguous,
    aligned rows (vector loads from V = 7001 on) give; a misaligned vector load would fail the emulated launch."""
    B = 4
    wide = random_logits(B, V + 3, dtype, seed=V)
    views = [wide[:, 1 : V + 1], wide[:, 3:], wide[:, :V], wide[:, 1 : V + 1].contiguous(), wide[:, 3:].contiguous(),
             wide[:, :V].contiguous()]
    kw = dict(temperature=torch.tensor([0.0, 0.8, 1.0, 1.7]), top_p=torch.tensor([1.0, 1.0, 0.9, 1.0]), seed=9,
              offset=torch.arange(B))
    outs, vectors = [], []
    for view in views:
        before = vector_loads()
        outs.append(assert_reference(view, **kw))
        vectors.append(vector_loads() - before)
    for strided, contiguous in zip(outs[:3], outs[3:]):
        assert_identical(strided, contiguous)
    assert vectors[:2] == [0, 0], "rows off a 16-byte boundary must take the scalar path"
    assert (min(vectors[3:]) > 0) == (V > 4096), f"vector loads per layout: {vectors}"


@pytest.mark.parametrize("schedule", [1, 2, 3])
def test_emulated_results_do_not_depend_on_the_order_blocks_and_threads_run(schedule):
    """Which block finishes a row (the per-row arrival counter) and the order of threads between barriers vary on a
    GPU; the outputs must not."""
    B, V = 3, 4097
    logits = random_logits(B, V, torch.float32, seed=12)
    kw = dict(temperature=torch.tensor([0.0, 0.8, 1.3]), top_p=torch.tensor([1.0, 1.0, 0.9]), seed=5, offset=2)
    assert_identical(emulated(logits, schedule=schedule, **kw), emulated(logits, **kw))


def test_emulated_row_samples_the_same_alone_or_in_a_batch():
    B, V = 5, 4097
    logits = random_logits(B, V, torch.bfloat16, seed=6)
    seed, offset = torch.arange(B) * 31 + 1, torch.arange(B) + 100
    kw = dict(temperature=0.9, top_p=torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0]))
    batch = emulated(logits, seed=seed, offset=offset, **kw)
    for i in (0, 3, B - 1):
        alone = emulated(logits[i : i + 1], seed=int(seed[i]), offset=int(offset[i]), temperature=0.9,
                         top_p=float(kw["top_p"][i]))
        for field in FIELDS:
            torch.testing.assert_close(getattr(alone, field)[0], getattr(batch, field)[i], rtol=0, atol=0)


# ---------------------------------------------------------------- the ESPO stop state


def _drive_stopper(sample, with_rows, with_values, filtered=False, steps=8, slots=7, B=5, V=300):
    cfg = espo.ESPOConfig(beta=0.6, beta_min=0.1, min_tokens=2, alpha_s=0.7)
    stopper = espo.EarlyStopper(cfg, slots if with_rows else B)
    stopper.scalars[:] = torch.tensor([0.4, 0.5, 0.6, 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(slots, generator=g)[:B] if with_rows else None
    history = []
    for step in range(steps):
        logits = torch.randn(B, V, generator=g) * 2.5
        if step == 3:
            logits[1, 7] = torch.nan  # an invalid row is ignored by the stop rule
        values = torch.rand(B, generator=g) if with_values else None
        # filtered: rows 1 and 3 finish after the top-k/top-p search (later launches), the others in the first
        filters = dict(top_k=torch.tensor([0, 40, 0, 0, 0]), top_p=torch.tensor([1.0, 1.0, 1.0, 0.8, 1.0])) \
            if filtered else {}
        out = sample(logits, temperature=1.3, seed=step, offset=torch.arange(B) + step, stopper=stopper,
                     values=values, stopper_rows=rows, **filters)
        history.append((out, {k: v.clone() for k, v in stopper.rows.items()}))
    return history


@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("with_values", [False, True])
@pytest.mark.parametrize("filtered", [False, True])
def test_emulated_stop_state_equals_reference(with_rows, with_values, filtered):
    ours = _drive_stopper(emulated, with_rows, with_values, filtered)
    theirs = _drive_stopper(reference, with_rows, with_values, filtered)
    assert_same_stop_history(ours, theirs, lambda a, b, step: assert_matches(a, b, rtol=5e-5, atol=5e-5))


# ---------------------------------------------------------------- the sanitized build

# A cross-section of the tests above: both load paths, small and large chunks, filters, invalid rows, the stop state.
SANITIZED_SUBSET = ("zero_uniform or invalid_rows or (layout and 7001) or stop_state or hard_rows_across "
                    "or (filtered_sampling and 4099 and 20) or round_two or gather_holds")


@pytest.mark.skipif(sanitized(), reason="this process already runs the sanitized build")
@pytest.mark.skipif(asan_runtime() is None, reason="the compiler has no AddressSanitizer runtime")
def test_emulated_kernel_is_clean_under_address_and_undefined_behaviour_sanitizers():
    """The kernels built with -fsanitize=address,undefined (every pointer checked, not only the __ldg reads the
    emulator checks itself): a read or write outside a buffer, or undefined behaviour, fails this test with the
    sanitizer's report. It runs in a child process, which needs the ASan runtime loaded first."""
    env = dict(os.environ, LD_PRELOAD=asan_runtime(), ASAN_OPTIONS="detect_leaks=0", **{SANITIZE_ENV: "1"},
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__, "-k", SANITIZED_SUBSET]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    assert " passed" in res.stdout and "deselected" in res.stdout
