// Exact top-k and top-p thresholds of one row by a multi-pivot search: the CUDA twin of kernels/filter.py (no
// bisection over the whole row). Included by csrc/sample_kernels.cuh.
//
// The thresholds are those of espo/ops/reference.py (step 5): on the int32 order key of the logits x, top-k's is
// the k-th largest key (ties kept); top-p's is the largest key t >= the top-k threshold whose tokens with key >= t
// hold integer mass >= ceil(double(p) * double(mass above the top-k threshold)). Both are found the same way:
//
// 1. An interval [lo, hi) of keys holds the threshold: stat(lo) >= goal > stat(hi), where stat is the count
//    (top-k) or the integer mass qg (top-p) of the tokens with key >= the given key (a `Bound`).
// 2. A pass over the row computes stat at kPivots ascending pivot keys. Each token is binned by how many pivots are
//    <= its key (a binary search), bins are summed from the top. The first two passes run over the whole grid, one
//    block per chunk (csrc/sample.cu, pivot_round_kernel): round 1 at pivots 45 .. 0.25 base-2 units below the max
//    logit (where thresholds lie for peaked and flat rows alike), round 2 -- only while the first search (top-k
//    where it is on, else top-p) has more than kCand tokens in its interval -- at pivots splitting that interval's
//    keys evenly. Any further pass is made by the row's finishing block (at least kPivots-fold narrower each time).
// 3. Once the interval holds at most kCand tokens, one pass gathers their keys into shared memory, a bitonic sort
//    orders them, and the threshold is read off (the (k - count above)-th key, or where the cumulative mass
//    reaches the goal). An interval of a single key (more than kCand tied logits) is its own threshold.
//
// All sums are exact integers, so the thresholds -- and the tokens -- equal the reference's bit for bit.
#pragma once

#include "common.cuh"
#include "params.cuh"

