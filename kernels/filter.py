"""Exact top-k and top-p thresholds of one row by a multi-pivot search (no bisection over the whole row).

The thresholds are those of ``espo.ops.reference`` (step 5): on the int32 order key of the logits x, top-k's
is the k-th largest key (ties kept); top-p's is the largest key t >= the top-k threshold whose kept tokens with
key >= t hold integer mass >= ``need = ceil(double(p) * double(Z_k))``. Both are found the same way:

1. An interval [lo, hi) of keys holds the threshold: ``stat(lo) >= goal > stat(hi)``, where stat is the count
   (top-k) or the integer mass qg (top-p) of the tokens with key >= the given key.
2. The first two passes run on the whole grid (``pivot_stats_kernel``, one program per chunk of the row, [block, P]
   compares): round 1 at P pivots at fixed base-2 distances below the row's max (0.25 to 45 units: where
   thresholds lie for peaked and flat rows alike); round 2, where the first search (top-k if on, else top-p) still
   has more than CAND tokens in its interval, at P pivots splitting that interval's keys evenly. The row's program
   sums the chunks' stats. Only while more than CAND tokens remain and the interval spans more than one key does
   the row's program make a pass of its own, again splitting the keys evenly (at least P-fold narrower each
   time: ~8 passes at most, even for adversarial rows).
3. One pass gathers the (at most CAND) keys of the interval, which are sorted in registers; the threshold is
   read off the sorted keys (the (k - count above)-th, or where the cumulative mass reaches the goal). An
   interval of a single key (more than CAND tied logits) is its own threshold.

All sums are exact integers, so the thresholds -- and the tokens -- equal the reference's bit for bit.
"""
import triton
import triton.language as tl

_INT32_MIN = tl.constexpr(-2147483648)
_KEY_END = tl.constexpr(2147483648)  # one past the largest int32 key


