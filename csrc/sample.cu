// Fused sample-and-score with the ESPO stop update: the CUDA kernels (no torch headers; see sample.cuh).
//
// Bit-level contract with the Triton backend (kernels/sample.py): the same Philox draw per row, the same
// chunk partition of the vocabulary (chunk_size), and the same sampling rule: inverse CDF with one uniform
// u per row, target = u * S where S is the row's total mass merged from per-chunk sums; the chunk is the
// first whose inclusive cumulative chunk mass exceeds the target, and inside it the token is the first
// whose cumulative mass exceeds what is left of the target (falling back to the last token of positive
// mass). Rows with top-k/top-p find their exact thresholds by the same 32-step bisection on the same
// order-preserving int32 key, then walk the row. Only the floating-point rounding of the sums differs
// (different reduction trees), so tokens differ only where u falls within a few ulps of a boundary.
//
// Performance notes: one block per (row, chunk) streams the logits with 16-byte vector loads (8 bf16 or
// 4 fp32 per load, 2 to 4 loads in flight per thread, all issued before any use), reduces with warp
// shuffles and a few shared-memory words, and exponentiates with ex2.approx on pre-scaled arguments
// (one FMA + one MUFU op per element). The per-row finish runs in the same launch, in the last block of
// the row to finish (per-row arrival counter), so no second launch and no tail of a second kernel: the
// chosen chunk is re-read while it is still in L2.
#include "philox.cuh"
#include "sample.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <limits.h>
#include <stdint.h>

namespace espo {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kBig = INT_MAX;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }

// 2**x by the MUFU unit (what Triton's tl.exp lowers to, after its multiply by log2(e)); 2**-inf = 0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// int32 key with the order of the float32 values (-0 and +0 share a key): kernels/sample.py _order_key.
__device__ __forceinline__ int32_t order_key(float x) {
  const int32_t bits = __float_as_int(x == 0.0f ? 0.0f : x);
  return bits < 0 ? (bits ^ 0x7FFFFFFF) : bits;
}

// ---------------------------------------------------------------- element types

struct F32 {
  using storage = float;
  __device__ static float from_word(uint32_t w, int) { return __uint_as_float(w); }
  __device__ static float load1(const storage* p) { return __ldg(p); }
};
struct BF16 {
  using storage = uint16_t;
  __device__ static float from_word(uint32_t w, int half) { return __uint_as_float(half ? (w & 0xffff0000u) : (w << 16)); }
  __device__ static float load1(const storage* p) { return __uint_as_float(static_cast<uint32_t>(__ldg(p)) << 16); }
};
struct F16 {
  using storage = uint16_t;
  __device__ static float from_word(uint32_t w, int half) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(half ? (w >> 16) : (w & 0xffffu))));
  }
  __device__ static float load1(const storage* p) { return __half2float(__ushort_as_half(__ldg(p))); }
};

// Threads per block and the element layout; a function of the chunk (so of V) only, never of B.
template <typename Tag, int CHUNK>
struct Cfg {
  static constexpr int kThreads = CHUNK >= 512 ? (CHUNK / 16 < 256 ? CHUNK / 16 : 256) : 32;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kEpt = CHUNK / kThreads > 0 ? CHUNK / kThreads : 1;  // elements per thread
  static constexpr int kVec = 16 / static_cast<int>(sizeof(typename Tag::storage));
  static constexpr int kLvec = kEpt < kVec ? kEpt : kVec;  // elements per load
  static constexpr int kLoads = kEpt / kLvec;              // loads per thread per chunk
  // Resident blocks per SM asked of the compiler: 1024 threads (at most 64 registers a thread).
  static constexpr int kMinBlocks = 1024 / kThreads;
};

// kLvec elements from p[idx, idx + N): one vector load when the row is 16-byte aligned and they are all
// in bounds, else element by element; out-of-bounds elements read -inf.
template <typename Tag, int N>
__device__ __forceinline__ void load_elems_inbounds(const typename Tag::storage* p, int64_t idx, float (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(typename Tag::storage));
  constexpr int kElemsPerWord = 4 / static_cast<int>(sizeof(typename Tag::storage));
  if constexpr (kBytes >= 4) {
    uint32_t w[kBytes / 4];
    if constexpr (kBytes == 16) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + idx));
      w[0] = v.x;
      w[1] = v.y;
      w[2] = v.z;
      w[3] = v.w;
    } else if constexpr (kBytes == 8) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p + idx));
      w[0] = v.x;
      w[1] = v.y;
    } else {
      w[0] = __ldg(reinterpret_cast<const unsigned int*>(p + idx));
    }
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = Tag::from_word(w[k / kElemsPerWord], k % kElemsPerWord);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = Tag::load1(p + idx + k);
  }
}