namespace espo {
namespace {

using detail::kPivots;                       // pivot keys per pass
constexpr int kCand = 1024;                  // candidates sorted in shared memory
constexpr long long kKeyEnd = 2147483648LL;  // one past the largest int32 key

// The float32 value of an int32 order key (the inverse of order_key; key 0 is +0).
__device__ __forceinline__ float key_value(int32_t key) { return __int_as_float(key < 0 ? (key ^ 0x7FFFFFFF) : key); }

// A key, with the count and integer mass qg of the tokens whose key is >= it.
struct Bound {
  long long key, cnt, mass;
};

struct FilterShared {
  int32_t first[kPivots];  // round 1's pivots
  int32_t piv[kPivots];    // the pivots of the pass being made
  unsigned long long bin_cnt[kPivots + 1], bin_mass[kPivots + 1];  // bin b: tokens with exactly b pivots <= key
  long long stat_cnt[kPivots], stat_mass[kPivots];    // the last pass: tokens with key >= each pivot
  long long pre_cnt[kPivots], pre_mass[kPivots];      // round 1 (over the grid), at `first`
  long long pre2_cnt[kPivots], pre2_mass[kPivots];    // round 2 (over the grid)
  int32_t cand[kCand];
};

// Round 1's pivot j, ascending in j: INT32_MIN (every token), then 45 .. 0.25 base-2 units below the max logit Mx.
// Computed once per row (the deferring block) and stored: every later block reads the same keys.
__device__ __forceinline__ int32_t first_pivot(int j, float Mx, float a) {
  if (j == 0) return INT32_MIN;
  const float dist = exp2f(static_cast<float>(kPivots - 1 - j) * (7.5f / (kPivots - 2)) - 2.0f);
  return order_key(__fsub_rn(Mx, __fdiv_rn(dist, a)));
}

// Pivot j of a pass that splits [lo, hi) evenly (always < hi <= 2**31, so an int32).
__device__ __forceinline__ int32_t even_pivot(int j, long long lo, long long hi) {
  return static_cast<int32_t>(lo + ((hi - lo) * j) / kPivots);
}

// One step of a search: from the stats at ascending pivots, the sub-interval of [lo, hi) where stat crosses the
// goal (stat falls as the pivot rises). Every thread computes the same result.
__device__ __forceinline__ void narrow(const int32_t* piv, const long long* cnt, const long long* mass, long long goal,
                                       bool by_mass, Bound& lo, Bound& hi) {
  Bound new_lo = lo, new_hi = hi;
#pragma unroll
  for (int j = 0; j < kPivots; ++j) {
    const long long key = piv[j];
    if (key < lo.key || key >= hi.key) continue;
    if ((by_mass ? mass[j] : cnt[j]) >= goal) {
      if (key >= new_lo.key) new_lo = Bound{key, cnt[j], mass[j]};
    } else if (key < new_hi.key) {
      new_hi = Bound{key, cnt[j], mass[j]};
    }
  }
  lo = new_lo;
  hi = new_hi;
}

// Over the chunks [c0, c1) of the row: for each pivot fs.piv[j] (ascending), the count and integer mass qg of the
// tokens with key >= it, into fs.stat_*. Most tokens land in bin 1 (only the lowest pivot is below them) or in the
// top bin; those are summed in registers, the others by shared-memory atomics.
template <typename Tag, int CHUNK>
__device__ void pivot_pass(const typename Tag::storage* rowp, int64_t V, int c0, int c1, float a, float R, float two_s,
                           bool aligned, FilterShared& fs, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  for (int b = threadIdx.x; b <= kPivots; b += C::kThreads) {
    fs.bin_cnt[b] = 0;
    fs.bin_mass[b] = 0;
  }
  __syncthreads();
  long long low_cnt = 0, low_mass = 0, top_cnt = 0, top_mass = 0;
  for (int c = c0; c < c1; ++c) {
    const int64_t start = static_cast<int64_t>(c) * CHUNK;
    float x[C::kLoads][C::kLvec];
    load_chunk<Tag, CHUNK, false>(rowp, V, start, aligned, x);
#pragma unroll
    for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
      for (int kk = 0; kk < C::kLvec; ++kk) {
        const int le = local_index<Tag, CHUNK, false>(j) + kk;
        if (le >= CHUNK || start + le >= V) continue;
        const int32_t key = order_key(x[j][kk]);
        int bin = 0;  // how many pivots are <= key
#pragma unroll
        for (int step = kPivots; step > 0; step >>= 1)
          if (bin + step <= kPivots && fs.piv[bin + step - 1] <= key) bin += step;
        if (bin == 0) continue;
        const long long q = integer_mass(x[j][kk], a, R, two_s);
        if (bin == 1) {
          ++low_cnt;
          low_mass += q;
        } else if (bin == kPivots) {
          ++top_cnt;
          top_mass += q;
        } else {
          atomicAdd(&fs.bin_cnt[bin], 1ULL);
          atomicAdd(&fs.bin_mass[bin], static_cast<unsigned long long>(q));
        }
      }
  }
  low_cnt = block_reduce<SumOp, C::kWarps>(low_cnt, sh);
  low_mass = block_reduce<SumOp, C::kWarps>(low_mass, sh);
  top_cnt = block_reduce<SumOp, C::kWarps>(top_cnt, sh);
  top_mass = block_reduce<SumOp, C::kWarps>(top_mass, sh);
  __syncthreads();  // every atomic is in (block_reduce has no barrier in a one-warp block)
  if (threadIdx.x == 0) {
    fs.bin_cnt[1] += low_cnt;
    fs.bin_mass[1] += low_mass;
    fs.bin_cnt[kPivots] += top_cnt;
    fs.bin_mass[kPivots] += top_mass;
    long long cnt = 0, mass = 0;
    for (int b = kPivots; b >= 1; --b) {  // pivot b - 1 is <= the keys of bins b and above
      cnt += static_cast<long long>(fs.bin_cnt[b]);
      mass += static_cast<long long>(fs.bin_mass[b]);
      fs.stat_cnt[b - 1] = cnt;
      fs.stat_mass[b - 1] = mass;
    }
  }
  __syncthreads();
}

// The keys of the tokens with lo <= key < hi (at most kCand of them) into fs.cand, in row order.
template <typename Tag, int CHUNK>
__device__ void gather_candidates(const typename Tag::storage* rowp, int64_t V, int nc, long long lo, long long hi,
                                  bool aligned, FilterShared& fs, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  __syncthreads();  // fs.cand may still be read by a previous search
  long long base = 0;
  for (int c = 0; c < nc; ++c) {
    const int64_t start = static_cast<int64_t>(c) * CHUNK;
    float x[C::kLoads][C::kLvec];
    load_chunk<Tag, CHUNK, true>(rowp, V, start, aligned, x);
    const int base_e = static_cast<int>(threadIdx.x) * C::kEpt;
    auto inside = [&](int j, int kk) -> bool {
      const int le = base_e + j * C::kLvec + kk;
      const long long key = order_key(x[j][kk]);
      return le < CHUNK && start + le < V && key >= lo && key < hi;
    };
    long long mine = 0;
#pragma unroll
    for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
      for (int kk = 0; kk < C::kLvec; ++kk) mine += inside(j, kk) ? 1 : 0;
    long long total;
    long long pos = base + block_exclusive_scan_ll<C::kWarps>(mine, sh, total);
#pragma unroll
    for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
      for (int kk = 0; kk < C::kLvec; ++kk)
        if (inside(j, kk)) {
          if (pos < kCand) fs.cand[pos] = order_key(x[j][kk]);
          ++pos;
        }
    base += total;
  }
  __syncthreads();
}

// fs.cand[0, n) sorted descending in place: a bitonic sort over the next power of two, padded with INT32_MIN.
template <int THREADS>
__device__ void sort_candidates(FilterShared& fs, int n) {
  int size = 1;
  while (size < n) size <<= 1;
  for (int i = n + static_cast<int>(threadIdx.x); i < size; i += THREADS) fs.cand[i] = INT32_MIN;
  __syncthreads();
  for (int k = 2; k <= size; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < size; i += THREADS) {
        const int l = i ^ j;
        if (l > i) {
          const int32_t u = fs.cand[i], v = fs.cand[l];
          if ((i & k) == 0 ? u < v : u > v) {
            fs.cand[i] = v;
            fs.cand[l] = u;
          }
        }
      }
      __syncthreads();
    }
}

// The threshold among the n sorted candidates of the interval [lo, hi): top-k (by_mass false) the
// (goal - hi.cnt)-th largest key, top-p the first key where hi.mass plus the cumulative mass reaches the goal.
template <typename Tag, int CHUNK>
__device__ Bound pick_threshold(FilterShared& fs, int n, long long goal, bool by_mass, Bound hi, float a, float R,
                                float two_s, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  const int seg = (n + C::kThreads - 1) / C::kThreads;  // each thread: the candidates [i0, i1), in order
  const int i0 = min(n, static_cast<int>(threadIdx.x) * seg), i1 = min(n, i0 + seg);
  auto mass_of = [&](int i) { return integer_mass(key_value(fs.cand[i]), a, R, two_s); };
  int pos;
  if (!by_mass) {
    pos = static_cast<int>(goal - hi.cnt - 1);
  } else {
    long long mine = 0;
    for (int i = i0; i < i1; ++i) mine += mass_of(i);
    long long total;
    long long run = hi.mass + block_exclusive_scan_ll<C::kWarps>(mine, sh, total);
    int first = kBig;
    for (int i = i0; i < i1; ++i) {
      run += mass_of(i);
      if (first == kBig && run >= goal) first = i;
    }
    pos = block_reduce<MinOp, C::kWarps>(first, sh);
  }
  pos = pos < 0 ? 0 : (pos >= n ? n - 1 : pos);  // never clamped when the interval is right; memory safety
  const int32_t t = fs.cand[pos];
  long long cnt = 0, mass = 0;
  for (int i = i0; i < i1; ++i)
    if (fs.cand[i] >= t) {
      ++cnt;
      mass += mass_of(i);
    }
  cnt = block_reduce<SumOp, C::kWarps>(cnt, sh);
  mass = block_reduce<SumOp, C::kWarps>(mass, sh);
  return Bound{t, hi.cnt + cnt, hi.mass + mass};
}

// The threshold Bound of one search, from `lo` (the top-k threshold, or INT32_MIN for the first search): top-k
// (by_mass false, goal = k) or top-p (goal = ceil(p * lo.mass)). Round 1's stats (fs.pre_*) stand in for the
// first pass; where `use2` (the row's first search), round 2's (fs.pre2_*) stand in for the second.
template <typename Tag, int CHUNK>
__device__ Bound threshold_search(const typename Tag::storage* rowp, int64_t V, int nc, float a, float R, float two_s,
                                  bool aligned, long long goal, float top_p, bool by_mass, Bound lo, bool use2,
                                  FilterShared& fs, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  Bound hi{kKeyEnd, 0, 0};
  if (by_mass) goal = static_cast<long long>(ceil(__dmul_rn(static_cast<double>(top_p), __ll2double_rn(lo.mass))));
  narrow(fs.first, fs.pre_cnt, fs.pre_mass, goal, by_mass, lo, hi);
  for (int pass = 2; lo.cnt - hi.cnt > kCand && hi.key - lo.key > 1; ++pass) {
    __syncthreads();  // every thread has read the previous pass's pivots and stats
    if (threadIdx.x < kPivots) fs.piv[threadIdx.x] = even_pivot(static_cast<int>(threadIdx.x), lo.key, hi.key);
    __syncthreads();
    const bool from_round2 = pass == 2 && use2;
    if (!from_round2) pivot_pass<Tag, CHUNK>(rowp, V, 0, nc, a, R, two_s, aligned, fs, sh);
    narrow(fs.piv, from_round2 ? fs.pre2_cnt : fs.stat_cnt, from_round2 ? fs.pre2_mass : fs.stat_mass, goal, by_mass,
           lo, hi);
  }
  if (lo.cnt - hi.cnt > kCand) return lo;  // more than kCand tokens share the key lo: it is the threshold
  const int n = static_cast<int>(lo.cnt - hi.cnt);
  gather_candidates<Tag, CHUNK>(rowp, V, nc, lo.key, hi.key, aligned, fs, sh);
  sort_candidates<Cfg<Tag, CHUNK>::kThreads>(fs, n);
  return pick_threshold<Tag, CHUNK>(fs, n, goal, by_mass, hi, a, R, two_s, sh);
}

// The first search's interval after round 1 (what round 2 splits): top-k where it is on, else top-p.
__device__ __forceinline__ void first_interval(const FilterShared& fs, int64_t V, int64_t k, float top_p, Bound& lo,
                                               Bound& hi) {
  const bool topk_on = k > 0 && k < V;
  lo = Bound{INT32_MIN, V, fs.pre_mass[0]};  // pivot 0 is INT32_MIN: every token
  hi = Bound{kKeyEnd, 0, 0};
  const long long goal =
      topk_on ? k : static_cast<long long>(ceil(__dmul_rn(static_cast<double>(top_p), __ll2double_rn(lo.mass))));
  narrow(fs.first, fs.pre_cnt, fs.pre_mass, goal, !topk_on, lo, hi);
}

// The token drawn from the tokens with key >= key_floor: the first whose integer cumulative mass exceeds
// target = trunc(u * kept), by one walk over the row.
template <typename Tag, int CHUNK>
__device__ int64_t walk_above(const typename Tag::storage* rowp, int64_t V, int nc, float a, float R, float two_s,
                              long long key_floor, long long target, bool aligned,
                              Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  long long acc = 0;
  for (int c = 0; c < nc; ++c) {
    const int64_t start = static_cast<int64_t>(c) * CHUNK;
    float x[C::kLoads][C::kLvec];
    load_chunk<Tag, CHUNK, true>(rowp, V, start, aligned, x);
    const int base_e = static_cast<int>(threadIdx.x) * C::kEpt;
    // An element's kept mass, computed in both loops below: holding the int64 masses in registers between
    // them instead adds spills (ptxas -v, sm_90), and ex2 is cheap.
    auto kept_mass = [&](int j, int kk) -> long long {
      const int le = base_e + j * C::kLvec + kk;
      const bool sel = le < CHUNK && start + le < V && static_cast<long long>(order_key(x[j][kk])) >= key_floor;
      return sel ? integer_mass(x[j][kk], a, R, two_s) : 0;
    };
    long long tt = 0;  // the thread's kept mass
#pragma unroll
    for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
      for (int kk = 0; kk < C::kLvec; ++kk) tt += kept_mass(j, kk);
    long long tile_total;
    long long run = acc + block_exclusive_scan_ll<C::kWarps>(tt, sh, tile_total);
    int my_first = kBig;
#pragma unroll
    for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
      for (int kk = 0; kk < C::kLvec; ++kk) {
        run += kept_mass(j, kk);
        if (my_first == kBig && run > target) my_first = base_e + j * C::kLvec + kk;
      }
    const int first = block_reduce<MinOp, C::kWarps>(my_first, sh);
    if (first != kBig) return start + first;
    acc += tile_total;
  }
  return 0;  // never reached for a valid row (target < kept mass)
}

// Exact top-k then top-p (ties at a threshold kept) on the global integer masses qg (reference step 5), then
// integer inverse-CDF sampling over the kept tokens. fs holds round 1's pivots and stats (and round 2's).
template <typename Tag, int CHUNK>
__device__ int64_t sample_filtered(const typename Tag::storage* rowp, int64_t V, int nc, float a, float R, float two_s,
                                   int64_t k, float top_p, float u, bool aligned, FilterShared& fs,
                                   Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  const bool topk_on = k > 0 && k < V;
  Bound kept{INT32_MIN, V, fs.pre_mass[0]};
  if (topk_on)
    kept = threshold_search<Tag, CHUNK>(rowp, V, nc, a, R, two_s, aligned, k, 1.0f, false, kept, true, fs, sh);
  if (top_p < 1.0f)
    kept = threshold_search<Tag, CHUNK>(rowp, V, nc, a, R, two_s, aligned, 0, top_p, true, kept, !topk_on, fs, sh);
  const long long target = static_cast<long long>(__dmul_rn(static_cast<double>(u), __ll2double_rn(kept.mass)));
  return walk_above<Tag, CHUNK>(rowp, V, nc, a, R, two_s, kept.key, target, aligned, sh);
}

}  // namespace
}  // namespace espo
