"""The fused ops' Triton kernels (espo.kernels.rms_norm, .rope, .silu_mul, .gate_up_silu, .rope_decode_attention)
against their references.

The references (espo.engine.fused_ops.*_reference) are the eager computation the unfused forward runs. On the
CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU); on a
GPU the same bounds hold the compiled kernels (not yet run on one).

Exactness found, and held here:
* rope: bit for bit in float32, bf16 and fp16 (each product of two values of the dtype is exact in float32, so
  rounding it once to the dtype is what the eager op does; the kernel is launched without FMA contraction).
* rms_norm and add_rms_norm (whose sum x + residual is torch's bit for bit): the mean of squares is summed in
  another order than torch's, and 1/sqrt is torch's rsqrt only to an ulp, so float32 results differ by up to
  4 ulps (a fifth of them by one or more); in bf16/fp16 the float32 difference reaches the result only where it
  crosses a rounding boundary (none seen in bf16, ~1e-4 of the values in fp16), by one ulp of the normalised
  value, which the weight's product can make two.
* gate_up_silu: the two GEMMs sum in float32 in another order than torch's: float32 results differ in the last
  bits (held to a tolerance); a bf16/fp16 result only where a sum rounds to another value, by an ulp or two of it
  (under 1% of the values here); the rest is silu_mul's arithmetic.
* rope_decode_attention: the cache writes bit for bit (rope's rounding); the attention output against SDPA's over the
  cache, to a few ulps in float32 and an ulp or so in bf16/fp16 (its float32 sums in another order).
* silu_mul: exp is numpy's under the interpreter (the CUDA math library's expf on a GPU, as torch's there), not
  torch's CPU exp: float32 differs by up to 4 ulps; bf16/fp16 by up to 2 ulps (one in silu, doubled by the
  product), and rarely.
"""
import pytest
import torch

from espo.engine.fused_ops import (
    CacheWrite,
    add_rms_norm,
    add_rms_norm_reference,
    gate_up_silu,
    gate_up_silu_reference,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_decode_attention,
    rope_decode_attention_reference,
    rope_reference,
    runs_kernel,
    silu_mul,
    silu_mul_reference,
)
from espo.engine.kv_cache import KVCache, decode_attention, decode_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the largest difference in ulps of the dtype that each op's docstring above allows
ULPS = {"rms_norm": {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2},
        "silu_mul": {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}}