template <typename Tag, int N>
__device__ __forceinline__ void load_elems(const typename Tag::storage* p, int64_t idx, int64_t V, bool aligned,
                                           float (&out)[N]) {
  if (aligned && idx + N <= V) {
    load_elems_inbounds<Tag, N>(p, idx, out);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = idx + k < V ? Tag::load1(p + idx + k) : neg_inf();
  }
}

// The chunk starting at element `start` into x: strided layout (thread t holds, for each load j, the kLvec
// elements at (j * threads + t) * kLvec, so a warp reads contiguous memory) or blocked (thread t holds
// the kEpt elements at t * kEpt, in order, for scans). Elements outside the chunk or the row read -inf.
template <typename Tag, int CHUNK, bool BLOCKED>
__device__ __forceinline__ int local_index(int j) {
  using C = Cfg<Tag, CHUNK>;
  return BLOCKED ? static_cast<int>(threadIdx.x) * C::kEpt + j * C::kLvec
                 : (j * C::kThreads + static_cast<int>(threadIdx.x)) * C::kLvec;
}

template <typename Tag, int CHUNK, bool BLOCKED>
__device__ __forceinline__ void load_chunk(const typename Tag::storage* row, int64_t V, int64_t start, bool aligned,
                                           float (&x)[Cfg<Tag, CHUNK>::kLoads][Cfg<Tag, CHUNK>::kLvec]) {
  using C = Cfg<Tag, CHUNK>;
  if (aligned && start + CHUNK <= V) {
    // The common case, straight-line: every load of the thread is issued before any value is used.
#pragma unroll
    for (int j = 0; j < C::kLoads; ++j) {
      const int e = local_index<Tag, CHUNK, BLOCKED>(j);
      if (C::kThreads * C::kEpt <= CHUNK || e < CHUNK) {
        load_elems_inbounds<Tag, C::kLvec>(row, start + e, x[j]);
      } else {
#pragma unroll
        for (int k = 0; k < C::kLvec; ++k) x[j][k] = neg_inf();
      }
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j) {
    const int e = local_index<Tag, CHUNK, BLOCKED>(j);
    if (e < CHUNK) {
      load_elems<Tag, C::kLvec>(row, start + e, V, aligned, x[j]);
    } else {
#pragma unroll
      for (int k = 0; k < C::kLvec; ++k) x[j][k] = neg_inf();
    }
  }
}

// ---------------------------------------------------------------- block reductions (deterministic)
// Warp butterflies leave the same bits in every lane (IEEE addition is commutative), and the per-warp
// values are combined in warp order by every thread, so every thread returns the same value.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ int warp_min_i(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ int warp_max_i(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <int W>
struct Shared {
  float f[4 * W];
  int i[W];
  float excl[2];
  int is_last;
};

template <int W, int N>
__device__ __forceinline__ void block_sum_n(float (&v)[N], Shared<W>& sh) {
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = warp_sum(v[n]);
  if constexpr (W > 1) {
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) sh.f[n * W + warp] = v[n];
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float r = sh.f[n * W];
#pragma unroll
      for (int w = 1; w < W; ++w) r += sh.f[n * W + w];
      v[n] = r;
    }
    __syncthreads();
  }
}

template <int W>
__device__ __forceinline__ float block_sum(float v, Shared<W>& sh) {
  float a[1] = {v};
  block_sum_n<W, 1>(a, sh);
  return a[0];
}

template <int W>
__device__ __forceinline__ float block_max(float v, Shared<W>& sh) {
  v = warp_max(v);
  if constexpr (W > 1) {
    if ((threadIdx.x & 31) == 0) sh.f[threadIdx.x >> 5] = v;
    __syncthreads();
    v = sh.f[0];
#pragma unroll
    for (int w = 1; w < W; ++w) v = fmaxf(v, sh.f[w]);
    __syncthreads();
  }
  return v;
}