@triton.jit
def order_key(x):
    """int32 key with the order of the float32 values x (-0 and +0 share a key)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def key_value(key):
    """The float32 value of an int32 order key (the inverse of ``order_key``; key 0 is +0)."""
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def global_masses(x, a, R, TWO_S: tl.constexpr, INTERPRET: tl.constexpr):
    """qg = trunc(fl(exp2(fl(fl(x * a) - R)) * 2**S)) as int64 (reference step 5)."""
    d = x * a - R
    if INTERPRET:
        f = tl.math.exp2(d.to(tl.float64)).to(tl.float32)
    else:
        f = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True,
                                      pack=1)
    return (f * TWO_S).to(tl.int64)


@triton.jit
def _pivot_pass(row_ptr, V, a, R, piv, P: tl.constexpr, BLOCK: tl.constexpr, TWO_S: tl.constexpr,
                INTERPRET: tl.constexpr):
    """For each pivot key: how many tokens have key >= it (int64), and their integer mass (int64)."""
    cnt = tl.zeros((P,), tl.int64)
    mass = tl.zeros((P,), tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        x = tl.load(row_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32)
        q = tl.where(inb, global_masses(x, a, R, TWO_S, INTERPRET), 0)
        above = (order_key(x).to(tl.int64)[:, None] >= piv[None, :]) & inb[:, None]
        cnt += tl.sum(above.to(tl.int64), axis=0)
        mass += tl.sum(tl.where(above, q[:, None], 0), axis=0)
    return cnt, mass


@triton.jit
def first_pivots(Mx, a, P: tl.constexpr):
    """The first pass's pivot keys, ascending: INT32_MIN (every token), then 45 .. 0.25 base-2 units below the max
    logit Mx (where top-k and top-p thresholds lie for peaked and flat rows alike)."""
    j = tl.arange(0, P)
    dist = tl.math.exp2(((P - 1 - j).to(tl.float32) * (7.5 / (P - 2))) - 2.0)
    piv = order_key(Mx - dist / a).to(tl.int64)
    return tl.where(j == 0, _INT32_MIN, piv)


@triton.jit
def pivot_stats_kernel(
    logits_ptr, stride_row, V, C, part_ptr, part_plane, temp_ptr, temp_scalar, topk_ptr, topk_scalar, topp_ptr,
    topp_scalar, prev_cnt_ptr, prev_mass_ptr, cnt_ptr, mass_ptr,
    CHUNK: tl.constexpr, C_BLOCK: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr, CAND: tl.constexpr,
    ROUND: tl.constexpr, TEMP_PER_ROW: tl.constexpr, TOPK_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr,
    TWO_S: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Grid (B, C): a pivot pass of a filtered row, one chunk per program (the row split across programs): per
    pivot, the count and integer mass qg of the chunk's tokens with key >= it, at cnt_ptr/mass_ptr[row, c, :].

    ROUND 1 uses ``first_pivots``. ROUND 2 sums round 1's stats (prev_*), narrows the row's first search (top-k
    where it is on, else top-p) as ``threshold_search`` does, and, if more than CAND tokens are left in its
    interval, counts at the pivots that search's second pass would use; otherwise it writes nothing."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    if TEMP_PER_ROW:
        temp = tl.load(temp_ptr + row)
    else:
        temp = tl.cast(temp_scalar, tl.float32)
    if TOPK_PER_ROW:
        k = tl.load(topk_ptr + row)
    else:
        k = tl.cast(topk_scalar, tl.int64)
    if TOPP_PER_ROW:
        p = tl.load(topp_ptr + row)
    else:
        p = tl.cast(topp_scalar, tl.float32)
    if (temp != 0.0) & (((k > 0) & (k < V)) | (p < 1.0)):
        t = tl.where(temp == 0.0, 1.0, temp)
        a = tl.math.div_rn(tl.full(t.shape, 1.0, tl.float32), t) * 1.44269502162933349609375
        cidx = tl.arange(0, C_BLOCK)
        cmask = cidx < C
        Mx = tl.max(tl.load(part_ptr + row * C + cidx, mask=cmask, other=float("-inf")), axis=0)
        R = tl.math.ceil(tl.max(tl.load(part_ptr + 3 * part_plane + row * C + cidx, mask=cmask,
                                        other=float("-inf")), axis=0))
        R = tl.where(R == float("-inf"), 0.0, R)  # an invalid row: its stats are never read
        piv = first_pivots(Mx, a, P)
        go = True
        if ROUND == 2:
            pre = (row * C + cidx[:, None]) * P + tl.arange(0, P)[None, :]
            pre_cnt = tl.sum(tl.load(prev_cnt_ptr + pre, mask=cmask[:, None], other=0), axis=0)
            pre_mass = tl.sum(tl.load(prev_mass_ptr + pre, mask=cmask[:, None], other=0), axis=0)
            lo = tl.full((), _INT32_MIN, tl.int64)
            hi = tl.full((), _KEY_END, tl.int64)
            zero = tl.zeros((), tl.int64)
            mass_all = tl.max(pre_mass, axis=0)
            if (k > 0) & (k < V):
                lo, hi, cnt_lo, mass_lo, cnt_hi, mass_hi = _narrow(piv, pre_cnt, pre_mass, k, lo, hi, V.to(tl.int64),
                                                                   mass_all, zero, zero, False)
            else:
                goal = tl.math.ceil(p.to(tl.float64) * mass_all.to(tl.float64)).to(tl.int64)
                lo, hi, cnt_lo, mass_lo, cnt_hi, mass_hi = _narrow(piv, pre_cnt, pre_mass, goal, lo, hi,
                                                                   V.to(tl.int64), mass_all, zero, zero, True)
            go = ((cnt_lo - cnt_hi) > CAND) & ((hi - lo) > 1)
            piv = lo + ((hi - lo) * tl.arange(0, P)) // P
        if go:  # the chunk's logits in blocks of BLOCK: [BLOCK, P] compares at a time (registers on a GPU)
            end = tl.minimum(c * CHUNK + CHUNK, V)
            cnt, mass = _pivot_pass(logits_ptr + row.to(tl.int64) * stride_row + c * CHUNK, end - c * CHUNK, a, R,
                                    piv, P, BLOCK, TWO_S, INTERPRET)
            out = (row * C + c) * P + tl.arange(0, P)
            tl.store(cnt_ptr + out, cnt)
            tl.store(mass_ptr + out, mass)


@triton.jit
def _narrow(piv, cnt, mass, goal, lo, hi, cnt_lo, mass_lo, cnt_hi, mass_hi, MASS: tl.constexpr):
    """One step of the search: from the stats at the pivots, the sub-interval of [lo, hi) where stat crosses
    the goal (stat falls as the pivot rises: the pivots inside that reach the goal come first, then the others)."""
    inside = (piv >= lo) & (piv < hi)
    if MASS:
        ok = inside & (mass >= goal)
    else:
        ok = inside & (cnt >= goal)
    below = inside & (ok == 0)
    return (tl.max(tl.where(ok, piv, lo), axis=0), tl.min(tl.where(below, piv, hi), axis=0),
            tl.min(tl.where(ok, cnt, cnt_lo), axis=0), tl.min(tl.where(ok, mass, mass_lo), axis=0),
            tl.max(tl.where(below, cnt, cnt_hi), axis=0), tl.max(tl.where(below, mass, mass_hi), axis=0))


@triton.jit
def _gather(row_ptr, V, lo, hi, cand_ptr, BLOCK: tl.constexpr):
    """Store the keys of the tokens with lo <= key < hi (at most CAND of them) at cand_ptr, in any order."""
    n = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        key = order_key(x)
        inside = (offs < V) & (key.to(tl.int64) >= lo) & (key.to(tl.int64) < hi)
        pos = n + tl.cumsum(inside.to(tl.int32), axis=0) - 1
        tl.store(cand_ptr + pos, key, mask=inside)
        n += tl.sum(inside.to(tl.int32), axis=0)


@triton.jit
def threshold_search(row_ptr, V, a, R, Mx, goal, p, lo, cnt_lo, mass_lo, pre_cnt, pre_mass, pre2_cnt, pre2_mass, use2,
                     cand_ptr,
                     MASS: tl.constexpr, P: tl.constexpr, CAND: tl.constexpr, BLOCK: tl.constexpr,
                     GATHER_BLOCK: tl.constexpr, TWO_S: tl.constexpr, INTERPRET: tl.constexpr):
    """The threshold key t >= lo and the count and integer mass of the tokens with key >= t.

    Top-k (MASS False): t is the largest key with count >= goal. Top-p (MASS True): ``goal`` is ignored; the goal
    is ceil(double(p) * double(mass above lo)), and t is the largest key whose mass reaches it. ``cnt_lo`` and
    ``mass_lo`` describe lo (mass_lo < 0: not known, then lo is INT32_MIN). ``pre_cnt``/``pre_mass`` [P] are the
    stats at ``first_pivots`` (``pivot_stats_kernel`` round 1), which stand in for the first pass; where ``use2``,
    ``pre2_*`` (round 2) stand in for the second pass, which round 2 made for this very search."""
    hi = tl.full((), _KEY_END, tl.int64)
    cnt_hi = tl.zeros((), tl.int64)
    mass_hi = tl.zeros((), tl.int64)
    piv = first_pivots(Mx, a, P)
    mass_lo = tl.where(mass_lo < 0, tl.max(pre_mass, axis=0), mass_lo)  # pivot 0 is INT32_MIN: every token
    if MASS:
        goal = tl.math.ceil(p.to(tl.float64) * mass_lo.to(tl.float64)).to(tl.int64)
    j = tl.arange(0, P)
    cnt = pre_cnt
    mass = pre_mass
    it = 0
    while (it == 0) | (((cnt_lo - cnt_hi) > CAND) & ((hi - lo) > 1)):
        if it > 0:
            piv = lo + ((hi - lo) * j) // P
            if (it == 1) & use2:
                cnt = pre2_cnt
                mass = pre2_mass
            else:
                cnt, mass = _pivot_pass(row_ptr, V, a, R, piv, P, BLOCK, TWO_S, INTERPRET)
        lo, hi, cnt_lo, mass_lo, cnt_hi, mass_hi = _narrow(piv, cnt, mass, goal, lo, hi, cnt_lo, mass_lo, cnt_hi,
                                                           mass_hi, MASS)
        it += 1
    t = lo
    cnt_t = cnt_lo
    mass_t = mass_lo
    if (cnt_lo - cnt_hi) <= CAND:
        _gather(row_ptr, V, lo, hi, cand_ptr, GATHER_BLOCK)  # cheap per element: bigger blocks
        n = (cnt_lo - cnt_hi).to(tl.int32)
        idx = tl.arange(0, CAND)
        live = idx < n
        keys = tl.sort(tl.load(cand_ptr + idx, mask=live, other=_INT32_MIN), descending=True)
        q = tl.where(live, global_masses(key_value(tl.where(live, keys, 0)), a, R, TWO_S, INTERPRET), 0)
        if MASS:
            cum = mass_hi + tl.cumsum(q, axis=0)
            pos = tl.min(tl.where(live & (cum >= goal), idx, CAND), axis=0)
        else:
            pos = (goal - cnt_hi - 1).to(tl.int32)
        t = tl.sum(tl.where(idx == pos, keys, 0).to(tl.int64), axis=0)
        kept = live & (keys.to(tl.int64) >= t)
        cnt_t = cnt_hi + tl.sum(kept.to(tl.int64), axis=0)
        mass_t = mass_hi + tl.sum(tl.where(kept, q, 0), axis=0)
    return t, cnt_t, mass_t