@pytest.fixture(autouse=True)
def kernels_run_here():
    if not runs_kernel(torch.empty(0, device=DEVICE)):
        pytest.skip("the Triton kernels run on a GPU or under TRITON_INTERPRET=1 only")


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two tensors of one float dtype (NaN = NaN: 0)."""
    bits = a.element_size() * 8
    as_int = {32: torch.int32, 16: torch.int16}[bits]

    def line(t):  # sign-magnitude bits onto a monotone integer line
        i = t.contiguous().view(as_int).long()
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)

    d = (line(a) - line(b)).abs()
    return torch.where(a.isnan() & b.isnan(), 0, d)


def assert_close_in_ulps(got, want, op):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    d = ulps(got, want)
    limit = ULPS[op][got.dtype]
    assert int(d.max()) <= limit, f"{op} {got.dtype}: {int(d.max())} ulps > {limit}"
    if got.dtype != torch.float32:  # rounding to bf16/fp16 absorbs the float32 differences almost always
        assert (d > 0).float().mean() < 0.01


def rand(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------------------------ rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (5, 37), (64, 24), (3, 5, 24), (2, 4864), (3, 1)])
def test_rms_norm_matches_the_reference(dtype, shape):
    g = torch.Generator().manual_seed(1)
    row_scales = torch.logspace(-3, 3, shape[0])[(...,) + (None,) * (len(shape) - 1)]
    x = (torch.randn(shape, generator=g) * row_scales).to(dtype).to(DEVICE)
    w = rand(shape[-1], dtype, seed=2)
    assert_close_in_ulps(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_extreme_rows(dtype):
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).tiny
    rows = torch.tensor([
        [0.0] * 7,                                 # var 0: x * rsqrt(eps)
        [big, -big, big, 1.0, 0.0, -1.0, 2.0],     # x**2 overflows float32 only for float32 input: inf, then 0
        [tiny, -tiny, tiny / 4, 0.0, tiny, 0.0, tiny],  # subnormal squares
        [float("inf"), 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    ]).to(dtype).to(DEVICE)
    w = rand(7, dtype, seed=3)
    for eps in (1e-6, 1e-5, 0.0):
        assert_close_in_ulps(rms_norm(rows, w, eps), rms_norm_reference(rows, w, eps), "rms_norm")


def test_rms_norm_reads_strided_rows_and_heads_of_a_projection():
    wide = rand((6, 100), torch.bfloat16, seed=4)
    x = wide[:, 10:50]  # rows 100 apart
    w = rand(40, torch.bfloat16, seed=5)
    assert x.stride(0) == 100
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    q = wide.view(6, 5, 20)  # Qwen3's q_norm: over each head of [N, heads, d]
    w = rand(20, torch.bfloat16, seed=6)
    assert torch.equal(rms_norm(q, w, 1e-6), rms_norm_reference(q, w, 1e-6))
    empty = rand((0, 20), torch.bfloat16)
    assert rms_norm(empty, w, 1e-6).shape == (0, 20)


def test_rms_norm_with_a_float32_weight_promotes_as_torch_does():
    x, w = rand((4, 33), torch.bfloat16, seed=7), rand(33, torch.float32, seed=8)
    got, want = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert got.dtype == want.dtype == torch.float32
    assert_close_in_ulps(got, want, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (7, 37), (64, 24)])
def test_add_rms_norm_adds_exactly_and_normalises_the_sum(dtype, shape):
    x, residual, w = rand(shape, dtype, 4.0, seed=1), rand(shape, dtype, 4.0, seed=2), rand(shape[-1], dtype, seed=3)
    residual[0, :3] = torch.tensor([torch.finfo(dtype).max, 1e-3, -2.0], dtype=dtype)  # an overflowing sum too
    (normed, total), (normed_ref, total_ref) = add_rms_norm(x, residual, w, 1e-6), add_rms_norm_reference(
        x, residual, w, 1e-6)
    assert torch.equal(total, total_ref)  # the residual stream itself: bit for bit
    assert_close_in_ulps(normed, normed_ref, "rms_norm")


def test_add_rms_norm_checks_its_arguments():
    x = rand((2, 8), torch.float32)
    with pytest.raises(ValueError, match="residual must have x's shape and dtype"):
        add_rms_norm(x, x.half(), rand(8, torch.float32), 1e-6)
    with pytest.raises(ValueError, match="weight must have shape"):
        add_rms_norm(x, x, rand(9, torch.float32), 1e-6)


def test_rms_norm_rejects_a_weight_of_another_size():
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(rand((2, 8), torch.float32), rand(9, torch.float32), 1e-6)


# ---------------------------------------------------------------------------------------------------- rope


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,Hkv,d", [(1, 14, 2, 64), (7, 5, 3, 24), (3, 4, 4, 6), (2, 9, 3, 128)])
def test_rope_is_bitwise_the_reference(dtype, N, H, Hkv, d):
    q, k = rand((N, H, d), dtype, 3.0, seed=1), rand((N, Hkv, d), dtype, 3.0, seed=2)
    theta = torch.arange(N)[:, None] * torch.logspace(0, -4, d // 2).repeat(2)[None]
    cos, sin = theta.cos().to(dtype).to(DEVICE), theta.sin().to(dtype).to(DEVICE)
    (qa, ka), (qb, kb) = rope(q, k, cos[:, None], sin[:, None]), rope_reference(q, k, cos[:, None], sin[:, None])
    assert torch.equal(qa, qb) and torch.equal(ka, kb)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_of_views_of_one_projection_and_extreme_values(dtype):
    N, H, Hkv, d = 5, 3, 1, 8
    fi = torch.finfo(dtype)
    qkv = rand((N, (H + 2 * Hkv) * d), dtype, seed=3)
    qkv[0, :4] = torch.tensor([fi.max, -fi.max, fi.tiny, float("inf")], dtype=dtype)
    q = qkv[:, : H * d].view(N, H, d)  # token stride (H + 2 Hkv) d: views, not copies
    k = qkv[:, H * d: (H + Hkv) * d].view(N, Hkv, d)
    cs = rand((N, 2 * d), dtype, seed=4)
    cos, sin = cs[:, :d], cs[:, d:]  # rows 2d apart
    (qa, ka), (qb, kb) = rope(q, k, cos, sin), rope_reference(q, k, cos, sin)
    assert torch.equal(qa.isnan(), qb.isnan())
    assert torch.equal(qa.nan_to_num(), qb.nan_to_num()) and torch.equal(ka, kb)


def test_rope_checks_its_arguments():
    q, k, cs = rand((2, 4, 8), torch.float32), rand((2, 2, 8), torch.float32), rand((2, 8), torch.float32)
    with pytest.raises(ValueError, match="even d"):
        rope(q[..., :7], k[..., :7], cs[:, :7], cs[:, :7])
    with pytest.raises(ValueError, match="one row of 8 per token"):
        rope(q, k, cs[:1], cs[:1])
    with pytest.raises(TypeError, match="one dtype"):
        rope(q, k, cs.half(), cs)


def rope_inputs(N, H, Hkv, d, dtype, seed=5):
    """q, k, v as views of one projection [N, (H + 2 Hkv) d] (as the decoder's), and cos, sin [N, d]."""
    qkv = rand((N, (H + 2 * Hkv) * d), dtype, 3.0, seed=seed)
    q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=1)
    theta = torch.arange(N)[:, None] * torch.logspace(0, -4, d // 2).repeat(2)[None]
    return q.view(N, H, d), k.view(N, Hkv, d), v.view(N, Hkv, d), theta.cos().to(dtype).to(DEVICE), \
        theta.sin().to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,n,H,Hkv,d", [(5, 3, 14, 2, 64), (4, 4, 4, 4, 6), (3, 0, 5, 3, 24), (9, 1, 9, 3, 128)])
def test_rope_writes_the_first_tokens_into_the_cache_as_kv_cache_write_does(dtype, N, n, H, Hkv, d):
    """The decode part (the first n of N tokens) lands where KVCache.write puts it; no other cache row changes."""
    q, k, v, cos, sin = rope_inputs(N, H, Hkv, d, dtype)
    slots, positions = torch.randperm(6)[:n].to(DEVICE), torch.randint(0, 7, (n,)).to(DEVICE)
    caches = []
    for fused in (True, False):
        cache = KVCache(2, 6, 7, Hkv, d, dtype=dtype, device=DEVICE, layout="sdpa")
        cache.k.copy_(rand(cache.k.shape, dtype, seed=6))
        cache.v.copy_(rand(cache.v.shape, dtype, seed=7))
        rows = cache.rows(slots, positions)
        if fused:
            qa, ka = rope(q, k, cos, sin, CacheWrite(v, *cache.as_rows(1), rows))
        else:  # the unfused decode step: rotate, then KVCache.write
            qb, kb = rope_reference(q, k, cos, sin)
            cache.write(1, rows, kb[:n], v[:n])
        caches.append(cache)
    assert torch.equal(qa, qb) and torch.equal(ka, kb)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert torch.equal(caches[0].k[1, slots, :, positions], ka[:n])  # and it did write: the token's heads are there


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_cache_write_of_the_reference_is_the_kernels(dtype):
    """rope_reference's write (what runs off the GPU) against the kernel's, rows in a shuffled order."""
    N, n, H, Hkv, d = 6, 4, 6, 2, 16
    q, k, v, cos, sin = rope_inputs(N, H, Hkv, d, dtype, seed=8)
    rows = torch.randperm(40)[: n * Hkv].to(DEVICE)
    caches = [(rand((40, d), dtype, seed=9), rand((40, d), dtype, seed=10)) for _ in range(2)]
    out_a = rope(q, k, cos, sin, CacheWrite(v, *caches[0], rows))
    out_b = rope_reference(q, k, cos, sin, CacheWrite(v, *caches[1], rows))
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert torch.equal(caches[0][1][rows], v[:n].reshape(-1, d))


def test_rope_checks_its_cache_write():
    q, k, v, cos, sin = rope_inputs(3, 4, 2, 8, torch.float32)
    cache, rows = rand((20, 8), torch.float32), torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="write.v must have k's shape"):
        rope(q, k, cos, sin, CacheWrite(v[:2], cache, cache, rows))
    with pytest.raises(ValueError, match=r"write.k_cache must be a contiguous \[rows, 8\]"):
        rope(q, k, cos, sin, CacheWrite(v, cache.half(), cache, rows))
    with pytest.raises(ValueError, match=r"write.v_cache must be .*\(strided\)"):
        rope(q, k, cos, sin, CacheWrite(v, cache, rand((8, 20), torch.float32).t(), rows))
    with pytest.raises(ValueError, match=r"write.rows must be int64 \[n \* 2\] with n <= 3"):
        rope(q, k, cos, sin, CacheWrite(v, cache, cache, torch.arange(3, device=DEVICE)))
    with pytest.raises(ValueError, match="write.rows must be int64"):
        rope(q, k, cos, sin, CacheWrite(v, cache, cache, torch.arange(8, device=DEVICE)))