enum class IntOp { kMin, kMax, kSum };

template <IntOp OP, int W>
__device__ __forceinline__ int block_int(int v, Shared<W>& sh) {
  v = OP == IntOp::kMin ? warp_min_i(v) : (OP == IntOp::kMax ? warp_max_i(v) : warp_sum_i(v));
  if constexpr (W > 1) {
    if ((threadIdx.x & 31) == 0) sh.i[threadIdx.x >> 5] = v;
    __syncthreads();
    v = sh.i[0];
#pragma unroll
    for (int w = 1; w < W; ++w) v = OP == IntOp::kMin ? min(v, sh.i[w]) : (OP == IntOp::kMax ? max(v, sh.i[w]) : v + sh.i[w]);
    __syncthreads();
  }
  return v;
}

// Exclusive prefix sum of one value per thread, in thread order; `total` gets the block's sum.
template <int W>
__device__ __forceinline__ float block_exclusive_scan(float v, Shared<W>& sh, float& total) {
  const int lane = threadIdx.x & 31;
  float inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(kFull, inc, o);
    if (lane >= o) inc += n;
  }
  float ex = __shfl_up_sync(kFull, inc, 1);
  if (lane == 0) ex = 0.0f;
  if constexpr (W == 1) {
    total = __shfl_sync(kFull, inc, 31);
  } else {
    const int warp = threadIdx.x >> 5;
    if (lane == 31) sh.f[warp] = inc;
    __syncthreads();
    float before = 0.0f, all = 0.0f;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      if (w < warp) before += sh.f[w];
      all += sh.f[w];
    }
    __syncthreads();
    ex = before + ex;
    total = all;
  }
  return ex;
}

// ---------------------------------------------------------------- parameters

struct Params {
  const void* logits;
  int64_t B, V, stride;
  int C;
  RowArg<float> temperature;
  RowArg<int64_t> top_k;
  RowArg<float> top_p;
  RowArg<int64_t> seed;
  RowArg<int64_t> offset;
  float* part;        // [5, B, C]: max, sum, entropy sum, raw max, raw sum
  int* part_idx;      // [B, C]: first argmax (greedy rows)
  unsigned* arrived;  // [B]: blocks of the row done (zeroed before the launch)
  SampleOutputs out;
  bool has_stop;
  StopState st;
};

template <typename T>
__device__ __forceinline__ T row_value(const RowArg<T>& a, int64_t row) {
  return a.ptr != nullptr ? a.ptr[row] : a.value;
}

// ---------------------------------------------------------------- pass 1: one chunk's statistics

struct Partial {
  float m, s, d, mr, sr;
  int idx;
};

template <typename Tag, int CHUNK>
__device__ __forceinline__ Partial chunk_stats(const typename Tag::storage* row, int64_t V, int64_t start, float inv_t,
                                               bool need_raw, bool greedy, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  float x[C::kLoads][C::kLvec];
  load_chunk<Tag, CHUNK, false>(row, V, start, aligned, x);

  float mx = neg_inf();
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) mx = fmaxf(mx, x[j][k]);
  mx = block_max<C::kWarps>(mx, sh);
  // max over the chunk of l = x * inv_t: rounding is monotone, so it is the max of x times inv_t.
  const float m = mx * inv_t;
  const float m_safe = m == neg_inf() ? 0.0f : m;
  const float mr_safe = mx == neg_inf() ? 0.0f : mx;
  const float a = inv_t * kLog2e, b = m_safe * kLog2e, br = mr_safe * kLog2e;

  float acc[3] = {0.0f, 0.0f, 0.0f};  // sum exp(l - m), sum exp(l - m) * (l - m) / ln2, sum exp(x - mr)
  int idx = kBig;
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j) {
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) {
      const float xv = x[j][k];
      const float t = fmaf(xv, a, -b);  // (l - m) * log2(e)
      const float e = ex2(t);
      acc[0] += e;
      // e * (l - m), and 0 where e == 0 (t may be -inf there): ex2 flushes below 2**-126, so e > 0
      // implies t > -127 and the clamp changes nothing else.
      acc[1] = fmaf(e, fmaxf(t, -256.0f), acc[1]);
      if (need_raw) acc[2] += ex2(fmaf(xv, kLog2e, -br));
      if (greedy) {
        const int le = local_index<Tag, CHUNK, false>(j) + k;
        if (xv == mx && le < CHUNK && start + le < V) idx = min(idx, le);
      }
    }
  }
  block_sum_n<C::kWarps, 3>(acc, sh);
  if (greedy) idx = block_int<IntOp::kMin, C::kWarps>(idx, sh);
  Partial p;
  p.m = m;
  p.s = acc[0];
  p.d = acc[1] * kLn2;
  p.mr = mx;
  p.sr = need_raw ? acc[2] : acc[0];
  p.idx = idx == kBig ? kBig : static_cast<int>(start) + idx;
  return p;
}

