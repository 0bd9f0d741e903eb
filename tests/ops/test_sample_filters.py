"""Exact top-k/top-p of the Triton and CUDA kernels (the multi-pivot search of kernels/filter.py and
csrc/filter.cuh) against the reference, token for token, on the rows that stress a threshold search: ties at the
threshold (more than a gather's worth), flat rows, peaked rows, extreme logits, per-row k and p, every dtype, and
V = 151936. Each logits row is repeated under many seeds, so that a threshold off by one token moves some draw."""
import pytest
import torch
from conftest import backend_device_pairs
from espo.kernels import sample as triton_sample

import espo

PAIRS = [p for p in backend_device_pairs() if p.values[0] in ("triton", "cuda")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def repeated(row: torch.Tensor, copies: int, device) -> torch.Tensor:
    return row[None].expand(copies, -1).contiguous().to(device)


def assert_same_tokens(logits, backend="triton", **kw):
    device = logits.device
    B = logits.shape[0]
    kw = dict(seed=torch.arange(B, device=device) * 7919 + 1, offset=3, **kw)
    got = espo.sample(logits, backend=backend, **kw)
    want = espo.sample(logits.cpu(), backend="torch", **{k: v.cpu() if torch.is_tensor(v) else v
                                                         for k, v in kw.items()})
    allowed = 0 if device.type == "cpu" else B // 1000  # ex2.approx on a GPU (see tests/ops/test_sample.py)
    differ = (got.tokens.cpu() != want.tokens).sum().item()
    assert differ <= allowed, f"{differ} of {B} tokens differ: {got.tokens.tolist()[:9]} vs {want.tokens.tolist()[:9]}"
    assert got.valid.all()


def rows(kind: str, V: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(V, generator=g) * 3
    if kind == "ties":  # few distinct values: every threshold falls inside a run of equal logits
        return torch.round(torch.randn(V, generator=g) * 2)
    if kind == "flat":
        return torch.full((V,), 0.5)
    if kind == "peaked":  # one token holds almost all the mass, the rest is a flat tail
        x = torch.randn(V, generator=g) * 0.01
        x[V // 3] = 30.0
        return x
    if kind == "two_level":  # a plateau of 200 equal tops above a tail
        x = torch.randn(V, generator=g) - 8.0
        x[torch.randperm(V, generator=g)[:200]] = 4.0
        return x
    if kind == "extreme":  # huge magnitudes, -inf tokens, denormals, both zeros
        x = torch.randn(V, generator=g) * 1e37
        x[::7] = float("-inf")
        x[1::11] = 1e-40
        x[2::13] = -0.0
        x[3::17] = 0.0
        x[5] = 2.0e38  # 2e38 * log2(e) / 0.9 stays below float32's max: a valid row
        return x
    raise ValueError(kind)


def base2_logit(k: int) -> torch.Tensor:
    """The float32 x whose tempered base-2 logit at temperature 1 is exactly k: fl(x * a) == k, with
    espo.ops.reference's a."""
    a = torch.tensor(1.0) * torch.tensor(1.44269502162933349609375)
    x = (torch.tensor(float(k), dtype=torch.float64) / a.double()).float()
    while (x * a).item() != k:
        x = torch.nextafter(x, torch.tensor(float("inf") if (x * a).item() < k else float("-inf")))
    return x


def exact_goal_row(V: int = 64) -> torch.Tensor:
    """Four tokens whose tempered base-2 logits are exactly 0, -1, -2, -2 at temperature 1 (integer masses 2**40,
    2**39, 2**38, 2**38, summing to 2**41), the rest -inf: top-p 0.5 and 0.75 reach their goals exactly, at the
    first and at the second token, where a search that overshoots keeps the next tokens too."""
    row = torch.full((V,), float("-inf"))
    row[5], row[20], row[33], row[40] = base2_logit(0), base2_logit(-1), base2_logit(-2), base2_logit(-2)
    return row


def exact_goal_among_candidates_row(V: int = 520) -> torch.Tensor:
    """Base-2 logits 0, -8 and 514 x -9, the rest -inf: masses 2**S, 2**(S-8) and 514 x 2**(S-9), so that top-p 0.5
    reaches its goal exactly at token 1, and tokens 1..515 lie between the same two pivots of the first pivot pass
    (8 and 9 units below the max: csrc/filter.cuh's round 1). A search whose last interval holds all of them reads
    the threshold off 515 sorted candidates, and must stop at the one that reaches the goal, not the next."""
    row = torch.full((V,), float("-inf"))
    row[0], row[1], row[2:516] = base2_logit(0), base2_logit(-8), base2_logit(-9)
    return row


# rows whose top-p goal is reached exactly: the row, top_p, and the tokens it keeps (the smallest such set)
EXACT_GOALS = [(exact_goal_row, 0.5, {5}), (exact_goal_row, 0.75, {5, 20}),
               (exact_goal_among_candidates_row, 0.5, {0, 1})]


CONFIGS = [(1, 1.0), (37, 1.0), (-1, 1.0), (0, 0.9), (0, 0.05), (60, 0.95), (250, 0.999)]  # -1: V - 1
HARD = [(kind, torch.float32) for kind in ("random", "ties", "flat", "peaked", "two_level", "extreme")]
HARD += [(kind, dtype) for kind in ("ties", "peaked", "extreme") for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("kind, dtype", HARD, ids=[f"{k}-{str(d)[6:]}" for k, d in HARD])
def test_thresholds_match_reference_on_hard_rows(backend, device, kind, dtype):
    V, copies = 300, 2
    row = rows(kind, V)
    if dtype == torch.float16:
        row = row.clamp(-6e4, 6e4)
    logits = repeated(row.to(dtype), copies * len(CONFIGS), device)
    k = torch.tensor([V - 1 if k < 0 else k for k, _ in CONFIGS], device=device).repeat_interleave(copies)
    p = torch.tensor([p for _, p in CONFIGS], device=device).repeat_interleave(copies)
    assert_same_tokens(logits, backend, temperature=0.9, top_k=k, top_p=p)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("make_row, top_p, kept", EXACT_GOALS, ids=["first", "second", "among-candidates"])
def test_top_p_goal_reached_exactly_keeps_the_smallest_set(backend, device, make_row, top_p, kept):
    logits = repeated(make_row(), 64, device)
    assert_same_tokens(logits, backend, temperature=1.0, top_p=top_p)
    kw = dict(temperature=1.0, top_p=top_p, seed=torch.arange(64) * 7919 + 1, offset=3)
    drawn = set(espo.sample(logits.cpu(), backend="torch", **kw).tokens.tolist())
    assert drawn <= kept and max(kept, key=lambda t: logits[0, t].item()) in drawn  # the reference's own set


@pytest.mark.parametrize("backend, device", PAIRS)
def test_per_row_k_p_and_temperature_match_reference(backend, device):
    B, V = 12, 3001
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(B, V, generator=g) * torch.linspace(0.1, 6.0, B)[:, None]).to(torch.bfloat16).to(device)
    assert_same_tokens(
        logits, backend,
        temperature=torch.tensor([1.0, 0.5, 0.0, 2.0, 0.9, 0.3, 1.0, 1.7, 0.8, 1.0, 0.05, 4.0], device=device),
        top_k=torch.tensor([0, 10, 5, 3000, 3, 1, 0, 2999, 700, 64, 0, 1500], device=device),
        top_p=torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0, 0.95, 0.999, 0.6, 1.0, 0.95, 0.2, 0.9], device=device),
    )


@pytest.mark.parametrize("backend, device", PAIRS)
def test_more_tied_tokens_than_a_gather_holds(backend, device):
    """A threshold inside a run of 2000 equal logits: the search ends on a single key, not a gather."""
    V = 5000
    x = torch.randn(V, generator=torch.Generator().manual_seed(2)) - 6.0
    x[:2000] = 1.0  # 2000 tied tops, more than the interpreter's or the GPU's candidates
    for cand in (64, 1024):
        triton_sample.CANDIDATES["interpreter"] = cand
        try:
            assert_same_tokens(repeated(x, 2, device), backend, top_k=1500, top_p=0.5)
            assert_same_tokens(repeated(x, 2, device), backend, top_k=2500, top_p=0.9999)
        finally:
            triton_sample.CANDIDATES["interpreter"] = 64


@pytest.mark.parametrize("backend, device", PAIRS)
def test_the_gpu_gather_size_gives_the_same_tokens(backend, device):
    """CANDIDATES only decides when the pivot passes stop; the GPU's 1024 must give the interpreter's tokens."""
    triton_sample.CANDIDATES["interpreter"] = 1024
    try:
        logits = repeated(rows("random", 4000, seed=9), 1, device)
        assert_same_tokens(logits, backend, top_k=900, top_p=0.9)
        assert_same_tokens(logits, backend, top_p=0.95)
    finally:
        triton_sample.CANDIDATES["interpreter"] = 64


@pytest.mark.parametrize("backend, device", PAIRS)
def test_searches_that_need_the_second_round_and_passes_of_their_own(backend, device):
    """Wide rows whose thresholds round 1 leaves among thousands of tokens: round 2 (split across the chunks) and
    the row program's own passes decide them (a round-2 kernel that wrote wrong stats failed this test)."""
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(4, 20000, generator=g) * 3.0).to(torch.bfloat16).to(device)
    assert_same_tokens(logits, backend, temperature=0.8, top_k=torch.tensor([2000, 2000, 0, 0], device=device),
                       top_p=torch.tensor([1.0, 0.9, 0.95, 0.5], device=device))


@pytest.mark.parametrize("backend, device", PAIRS)
def test_qwen_vocabulary_matches_reference(backend, device):
    """V = 151936 (Qwen2.5's vocabulary), bf16, top-k 50 then top-p 0.95 and top-p alone."""
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(2, 151936, generator=g) * torch.tensor([[2.0], [5.0]])).to(torch.bfloat16).to(device)
    top_k, top_p = torch.tensor([50, 0], device=device), torch.tensor([0.95, 0.95], device=device)
    assert_same_tokens(logits, backend, top_k=top_k, top_p=top_p)