# ----------------------------------------------------------------------------------- rope_decode_attention


def decode_inputs(B, H, Hkv, d, L, dtype, seed=11):
    """q, k, v of B decode rows as views of one projection, cos, sin [B, 1, d] at each row's position, a 2-layer
    SDPA cache of B + 3 slots (random contents: what the rows attend to) and the positions, the first 0 and the last
    L - 1."""
    q, k, v, _, _ = rope_inputs(B, H, Hkv, d, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    seqlens = torch.randint(0, L, (B,), generator=g)
    seqlens[0], seqlens[-1] = 0, L - 1
    theta = seqlens[:, None] * torch.logspace(0, -4, d // 2).repeat(2)[None]
    cos, sin = theta.cos().to(dtype).to(DEVICE)[:, None], theta.sin().to(dtype).to(DEVICE)[:, None]
    cache = KVCache(2, B + 3, L, Hkv, d, dtype=dtype, device=DEVICE, layout="sdpa")
    cache.k.copy_(rand(cache.k.shape, dtype, 2.0, seed=seed + 1))
    cache.v.copy_(rand(cache.v.shape, dtype, seed=seed + 2))
    return q, k, v, cos, sin, cache, seqlens.to(DEVICE)


# the attention output against SDPA's: summed in another order, so float32 to a few ulps, bf16/fp16 to an ulp or so;
# on a GPU SDPA's flash and memory-efficient kernels also round the softmax weights to the dtype before P.V
DECODE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2 if DEVICE == "cpu" else 3.2e-2,
               torch.float16: 2e-3 if DEVICE == "cpu" else 4e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,d,L,window", [(1, 14, 2, 64, 40, None), (5, 9, 3, 24, 37, None),
                                                  (4, 4, 4, 6, 19, 5), (3, 7, 1, 128, 70, 16), (6, 6, 2, 64, 3, 1)])