// ---------------------------------------------------------------- pass 2 helpers: the merged row

// A chunk's mass relative to the row max, exp(pm - M) * ps; NaN sums stay NaN so the row is flagged.
__device__ __forceinline__ float chunk_weight(float pm, float ps, float M_safe, float& f) {
  f = ex2((pm - M_safe) * kLog2e);
  float w = ps > 0.0f ? ps * f : 0.0f;
  return ps != ps ? ps : w;
}

// Inverse CDF over the unfiltered row: choose the chunk from the chunk masses, then re-read that chunk.
template <typename Tag, int CHUNK>
__device__ int64_t sample_chunked(const Params& p, int64_t row, const typename Tag::storage* rowp, float inv_t,
                                  float M_safe, float S, float u, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  const int nc = p.C;
  const int64_t plane = p.B * static_cast<int64_t>(nc);
  const float* pm_row = p.part + row * nc;
  const float* ps_row = pm_row + plane;
  const float target = u * S;

  float carry = 0.0f;
  int found = kBig, last = -1;
  for (int base = 0; base < nc; base += C::kThreads) {
    const int c = base + static_cast<int>(threadIdx.x);
    float f, w = 0.0f;
    if (c < nc) w = chunk_weight(__ldcg(pm_row + c), __ldcg(ps_row + c), M_safe, f);
    float tile_total;
    const float ex = block_exclusive_scan<C::kWarps>(w, sh, tile_total);
    const float cum = carry + (ex + w);
    // Only a chunk of positive mass can hold the token (a zero-mass chunk can cross only by rounding).
    const int first = block_int<IntOp::kMin, C::kWarps>(c < nc && w > 0.0f && cum > target ? c : kBig, sh);
    const int lastp = block_int<IntOp::kMax, C::kWarps>(c < nc && w > 0.0f ? c : -1, sh);
    if (lastp >= 0 && c == lastp) sh.excl[1] = cum - w;
    if (first != kBig && c == first) sh.excl[0] = cum - w;
    __syncthreads();
    if (lastp >= 0) last = lastp;
    if (first != kBig) {
      found = first;
      break;
    }
    carry = carry + tile_total;
  }
  const int chunk = found != kBig ? found : max(last, 0);
  const float excl = found != kBig ? sh.excl[0] : (last >= 0 ? sh.excl[1] : 0.0f);
  const float local_target = target - excl;
  __syncthreads();

  // Re-read the chosen chunk (blocked layout: each thread's elements are consecutive) and scan it.
  const int64_t start = static_cast<int64_t>(chunk) * CHUNK;
  float x[C::kLoads][C::kLvec];
  load_chunk<Tag, CHUNK, true>(rowp, p.V, start, aligned, x);
  const float a = inv_t * kLog2e, b = M_safe * kLog2e;
  float mass[C::kEpt];
  float tt = 0.0f;
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) {
      mass[j * C::kLvec + k] = ex2(fmaf(x[j][k], a, -b));
      tt += mass[j * C::kLvec + k];
    }
  float total;
  const float ex = block_exclusive_scan<C::kWarps>(tt, sh, total);
  int my_first = kBig, my_last = -1;
  float run = 0.0f;
  const int base_e = static_cast<int>(threadIdx.x) * C::kEpt;
#pragma unroll
  for (int i = 0; i < C::kEpt; ++i) {
    run += mass[i];
    const int le = base_e + i;
    if (my_first == kBig && mass[i] > 0.0f && ex + run > local_target) my_first = le;
    if (mass[i] > 0.0f) my_last = le;
  }
  const int first = block_int<IntOp::kMin, C::kWarps>(my_first, sh);
  const int lastm = block_int<IntOp::kMax, C::kWarps>(my_last, sh);
  const int le = first != kBig ? first : (lastm >= 0 ? lastm : 0);
  return start + le;
}

