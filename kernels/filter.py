"""Exact top-k and top-p thresholds of one row by a multi-pivot search (no bisection over the whole row).

The thresholds are those of ``espo.sample_reference`` (step 5): on the int32 order key of the logits x, top-k's
is the k-th largest key (ties kept); top-p's is the largest key t >= the top-k threshold whose kept tokens with
key >= t hold integer mass >= ``need = ceil(double(p) * double(Z_k))``. Both are found the same way:

1. An interval [lo, hi) of keys holds the threshold: ``stat(lo) >= goal > stat(hi)``, where stat is the count
   (top-k) or the integer mass qg (top-p) of the tokens with key >= the given key.
2. While more than CAND tokens lie in the interval and it spans more than one key, one pass over the row
   computes stat at P pivots at once ([block, P] compares) and keeps the sub-interval where stat crosses the goal.
   The first pass puts its pivots at fixed base-2 distances below the row's max (0.25 to 45 units: where
   thresholds lie for peaked and flat rows alike); later passes split the key interval evenly, so each pass
   narrows it at least (P + 1)-fold and the loop ends within ~8 passes even for adversarial rows.
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
def threshold_search(row_ptr, V, a, R, Mx, goal, p, lo, cnt_lo, mass_lo, cand_ptr, MASS: tl.constexpr,
                     P: tl.constexpr, CAND: tl.constexpr, BLOCK: tl.constexpr, TWO_S: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """The threshold key t >= lo and the count and integer mass of the tokens with key >= t.

    Top-k (MASS False): t is the largest key with count >= goal. Top-p (MASS True): ``goal`` is ignored; the goal
    is ceil(double(p) * double(mass above lo)) and t is the largest key whose mass reaches it. ``cnt_lo`` and
    ``mass_lo`` describe lo when known (mass_lo < 0: not known yet; the first pass or the gather finds it)."""
    hi = tl.full((), _KEY_END, tl.int64)
    cnt_hi = tl.zeros((), tl.int64)
    mass_hi = tl.zeros((), tl.int64)
    if MASS:
        goal = tl.where(mass_lo >= 0, tl.math.ceil(p.to(tl.float64) * mass_lo.to(tl.float64)).to(tl.int64), -1)
    j = tl.arange(0, P)
    it = 0
    while ((cnt_lo - cnt_hi) > CAND) & ((hi - lo) > 1):
        if it == 0:  # pivots 0.25 .. 45 base-2 units below the max; pivot 0 is lo itself (its mass: the goal)
            dist = tl.math.exp2(((P - 1 - j).to(tl.float32) * (7.5 / (P - 2))) - 2.0)
            piv = order_key(Mx - dist / a).to(tl.int64)
            piv = tl.minimum(tl.maximum(piv, lo + 1), hi - 1)
        else:
            piv = lo + ((hi - lo) * j) // P
        piv = tl.where(j == 0, lo, piv)
        cnt, mass = _pivot_pass(row_ptr, V, a, R, piv, P, BLOCK, TWO_S, INTERPRET)
        if MASS:
            goal = tl.where(goal < 0, tl.math.ceil(p.to(tl.float64) * tl.max(mass, axis=0).to(tl.float64)).to(
                tl.int64), goal)
            ok = mass >= goal
        else:
            ok = cnt >= goal
        # stat falls as the pivot rises, so ok holds for a prefix of the (ascending) pivots, pivot 0 always
        new_hi = tl.min(tl.where(ok, hi, piv), axis=0)
        cnt_hi = tl.max(tl.where(ok, cnt_hi, cnt), axis=0)
        mass_hi = tl.max(tl.where(ok, mass_hi, mass), axis=0)
        lo = tl.max(tl.where(ok, piv, lo), axis=0)
        cnt_lo = tl.min(tl.where(ok, cnt, cnt_lo), axis=0)
        mass_lo = tl.min(tl.where(ok, mass, tl.full((P,), 2**62, tl.int64)), axis=0)
        hi = new_hi
        it += 1
    t = lo
    cnt_t = cnt_lo
    mass_t = mass_lo
    if (cnt_lo - cnt_hi) <= CAND:
        _gather(row_ptr, V, lo, hi, cand_ptr, BLOCK)
        n = (cnt_lo - cnt_hi).to(tl.int32)
        idx = tl.arange(0, CAND)
        keys = tl.load(cand_ptr + idx, mask=idx < n, other=_INT32_MIN)
        keys = tl.sort(keys, descending=True)
        live = idx < n
        q = tl.where(live, global_masses(key_value(tl.where(live, keys, 0)), a, R, TWO_S, INTERPRET), 0)
        cum = mass_hi + tl.cumsum(q, axis=0)
        if MASS:
            goal = tl.where(goal < 0, tl.math.ceil(p.to(tl.float64) * (mass_hi + tl.sum(q, axis=0)).to(
                tl.float64)).to(tl.int64), goal)
            pos = tl.min(tl.where(live & (cum >= goal), idx, CAND), axis=0)
        else:
            pos = (goal - cnt_hi - 1).to(tl.int32)
        t = tl.sum(tl.where(idx == pos, keys, 0).to(tl.int64), axis=0)
        kept = live & (keys.to(tl.int64) >= t)
        cnt_t = cnt_hi + tl.sum(kept.to(tl.int64), axis=0)
        mass_t = mass_hi + tl.sum(tl.where(kept, q, 0), axis=0)
    return t, cnt_t, mass_t