def test_rope_decode_attention_is_rope_the_cache_write_and_sdpa(dtype, B, H, Hkv, d, L, window):
    """RoPE, the cache write and the attention of a decode step in one launch: the cache holds the bits that rope and
    KVCache.write store (and no other position changes), the output is SDPA's over the cache with the decode mask
    (GQA groups of 1 to 7 heads, head_dim not a power of two, a sliding window of 1 to 16, positions 0 and L - 1)."""
    q, k, v, cos, sin, cache, seqlens = decode_inputs(B, H, Hkv, d, L, dtype)
    twin = KVCache(2, B + 3, L, Hkv, d, dtype=dtype, device=DEVICE, layout="sdpa")
    twin.k.copy_(cache.k), twin.v.copy_(cache.v)
    scale = d ** -0.5
    out = rope_decode_attention(q, k, v, cos, sin, cache.k[1], cache.v[1], seqlens, window, scale)
    qr, kr = rope_reference(q, k, cos, sin)  # the unfused decode step: rotate, write, attend (kv_cache's SDPA path)
    twin.write(1, twin.rows(torch.arange(B, device=DEVICE), seqlens), kr, v)
    mask = decode_mask(seqlens, L, window, torch.arange(L, device=DEVICE), dtype)
    want = decode_attention(twin, 1, qr, kr, v, cache_rows=None, seqlens_i32=None, length=L, mask=mask,
                            window=window, scale=scale)
    assert torch.equal(cache.k, twin.k) and torch.equal(cache.v, twin.v)
    torch.testing.assert_close(out, want, atol=DECODE_ATOL[dtype], rtol=DECODE_ATOL[dtype])
    ref = rope_decode_attention_reference(q, k, v, cos, sin, twin.k[1].clone(), twin.v[1].clone(), seqlens, window,
                                          scale)
    torch.testing.assert_close(ref, want, atol=DECODE_ATOL[dtype], rtol=DECODE_ATOL[dtype])


def test_rope_decode_attention_of_extreme_scores():
    """Scores far apart (a key that takes all the weight, others of -1e4 below it) and a row that only sees itself."""
    q, k, v, cos, sin, cache, seqlens = decode_inputs(3, 4, 2, 16, 12, torch.float32, seed=21)
    cache.k[1, :3, :, 5] = 60.0 * q[:3].reshape(3, 2, 2, 16)[:, :, 0]  # position 5 dominates head 0 of each group
    seqlens[:] = torch.tensor([0, 6, 11])
    ref = rope_decode_attention_reference(q, k, v, cos, sin, cache.k[1].clone(), cache.v[1].clone(), seqlens, None,
                                          0.25)
    out = rope_decode_attention(q, k, v, cos, sin, cache.k[1], cache.v[1], seqlens, None, 0.25)
    assert out.isfinite().all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], v[0].repeat_interleave(2, dim=0), atol=0, rtol=0)  # position 0: itself only