// Largest key t >= key_floor such that the tokens with key >= t number at least k (MASS false) or carry a
// mass exp(l - M) of at least `need` (MASS true): 32 halvings of the int32 key range, one pass each.
template <typename Tag, int CHUNK, bool MASS>
__device__ int64_t threshold_bisect(const typename Tag::storage* rowp, int64_t V, int nc, float a, float b,
                                    int64_t k, float need, int64_t key_floor, bool aligned,
                                    Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  int64_t lo = key_floor, hi = 2147483648LL;
  for (int it = 0; it < 32; ++it) {
    const int64_t mid = lo + (hi - lo) / 2;
    float msum = 0.0f;
    int cnt = 0;
    for (int c = 0; c < nc; ++c) {
      const int64_t start = static_cast<int64_t>(c) * CHUNK;
      float x[C::kLoads][C::kLvec];
      load_chunk<Tag, CHUNK, false>(rowp, V, start, aligned, x);
#pragma unroll
      for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
        for (int kk = 0; kk < C::kLvec; ++kk) {
          const int le = local_index<Tag, CHUNK, false>(j) + kk;
          const bool sel = le < CHUNK && start + le < V && static_cast<int64_t>(order_key(x[j][kk])) >= mid;
          if (MASS) {
            msum += sel ? ex2(fmaf(x[j][kk], a, -b)) : 0.0f;
          } else {
            cnt += sel ? 1 : 0;
          }
        }
    }
    bool ok;
    if (MASS) {
      ok = block_sum<C::kWarps>(msum, sh) >= need;
    } else {
      ok = static_cast<int64_t>(block_int<IntOp::kSum, C::kWarps>(cnt, sh)) >= k;
    }
    lo = ok ? mid : lo;
    hi = ok ? hi : mid;
  }
  return lo;
}

template <typename Tag, int CHUNK>
__device__ float kept_mass(const typename Tag::storage* rowp, int64_t V, int nc, float a, float b, int64_t key_floor,
                           bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  float msum = 0.0f;
  for (int c = 0; c < nc; ++c) {
    const int64_t start = static_cast<int64_t>(c) * CHUNK;
    float x[C::kLoads][C::kLvec];
    load_chunk<Tag, CHUNK, false>(rowp, V, start, aligned, x);
#pragma unroll
    for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
      for (int kk = 0; kk < C::kLvec; ++kk) {
        const int le = local_index<Tag, CHUNK, false>(j) + kk;
        const bool sel = le < CHUNK && start + le < V && static_cast<int64_t>(order_key(x[j][kk])) >= key_floor;
        msum += sel ? ex2(fmaf(x[j][kk], a, -b)) : 0.0f;
      }
  }
  return block_sum<C::kWarps>(msum, sh);
}

// Exact top-k then top-p (ties at a threshold kept), then inverse-CDF sampling by one walk over the row.
template <typename Tag, int CHUNK>
__device__ int64_t sample_filtered(const typename Tag::storage* rowp, int64_t V, int nc, float inv_t, float M,
                                   int64_t k, float top_p, float u, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  const float a = inv_t * kLog2e, b = M * kLog2e;
  int64_t key_floor = INT32_MIN;
  if (k > 0 && k < V) key_floor = threshold_bisect<Tag, CHUNK, false>(rowp, V, nc, a, b, k, 0.0f, key_floor, aligned, sh);
  float total = kept_mass<Tag, CHUNK>(rowp, V, nc, a, b, key_floor, aligned, sh);
  if (top_p < 1.0f) {
    key_floor = threshold_bisect<Tag, CHUNK, true>(rowp, V, nc, a, b, 0, top_p * total, key_floor, aligned, sh);
    total = kept_mass<Tag, CHUNK>(rowp, V, nc, a, b, key_floor, aligned, sh);
  }
  const float target = u * total;
  float acc = 0.0f;
  int64_t last = -1;
  for (int c = 0; c < nc; ++c) {
    const int64_t start = static_cast<int64_t>(c) * CHUNK;
    float x[C::kLoads][C::kLvec];
    load_chunk<Tag, CHUNK, true>(rowp, V, start, aligned, x);
    float mass[C::kEpt];
    float tt = 0.0f;
    const int base_e = static_cast<int>(threadIdx.x) * C::kEpt;
#pragma unroll
    for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
      for (int kk = 0; kk < C::kLvec; ++kk) {
        const int i = j * C::kLvec + kk;
        const int le = base_e + i;
        const bool sel = le < CHUNK && start + le < V && static_cast<int64_t>(order_key(x[j][kk])) >= key_floor;
        mass[i] = sel ? ex2(fmaf(x[j][kk], a, -b)) : 0.0f;
        tt += mass[i];
      }
    float tile_total;
    const float ex = block_exclusive_scan<C::kWarps>(tt, sh, tile_total);
    int my_first = kBig, my_last = -1;
    float run = 0.0f;
#pragma unroll
    for (int i = 0; i < C::kEpt; ++i) {
      run += mass[i];
      if (my_first == kBig && mass[i] > 0.0f && acc + (ex + run) > target) my_first = base_e + i;
      if (mass[i] > 0.0f) my_last = base_e + i;
    }
    const int first = block_int<IntOp::kMin, C::kWarps>(my_first, sh);
    const int lastm = block_int<IntOp::kMax, C::kWarps>(my_last, sh);
    if (lastm >= 0) last = start + lastm;
    if (first != kBig) return start + first;
    acc = acc + tile_total;
  }
  return last;
}

