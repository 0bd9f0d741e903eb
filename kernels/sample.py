"""Fused sample-and-score in Triton: sampled token, its statistics and the ESPO stop update.

Two launches, both over chunks whose size depends on V alone (so a row's result never depends on the
batch it is in). Sampling follows the exact integer rule of ``espo.ops.reference`` (read its docstring):

1. ``_chunk_stats_kernel``, grid (B, C): one read of each chunk of the logits. Per element it computes
   ``y = fl(x * a)``, ``d = fl(y - r_c)`` (``r_c = ceil(max y)``, the chunk's integer reference),
   ``f = exp2(d)`` and the integer mass ``q = trunc(f * 2**S)``; the float statistics come from the
   same ``f`` (one exp2 per element): sum f, sum f * d (for the entropy), the raw max of x and its first
   index (greedy), the chunk's max y, the exact int64 sum of q, and the temperature-1 sum when some row's
   temperature is not 0 or 1.
2. ``_finish_kernel``, grid (B,): merges a row's C partials (floats scaled by 2**(r_c - R); integers
   shifted right by R - r_c), draws one uniform, picks the chunk where the integer cumulative mass crosses
   the integer target and re-reads only that chunk (1/C of the row) to find the token, then writes the
   statistics and updates the ESPO stop state. Rows with top-k/top-p find their exact thresholds by a
   multi-pivot search on an order-preserving integer key of the logits (``kernels/filter.py``: a few passes
   over the row, then a sort of the few candidates left), then walk the row once to sample.

Bit-exactness: both kernels are launched with ``enable_fp_fusion=False`` (no FMA contraction), divide
with ``div_rn`` and exponentiate with ``ex2.approx.ftz.f32`` (inline PTX, the instruction the CUDA backend
uses), so the chunk re-read reproduces the stats pass's q bit for bit and tokens equal the CUDA backend's.
Under the interpreter (no inline PTX there) exp2 is computed in float64 and rounded, as the reference does.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from espo.ops.reference import LOG2E_F32, chunk_size, mass_shift
from espo.ops.sampling_params import SamplingParams

from .filter import global_masses, order_key, pivot_stats_kernel, threshold_search
from .philox import philox_uniform

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton once, at import

_INT32_MIN = tl.constexpr(-2147483648)  # constexpr: Triton 3.9 refuses plain globals inside @jit code
_BIG = tl.constexpr(2147483647)
_LOG2E = tl.constexpr(LOG2E_F32)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_value(ptr, row, scalar, PER_ROW: tl.constexpr, DTYPE: tl.constexpr):
    if PER_ROW:
        return tl.load(ptr + row).to(DTYPE)
    else:
        return tl.cast(scalar, DTYPE)


@triton.jit
def _inverse_temperature(temp):
    """fl(1 / T) by IEEE division (1 for greedy rows)."""
    t = tl.where(temp == 0.0, 1.0, temp)
    return tl.math.div_rn(tl.full(t.shape, 1.0, tl.float32), t)


@triton.jit
def _exp2(d, INTERPRET: tl.constexpr):
    """float32 2**d: ex2.approx.ftz.f32 on the GPU (as the CUDA backend); rounded from float64 when interpreted."""
    if INTERPRET:
        return tl.math.exp2(d.to(tl.float64)).to(tl.float32)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _masses(x, a, ref, TWO_S: tl.constexpr, INTERPRET: tl.constexpr):
    """d = fl(fl(x * a) - ref), f = exp2(d), q = trunc(fl(f * 2**S)) (int64): espo.ops.reference, step 1."""
    d = x * a - ref
    f = _exp2(d, INTERPRET)
    return d, f, (f * TWO_S).to(tl.int64)


@triton.jit
def _chunk_stats_kernel(
    logits_ptr, stride_row, V, C,
    temp_ptr, temp_scalar,
    part_ptr, q_ptr, idx_ptr, part_plane,
    CHUNK: tl.constexpr, TEMP_PER_ROW: tl.constexpr, NEED_RAW: tl.constexpr, MAY_BE_GREEDY: tl.constexpr,
    TWO_S: tl.constexpr, INTERPRET: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.program_id(1)
    inv_t = _inverse_temperature(_row_value(temp_ptr, row, temp_scalar, TEMP_PER_ROW, tl.float32))
    a = inv_t * _LOG2E
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=offs < V, other=float("-inf"))
    x = x.to(tl.float32)
    mx = tl.max(x, axis=0)
    y_max = mx * a  # = max of fl(x * a): rounding is monotone and a > 0
    r = tl.math.ceil(y_max)
    d, f, q = _masses(x, a, tl.where(r == float("-inf"), 0.0, r), TWO_S, INTERPRET)
    out = part_ptr + row * C + c
    tl.store(out, mx)
    tl.store(out + part_plane, tl.sum(f, axis=0))
    tl.store(out + 2 * part_plane, tl.sum(tl.where(f > 0.0, f * d, 0.0), axis=0))
    tl.store(out + 3 * part_plane, y_max)
    tl.store(q_ptr + row * C + c, tl.sum(q, axis=0))
    if MAY_BE_GREEDY:
        tl.store(idx_ptr + row * C + c, tl.min(tl.where(x == mx, offs, _BIG), axis=0))
    if NEED_RAW:
        mr_safe = tl.where(mx == float("-inf"), 0.0, mx)
        tl.store(out + 4 * part_plane, tl.sum(tl.exp(x - mr_safe), axis=0))


@triton.jit
def _sample_filtered(row_ptr, V, a, R, Mx, k, p, u, pre_cnt, pre_mass, pre2_cnt, pre2_mass, cand_ptr,
                     ROW_BLOCK: tl.constexpr,
                     PASS_BLOCK: tl.constexpr, PIVOTS: tl.constexpr, CAND: tl.constexpr, TWO_S: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """Exact top-k then top-p on the global integer masses qg (reference step 5), then one inverse-CDF walk."""
    key_floor = tl.full((), _INT32_MIN, tl.int64)
    count = V.to(tl.int64)
    total = tl.full((), -1, tl.int64)  # not known yet
    topk_on = (k > 0) & (k < V)
    if topk_on:  # round 2 of pivot_stats_kernel served the first search: top-k where it is on, else top-p
        key_floor, count, total = threshold_search(row_ptr, V, a, R, Mx, k.to(tl.int64), p, key_floor, count, total,
                                                   pre_cnt, pre_mass, pre2_cnt, pre2_mass, True, cand_ptr, False,
                                                   PIVOTS, CAND, PASS_BLOCK, ROW_BLOCK, TWO_S, INTERPRET)
    if p < 1.0:
        key_floor, count, total = threshold_search(row_ptr, V, a, R, Mx, total, p, key_floor, count, total,
                                                   pre_cnt, pre_mass, pre2_cnt, pre2_mass, topk_on == 0, cand_ptr, True,
                                                   PIVOTS, CAND, PASS_BLOCK, ROW_BLOCK, TWO_S, INTERPRET)
    target = (u.to(tl.float64) * total.to(tl.float64)).to(tl.int64)
    acc = tl.zeros((), tl.int64)
    token = tl.full((), _BIG, tl.int32)
    for start in range(0, V, ROW_BLOCK):
        if token == _BIG:
            offs = start + tl.arange(0, ROW_BLOCK)
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            q = global_masses(x, a, R, TWO_S, INTERPRET)
            mass = tl.where(order_key(x).to(tl.int64) >= key_floor, q, 0)
            cum = tl.cumsum(mass, axis=0) + acc
            token = tl.min(tl.where(cum > target, offs, _BIG), axis=0)
            acc += tl.sum(mass, axis=0)
    return tl.where(token == _BIG, 0, token)  # never for a valid row: 0 <= target < total


@triton.jit
def _finish_kernel(
    logits_ptr, stride_row, V, C,
    part_ptr, q_ptr, idx_ptr, part_plane,
    temp_ptr, temp_scalar, topk_ptr, topk_scalar, topp_ptr, topp_scalar,
    seed_ptr, seed_scalar, offset_ptr, offset_scalar,
    tokens_ptr, logp_ptr, raw_logp_ptr, entropy_ptr, max_logp_ptr, regret_ptr, valid_ptr,
    z_ptr, sum_g_ptr, sum_g2_ptr, count_ptr, position_ptr, stopped_ptr, scalars_ptr, stopper_rows_ptr,
    values_ptr, stop_ptr, cand_ptr, piv_ptr, B_ROWS,
    alpha_s, one_minus_alpha_s, clip, delta, value_floor, min_tokens,
    CHUNK: tl.constexpr, C_BLOCK: tl.constexpr, ROW_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr,
    PIVOTS: tl.constexpr, CAND: tl.constexpr,
    TEMP_PER_ROW: tl.constexpr, TOPK_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr,
    SEED_PER_ROW: tl.constexpr, OFFSET_PER_ROW: tl.constexpr,
    NEED_RAW: tl.constexpr, MAY_BE_GREEDY: tl.constexpr, FILTER: tl.constexpr, STOPPER: tl.constexpr,
    HAS_VALUES: tl.constexpr, HAS_STOPPER_ROWS: tl.constexpr, TWO_S: tl.constexpr, INTERPRET: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temp = _row_value(temp_ptr, row, temp_scalar, TEMP_PER_ROW, tl.float32)
    greedy = temp == 0.0
    inv_t = _inverse_temperature(temp)
    a = inv_t * _LOG2E

    cidx = tl.arange(0, C_BLOCK)
    cmask = cidx < C
    base = part_ptr + row * C + cidx
    pmx = tl.load(base, mask=cmask, other=float("-inf"))
    ps = tl.load(base + part_plane, mask=cmask, other=0.0)
    pd = tl.load(base + 2 * part_plane, mask=cmask, other=0.0)
    py = tl.load(base + 3 * part_plane, mask=cmask, other=float("-inf"))
    pq = tl.load(q_ptr + row * C + cidx, mask=cmask, other=0)
    Mx = tl.max(pmx, axis=0)  # the row's max logit
    M = Mx * inv_t  # the max tempered logit (rounding is monotone)
    Y = tl.max(py, axis=0)
    R = tl.math.ceil(Y)  # = max_c r_c
    Y_safe = tl.where(Y == float("-inf"), 0.0, Y)
    R_safe = tl.where(R == float("-inf"), 0.0, R)
    rc = tl.math.ceil(py)
    # Float statistics: chunk sums of f = 2**(y - r_c) rescaled to the row reference R (a power of two).
    scale = tl.math.exp2(tl.where(rc == float("-inf"), float("-inf"), rc - R_safe))
    w = tl.where(cmask & (ps > 0.0), ps * scale, 0.0)
    w = tl.where(cmask & (ps != ps), ps, w)  # keep NaN so that the row is flagged invalid
    S = tl.sum(w, axis=0)  # sum over the row of 2**(y - R)
    D = tl.sum(tl.where(w > 0.0, scale * (pd + (rc - R_safe) * ps), 0.0), axis=0)  # ... times (y - R)
    log_S = tl.log(S)
    log_s = log_S + (R_safe - Y_safe) * _LN2  # log of the sum of exp(l - M)
    entropy = log_S - _LN2 * (D / S)
    if NEED_RAW:
        Mr_safe = tl.where(Mx == float("-inf"), 0.0, Mx)
        psr = tl.load(base + 4 * part_plane, mask=cmask, other=0.0)
        wr = tl.where(cmask & (psr > 0.0), psr * tl.exp(pmx - Mr_safe), 0.0)
        wr = tl.where(cmask & (psr != psr), psr, wr)
        # at temperature 0 or 1 the raw sums are the tempered ones: use those, as a launch without NEED_RAW does
        raw_log_s = tl.where(inv_t == 1.0, log_s, tl.log(tl.sum(wr, axis=0)))
    else:
        raw_log_s = log_s  # every row has temperature 0 or 1: the tempered sums are the raw sums
    valid = (S > 0.0) & (S < float("inf")) & (Mx < float("inf")) & (raw_log_s == raw_log_s) & (raw_log_s < float("inf"))

    seed = _row_value(seed_ptr, row, seed_scalar, SEED_PER_ROW, tl.int64)
    offset = _row_value(offset_ptr, row, offset_scalar, OFFSET_PER_ROW, tl.int64)
    u = philox_uniform((seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32),
                       (offset & 0xFFFFFFFF).to(tl.uint32), ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32), 0)

    # Integer inverse CDF (reference steps 2-4): the chunk from the shifted chunk sums, then that chunk.
    shift_f = tl.where(cmask & (rc > float("-inf")) & (R - rc < 63.0), R - rc, 63.0)
    shift = shift_f.to(tl.int64)
    W = pq >> shift
    Z = tl.sum(W, axis=0)
    target = (u.to(tl.float64) * Z.to(tl.float64)).to(tl.int64)
    cum = tl.cumsum(W, axis=0)
    chunk = tl.min(tl.where(cum > target, cidx, _BIG), axis=0)
    chunk = tl.where(chunk == _BIG, 0, chunk)  # Z == 0: an invalid row
    sel = cidx == chunk
    t = target - tl.sum(tl.where(sel, cum - W, 0), axis=0)
    shift_c = tl.sum(tl.where(sel, shift, 0), axis=0)
    r_c = tl.sum(tl.where(sel & (rc > float("-inf")), rc, 0.0), axis=0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    _d, _f, q = _masses(x, a, r_c, TWO_S, INTERPRET)
    inside = tl.cumsum(q, axis=0) >> shift_c
    token = tl.min(tl.where(inside > t, offs, _BIG), axis=0)
    token = tl.where(token == _BIG, chunk * CHUNK, token)  # never for a valid row
    if MAY_BE_GREEDY:
        first_max = tl.load(idx_ptr + row * C + cidx, mask=cmask & (pmx == Mx), other=_BIG)
        token = tl.where(greedy, tl.min(first_max, axis=0), token)
    if FILTER:  # rows with top-k/top-p (never greedy or invalid ones) replace the token by an exact walk
        k = _row_value(topk_ptr, row, topk_scalar, TOPK_PER_ROW, tl.int64)
        p = _row_value(topp_ptr, row, topp_scalar, TOPP_PER_ROW, tl.float32)
        if valid & (greedy == 0) & (((k > 0) & (k < V)) | (p < 1.0)):
            # the first pivot pass, done by pivot_stats_kernel over the row's chunks: sum its [C, P] partials
            jp = tl.arange(0, PIVOTS)
            pre = (row * C + cidx[:, None]) * PIVOTS + jp[None, :]
            plane = B_ROWS * C * PIVOTS  # piv_stats is [4, B, C, PIVOTS]: round 1's count, mass, round 2's
            pre_cnt = tl.sum(tl.load(piv_ptr + pre, mask=cmask[:, None], other=0), axis=0)
            pre_mass = tl.sum(tl.load(piv_ptr + plane + pre, mask=cmask[:, None], other=0), axis=0)
            pre2_cnt = tl.sum(tl.load(piv_ptr + 2 * plane + pre, mask=cmask[:, None], other=0), axis=0)
            pre2_mass = tl.sum(tl.load(piv_ptr + 3 * plane + pre, mask=cmask[:, None], other=0), axis=0)
            token = _sample_filtered(row_ptr, V, a, R_safe, Mx, k, p, u, pre_cnt, pre_mass, pre2_cnt, pre2_mass,
                                     cand_ptr + row * CAND,
                                     ROW_BLOCK, PASS_BLOCK, PIVOTS, CAND, TWO_S, INTERPRET)

    token = tl.where(valid, token, 0)
    x_tok = tl.load(row_ptr + token).to(tl.float32)
    l_tok = x_tok * inv_t
    nan = float("nan")
    sampled = valid & (greedy == 0)
    regret = tl.where(sampled, M - l_tok, tl.where(valid, 0.0, nan))
    tl.store(tokens_ptr + row, tl.where(valid, token.to(tl.int64), -1))
    tl.store(logp_ptr + row, tl.where(sampled, l_tok - M - log_s, tl.where(valid, 0.0, nan)))
    tl.store(raw_logp_ptr + row, tl.where(valid, x_tok - Mx - raw_log_s, nan))
    tl.store(entropy_ptr + row, tl.where(sampled, entropy, tl.where(valid, 0.0, nan)))
    tl.store(max_logp_ptr + row, tl.where(sampled, -log_s, tl.where(valid, 0.0, nan)))
    tl.store(regret_ptr + row, regret)
    tl.store(valid_ptr + row, valid)

    if STOPPER:
        stop_update(row, regret, valid, z_ptr, sum_g_ptr, sum_g2_ptr, count_ptr, position_ptr, stopped_ptr, scalars_ptr,
                    stopper_rows_ptr, values_ptr, stop_ptr, alpha_s, one_minus_alpha_s, clip, delta, value_floor,
                    min_tokens, HAS_STOPPER_ROWS, HAS_VALUES)


@triton.jit
def stop_update(
    row, regret, valid,
    z_ptr, sum_g_ptr, sum_g2_ptr, count_ptr, position_ptr, stopped_ptr, scalars_ptr, stopper_rows_ptr, values_ptr,
    stop_ptr, alpha_s, one_minus_alpha_s, clip, delta, value_floor, min_tokens,
    HAS_STOPPER_ROWS: tl.constexpr, HAS_VALUES: tl.constexpr,
):
    """One ESPO step of logits row ``row`` on its stopper row: ``espo.ops.reference.stop_update_reference``."""
    if HAS_STOPPER_ROWS:
        srow = tl.load(stopper_rows_ptr + row)
    else:
        srow = row.to(tl.int64)
    stopped = tl.load(stopped_ptr + srow) != 0
    live = stopped == 0
    counted = live & valid
    g = tl.where(counted, regret, 0.0)
    mean = tl.load(scalars_ptr)
    var = tl.load(scalars_ptr + 1)
    beta = tl.load(scalars_ptr + 2)
    armed = tl.load(scalars_ptr + 3)
    ready = tl.load(scalars_ptr + 4)
    g_norm = tl.minimum(tl.maximum((g - mean) / tl.sqrt(var + delta), -clip), clip)
    z_old = tl.load(z_ptr + srow)
    z = alpha_s * z_old + one_minus_alpha_s * g_norm
    if HAS_VALUES:
        value = tl.load(values_ptr + row).to(tl.float32)
        value = tl.where(tl.abs(value) < float("inf"), value, value_floor)  # NaN or inf: the floor
    else:
        value = value_floor
    position = tl.load(position_ptr + srow)
    stop = (counted & (armed > 0.0) & (ready > 0.0) & (position >= min_tokens)
            & (z > beta * tl.maximum(value, value_floor)))
    tl.store(z_ptr + srow, tl.where(counted, z, z_old))
    tl.store(sum_g_ptr + srow, tl.load(sum_g_ptr + srow) + g)
    tl.store(sum_g2_ptr + srow, tl.load(sum_g2_ptr + srow) + g * g)
    tl.store(count_ptr + srow, tl.load(count_ptr + srow) + counted.to(tl.int32))
    tl.store(position_ptr + srow, position + live.to(tl.int32))
    tl.store(stopped_ptr + srow, stopped | stop)
    tl.store(stop_ptr + row, stopped | stop)


def _pointer_and_scalar(value, dummy):
    """A per-row argument is a tensor (pointer, unused scalar) or a Python number (dummy pointer, scalar).

    Triton types a Python int in [2**31, 2**32) as uint32, which the kernels' cast to int64 does not read as the
    same number (a seed of 3144134225 drew other tokens than the reference): such a number is passed per row."""
    if isinstance(value, int) and 2**31 <= value < 2**32:
        value = torch.full(dummy.shape, value, dtype=torch.int64, device=dummy.device)
    if hasattr(value, "data_ptr"):
        return value, 0, True
    return dummy, value, False


@functools.lru_cache(maxsize=1024)
def _plan(V: int, interpret: bool) -> tuple:
    """What a launch needs that depends on V alone: chunk, C, C_BLOCK, ROW_BLOCK, PASS_BLOCK, 2**S."""
    chunk = chunk_size(V)
    C = triton.cdiv(V, chunk)
    row_block = min(4096, triton.next_power_of_2(V))
    # the pivot passes hold [block, PIVOTS] compares in registers on a GPU; the interpreter prefers few big blocks
    pass_block = row_block if interpret else min(256, row_block)
    return chunk, C, triton.next_power_of_2(C), row_block, pass_block, float(2 ** mass_shift(V))


_PIVOTS = 16
# Candidates sorted in registers once the pivot passes have narrowed a threshold's interval to this many tokens.
# Any power of two gives the same thresholds; the interpreter's sort is slow, so it gathers fewer.
CANDIDATES = {"gpu": 1024, "interpreter": 64}


def sample_triton(logits, params: SamplingParams, offset, stop=None):
    """Launch the two kernels. ``params`` (an ``espo.ops.sampling_params.SamplingParams`` for these rows) and
    ``offset`` are Python numbers or [B] tensors on the logits' device (float32 temperature/top_p, int64
    top_k/seed/offset), already checked; ``stop`` is an ``espo.ops.stopper.StopState`` or None. Returns the
    ``SampleOutput`` fields as a dict."""
    temperature, top_k, top_p, seed = params.temperature, params.top_k, params.top_p, params.seed
    B, V = logits.shape
    dev = logits.device
    interpret = _INTERPRET or dev.type != "cuda"
    chunk, C, c_block, row_block, pass_block, two_s = _plan(V, interpret)
    per_row_temperature = hasattr(temperature, "data_ptr")
    need_raw = per_row_temperature or temperature not in (0.0, 1.0)
    may_be_greedy = per_row_temperature or temperature == 0.0
    filtered = hasattr(top_k, "data_ptr") or hasattr(top_p, "data_ptr") or 0 < top_k < V or top_p < 1.0
    parts = torch.empty((5 if need_raw else 4, B, C), dtype=torch.float32, device=dev)
    qsum = torch.empty((B, C), dtype=torch.int64, device=dev)
    argmax = torch.empty((B, C) if may_be_greedy else (1,), dtype=torch.int32, device=dev)
    floats = torch.empty((5, B), dtype=torch.float32, device=dev)  # one allocation for the five float outputs
    out = {
        "tokens": torch.empty(B, dtype=torch.int64, device=dev),
        "logprobs": floats[0],
        "raw_logprobs": floats[1],
        "entropy": floats[2],
        "max_logprob": floats[3],
        "regret": floats[4],
        "valid": torch.empty(B, dtype=torch.bool, device=dev),
    }
    dummy = floats[4]
    cand = CANDIDATES["interpreter" if interpret else "gpu"]
    temp_arg = _pointer_and_scalar(temperature, dummy)
    _chunk_stats_kernel[(B, C)](
        logits, logits.stride(0), V, C, temp_arg[0], temp_arg[1], parts, qsum, argmax, B * C,
        CHUNK=chunk, TEMP_PER_ROW=temp_arg[2], NEED_RAW=need_raw, MAY_BE_GREEDY=may_be_greedy,
        TWO_S=two_s, INTERPRET=interpret, enable_fp_fusion=False,
    )
    args = [_pointer_and_scalar(v, dummy) for v in (top_k, top_p, seed, offset)]
    if filtered:
        candidates = torch.empty((B, cand), dtype=torch.int32, device=dev)
        piv_stats = torch.empty((4, B, C, _PIVOTS), dtype=torch.int64, device=dev)
        for rnd in (1, 2):  # the first two pivot passes of the search, split across the row's chunks
            pivot_stats_kernel[(B, C)](
                logits, logits.stride(0), V, C, parts, B * C, temp_arg[0], temp_arg[1], *args[0][:2], *args[1][:2],
                piv_stats[0], piv_stats[1], piv_stats[2 * rnd - 2], piv_stats[2 * rnd - 1], CHUNK=chunk,
                C_BLOCK=c_block, P=_PIVOTS, BLOCK=min(pass_block, chunk), CAND=cand, ROUND=rnd,
                TEMP_PER_ROW=temp_arg[2], TOPK_PER_ROW=args[0][2], TOPP_PER_ROW=args[1][2], TWO_S=two_s,
                INTERPRET=interpret, enable_fp_fusion=False,
            )
    else:
        candidates, piv_stats = dummy, dummy
    if stop is not None:
        state = [stop.z, stop.sum_g, stop.sum_g2, stop.count, stop.position, stop.stopped, stop.scalars]
        state.append(dummy if stop.rows is None else stop.rows)
        stop_mask = torch.empty(B, dtype=torch.bool, device=dev)
        params = [stop.alpha_s, 1.0 - stop.alpha_s, stop.clip, stop.delta, stop.value_floor, stop.min_tokens]
        values = stop.values
    else:
        state, stop_mask, params, values = [dummy] * 8, dummy, [0.0, 0.0, 0.0, 0.0, 0.0, 0], None
    _finish_kernel[(B,)](
        logits, logits.stride(0), V, C, parts, qsum, argmax, B * C,
        temp_arg[0], temp_arg[1], *args[0][:2], *args[1][:2], *args[2][:2], *args[3][:2],
        out["tokens"], *floats, out["valid"], *state, dummy if values is None else values, stop_mask, candidates,
        piv_stats, B, *params,
        CHUNK=chunk, C_BLOCK=c_block, ROW_BLOCK=row_block, PASS_BLOCK=pass_block, PIVOTS=_PIVOTS, CAND=cand,
        TEMP_PER_ROW=temp_arg[2], TOPK_PER_ROW=args[0][2], TOPP_PER_ROW=args[1][2],
        SEED_PER_ROW=args[2][2], OFFSET_PER_ROW=args[3][2],
        NEED_RAW=need_raw, MAY_BE_GREEDY=may_be_greedy, FILTER=filtered, STOPPER=stop is not None,
        HAS_VALUES=values is not None, HAS_STOPPER_ROWS=stop is not None and stop.rows is not None, TWO_S=two_s,
        INTERPRET=interpret, enable_fp_fusion=False,
    )
    out["stop"] = stop_mask if stop is not None else None
    return out