def test_rope_decode_attention_checks_its_arguments():
    q, k, v, cos, sin, cache, seqlens = decode_inputs(3, 4, 2, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        rope_decode_attention(q[:, :3], k, v, cos, sin, cache.k[1], cache.v[1], seqlens, None, 1.0)
    with pytest.raises(ValueError, match=r"k_cache must be a contiguous \[slots >= 3, 2, max_len, 8\]"):
        rope_decode_attention(q, k, v, cos, sin, cache.k[1, :2], cache.v[1], seqlens, None, 1.0)
    with pytest.raises(ValueError, match="v_cache must be a contiguous"):
        rope_decode_attention(q, k, v, cos, sin, cache.k[1], cache.v[1].transpose(2, 3), seqlens, None, 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        rope_decode_attention(q, k, v, cos.double(), sin, cache.k[1], cache.v[1], seqlens, None, 1.0)
    with pytest.raises(ValueError, match=r"seqlens must be int64 \[3\]"):
        rope_decode_attention(q, k, v, cos, sin, cache.k[1], cache.v[1], seqlens.int(), None, 1.0)


# ------------------------------------------------------------------------------------------------ gate_up_silu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 48, 33), (5, 100, 80), (16, 64, 64), (37, 130, 97), (64, 896, 300)])
def test_gate_up_silu_matches_the_reference(dtype, M, K, N):
    x = rand((M, K), dtype, seed=11)
    gate_w, up_w = rand((N, K), dtype, 0.1, seed=12), rand((N, K), dtype, 0.1, seed=13)
    got, want = gate_up_silu(x, gate_w, up_w), gate_up_silu_reference(x, gate_w, up_w)
    assert got.dtype == want.dtype and got.shape == (M, N)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:
        assert int(ulps(got, want).max()) <= 2 and (got != want).float().mean() < 0.01


def test_gate_up_silu_of_strided_rows_and_extreme_values():
    x = rand((6, 2 * 40), torch.bfloat16, seed=14)[:, :40]  # rows 80 apart
    gate_w, up_w = rand((24, 40), torch.bfloat16, 0.1, seed=15), rand((24, 40), torch.bfloat16, 0.1, seed=16)
    gate_w[0, :] = 30.0  # silu far into both tails
    gate_w[1, :] = -30.0
    got, want = gate_up_silu(x, gate_w, up_w), gate_up_silu_reference(x, gate_w, up_w)
    assert int(ulps(got, want).max()) <= 2 and bool(got.isfinite().all())


def test_gate_up_silu_checks_its_arguments():
    w = rand((8, 16), torch.float32)
    with pytest.raises(ValueError, match="M <= 64 rows"):
        gate_up_silu(rand((65, 16), torch.float32), w, w)
    with pytest.raises(ValueError, match=r"both be \[N, 16\]"):
        gate_up_silu(rand((2, 16), torch.float32), w, w[:4])
    with pytest.raises(TypeError, match="one dtype"):
        gate_up_silu(rand((2, 16), torch.float32), w.half(), w.half())


# ------------------------------------------------------------------------------------------------ silu_mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4864), (3, 1000), (64, 17)])
def test_silu_mul_matches_the_reference(dtype, shape):
    gate, up = rand(shape, dtype, 6.0, seed=1), rand(shape, dtype, seed=2)
    assert_close_in_ulps(silu_mul(gate, up), silu_mul_reference(gate, up), "silu_mul")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_extreme_values(dtype):
    fi = torch.finfo(dtype)
    gate = torch.tensor([0.0, -0.0, 88.0, -88.0, 100.0, -100.0, fi.max, -fi.max, fi.tiny, float("inf"),
                         float("-inf"), float("nan")]).to(dtype).to(DEVICE)
    up = torch.tensor([1.0, -2.0, fi.max, 3.0, -1.0, fi.max, 2.0, 1.0, fi.max, 1.0, 1.0, 1.0]).to(dtype).to(DEVICE)
    assert_close_in_ulps(silu_mul(gate, up), silu_mul_reference(gate, up), "silu_mul")


def test_silu_mul_checks_its_arguments():
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul(rand((2, 3), torch.float32), rand((2, 4), torch.float32))