// ---------------------------------------------------------------- pass 2: the row's finish

template <typename Tag, int CHUNK>
__device__ void finish_row(const Params& p, int64_t row, const typename Tag::storage* rowp, float temp, float inv_t,
                           bool need_raw, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  const int nc = p.C;
  const int64_t plane = p.B * static_cast<int64_t>(nc);
  const float* pm_row = p.part + row * nc;
  const float* ps_row = pm_row + plane;
  const float* pd_row = ps_row + plane;
  const float* pmr_row = pd_row + plane;
  const float* psr_row = pmr_row + plane;
  const bool greedy = temp == 0.0f;

  // Merge the chunk partials in chunk order: the row max, then the masses relative to it.
  float M = neg_inf(), Mr = neg_inf();
  for (int c = threadIdx.x; c < nc; c += C::kThreads) {
    M = fmaxf(M, __ldcg(pm_row + c));
    if (need_raw) Mr = fmaxf(Mr, __ldcg(pmr_row + c));
  }
  M = block_max<C::kWarps>(M, sh);
  Mr = need_raw ? block_max<C::kWarps>(Mr, sh) : M;
  const float M_safe = M == neg_inf() ? 0.0f : M;
  const float Mr_safe = Mr == neg_inf() ? 0.0f : Mr;
  float sums[3] = {0.0f, 0.0f, 0.0f};  // S, D (sum of exp(l - M) * (l - M)), Sr
  for (int c = threadIdx.x; c < nc; c += C::kThreads) {
    const float pm = __ldcg(pm_row + c), ps = __ldcg(ps_row + c), pd = __ldcg(pd_row + c);
    float f;
    const float w = chunk_weight(pm, ps, M_safe, f);
    sums[0] += w;
    sums[1] += w > 0.0f ? f * (pd + (pm - M_safe) * ps) : 0.0f;
    if (need_raw) {
      float fr;
      sums[2] += chunk_weight(__ldcg(pmr_row + c), __ldcg(psr_row + c), Mr_safe, fr);
    }
  }
  block_sum_n<C::kWarps, 3>(sums, sh);
  const float S = sums[0], D = sums[1], Sr = need_raw ? sums[2] : S;
  const bool valid = S > 0.0f && S < pos_inf() && M < pos_inf() && Sr > 0.0f && Sr < pos_inf();

  int64_t token = 0;
  if (valid) {
    if (greedy) {
      int first = kBig;
      for (int c = threadIdx.x; c < nc; c += C::kThreads)
        if (__ldcg(pm_row + c) == M) first = min(first, __ldcg(p.part_idx + row * nc + c));
      token = block_int<IntOp::kMin, C::kWarps>(first, sh);
    } else {
      const float u = philox_uniform(row_value(p.seed, row), row_value(p.offset, row));
      const int64_t k = row_value(p.top_k, row);
      const float top_p = row_value(p.top_p, row);
      if ((k > 0 && k < p.V) || top_p < 1.0f) {
        token = sample_filtered<Tag, CHUNK>(rowp, p.V, nc, inv_t, M, k, top_p, u, aligned, sh);
      } else {
        token = sample_chunked<Tag, CHUNK>(p, row, rowp, inv_t, M_safe, S, u, aligned, sh);
      }
    }
    token = token < 0 ? 0 : (token >= p.V ? p.V - 1 : token);  // never reached for a valid row; memory safety
  }
  if (threadIdx.x != 0) return;

  const float nan = nan_f();
  float regret = nan;
  if (!valid) {
    p.out.tokens[row] = -1;
    p.out.logprobs[row] = nan;
    p.out.raw_logprobs[row] = nan;
    p.out.entropy[row] = nan;
    p.out.max_logprob[row] = nan;
    p.out.regret[row] = nan;
  } else {
    const float x_tok = Tag::load1(rowp + token);
    const float l_tok = x_tok * inv_t;
    const float log_s = logf(S);
    regret = greedy ? 0.0f : M - l_tok;
    p.out.tokens[row] = token;
    p.out.logprobs[row] = greedy ? 0.0f : l_tok - M - log_s;
    p.out.raw_logprobs[row] = x_tok - Mr - logf(Sr);
    p.out.entropy[row] = greedy ? 0.0f : log_s - D / S;
    p.out.max_logprob[row] = greedy ? 0.0f : -log_s;
    p.out.regret[row] = regret;
  }
  p.out.valid[row] = valid;

  if (p.has_stop) {
    const StopState& st = p.st;
    const int64_t srow = st.rows != nullptr ? st.rows[row] : row;
    if (srow < 0 || srow >= st.num_rows) {  // espo.sample validates stopper_rows; this only keeps memory safe
      st.stop[row] = false;
      return;
    }
    const bool stopped = st.stopped[srow];
    const bool live = !stopped;
    const bool counted = live && valid;
    const float g = counted ? regret : 0.0f;
    const float mean = st.scalars[0], var = st.scalars[1], beta = st.scalars[2];
    const float armed = st.scalars[3], ready = st.scalars[4];
    const float g_norm = fminf(fmaxf((g - mean) / sqrtf(var + st.delta), -st.clip), st.clip);
    const float z_old = st.z[srow];
    const float z = st.alpha_s * z_old + st.one_minus_alpha_s * g_norm;
    const float value = st.values != nullptr ? st.values[row] : st.value_floor;
    const int32_t position = st.position[srow];
    const bool stop = counted && armed > 0.0f && ready > 0.0f && static_cast<int64_t>(position) >= st.min_tokens &&
                      z > beta * fmaxf(value, st.value_floor);
    st.z[srow] = counted ? z : z_old;
    st.sum_g[srow] = st.sum_g[srow] + g;
    st.sum_g2[srow] = st.sum_g2[srow] + g * g;
    st.count[srow] = st.count[srow] + (counted ? 1 : 0);
    st.position[srow] = position + (live ? 1 : 0);
    st.stopped[srow] = stopped || stop;
    st.stop[row] = stopped || stop;
  }
}

// ---------------------------------------------------------------- the kernel: block (row, chunk)

template <typename Tag, int CHUNK>
__global__ void __launch_bounds__(Cfg<Tag, CHUNK>::kThreads, Cfg<Tag, CHUNK>::kMinBlocks) sample_kernel(const Params p) {
  using C = Cfg<Tag, CHUNK>;
  __shared__ Shared<C::kWarps> sh;
  const int64_t row = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(p.C));
  const int c = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.C));
  const typename Tag::storage* rowp = static_cast<const typename Tag::storage*>(p.logits) + row * p.stride;
  const bool aligned = (reinterpret_cast<uintptr_t>(rowp) & 15u) == 0;

  const float temp = row_value(p.temperature, row);
  const bool greedy = temp == 0.0f;
  const float inv_t = 1.0f / (greedy ? 1.0f : temp);
  const bool need_raw = inv_t != 1.0f;  // at temperature 0 or 1 the temperature-1 sums are the same sums

  const Partial part = chunk_stats<Tag, CHUNK>(rowp, p.V, static_cast<int64_t>(c) * CHUNK, inv_t, need_raw, greedy,
                                               aligned, sh);
  if (threadIdx.x == 0) {
    const int64_t plane = p.B * static_cast<int64_t>(p.C);
    float* out = p.part + row * p.C + c;
    out[0] = part.m;
    out[plane] = part.s;
    out[2 * plane] = part.d;
    if (need_raw) {
      out[3 * plane] = part.mr;
      out[4 * plane] = part.sr;
    }
    if (greedy) p.part_idx[row * p.C + c] = part.idx;
    __threadfence();  // publish the partials before counting this block as arrived
    const unsigned before = atomicAdd(p.arrived + row, 1u);
    sh.is_last = before == static_cast<unsigned>(p.C - 1);
  }
  __syncthreads();
  if (!sh.is_last) return;
  __threadfence();  // the other blocks' partials are visible now; they are read with ld.cg (L2)
  finish_row<Tag, CHUNK>(p, row, rowp, temp, inv_t, need_raw, aligned, sh);
}

template <typename Tag, int CHUNK>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  const int64_t blocks = p.B * static_cast<int64_t>(p.C);
  sample_kernel<Tag, CHUNK><<<static_cast<unsigned>(blocks), Cfg<Tag, CHUNK>::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Tag>
cudaError_t launch_chunk(const Params& p, int64_t chunk, cudaStream_t stream) {
  switch (chunk) {
    case 16: return launch<Tag, 16>(p, stream);
    case 32: return launch<Tag, 32>(p, stream);
    case 64: return launch<Tag, 64>(p, stream);
    case 128: return launch<Tag, 128>(p, stream);
    case 256: return launch<Tag, 256>(p, stream);
    case 512: return launch<Tag, 512>(p, stream);
    case 1024: return launch<Tag, 1024>(p, stream);
    case 2048: return launch<Tag, 2048>(p, stream);
    case 4096: return launch<Tag, 4096>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

size_t sample_workspace_bytes(int64_t batch, int64_t vocab) {
  const size_t bc = static_cast<size_t>(batch) * static_cast<size_t>(num_chunks(vocab));
  return align_up(5 * bc * sizeof(float)) + align_up(bc * sizeof(int)) + align_up(static_cast<size_t>(batch) * sizeof(unsigned));
}

int sample_launch(const SampleArgs& args, const SampleOutputs& out, const StopState* stop_state, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream) {
  if (args.batch < 1 || args.vocab < 1 || args.logits == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t chunk = chunk_size(args.vocab);
  const int64_t nc = num_chunks(args.vocab);
  if (args.batch * nc > static_cast<int64_t>(INT_MAX) || args.vocab > static_cast<int64_t>(INT_MAX) - chunk)
    return cudaErrorInvalidValue;
  if (workspace_bytes < sample_workspace_bytes(args.batch, args.vocab)) return cudaErrorInvalidValue;

  Params p;
  p.logits = args.logits;
  p.B = args.batch;
  p.V = args.vocab;
  p.stride = args.row_stride;
  p.C = static_cast<int>(nc);
  p.temperature = args.temperature;
  p.top_k = args.top_k;
  p.top_p = args.top_p;
  p.seed = args.seed;
  p.offset = args.offset;
  const size_t bc = static_cast<size_t>(args.batch) * static_cast<size_t>(nc);
  char* ws = static_cast<char*>(workspace);
  p.part = reinterpret_cast<float*>(ws);
  p.part_idx = reinterpret_cast<int*>(ws + align_up(5 * bc * sizeof(float)));
  p.arrived = reinterpret_cast<unsigned*>(ws + align_up(5 * bc * sizeof(float)) + align_up(bc * sizeof(int)));
  p.out = out;
  p.has_stop = stop_state != nullptr;
  if (stop_state != nullptr) {
    p.st = *stop_state;
  } else {
    p.st = StopState{};
  }

  cudaError_t err = cudaMemsetAsync(p.arrived, 0, static_cast<size_t>(args.batch) * sizeof(unsigned), stream);
  if (err != cudaSuccess) return err;
  switch (args.dtype) {
    case LogitsType::kFloat32: err = launch_chunk<F32>(p, chunk, stream); break;
    case LogitsType::kBFloat16: err = launch_chunk<BF16>(p, chunk, stream); break;
    case LogitsType::kFloat16: err = launch_chunk<F16>(p, chunk, stream); break;
    default: err = cudaErrorInvalidValue;
  }
  return static_cast<int>(err);
}

}  // namespace espo
