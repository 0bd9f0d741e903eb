// Fused sample-and-score with the ESPO stop update: the CUDA kernels (no torch headers; see sample.cuh).
//
// Bit-level contract with the Triton backend (kernels/sample.py): the same Philox draw per row, the same
// chunk partition of the vocabulary (chunk_size), and the same exact integer sampling rule, defined in
// espo/ops/reference.py: per element y = fl(x * a) with a = fl(fl(1 / T) * LOG2E_F32), per chunk the integer
// reference r_c = ceil(max y), per element the integer mass q = trunc(fl(ex2(fl(y - r_c)) * 2**S)) with
// ex2.approx.ftz.f32 (what Triton's kernel issues by inline PTX), chunk sums shifted to the row reference
// R = max r_c, target = trunc(double(u) * double(Z)), then the first chunk and the first token whose
// integer cumulative mass exceeds it. Every rounding step is explicit (__fmul_rn, __fsub_rn, __fdiv_rn: no
// FMA contraction) and the sums are integers, so the order of the reductions does not matter and both
// backends draw the same token bit for bit. Rows with top-k/top-p find their exact thresholds by the same
// 32-step bisection on the same order-preserving int32 key (integer masses for top-p), then walk the row.
// The float statistics reuse the per-element ex2 (sums of f = 2**(y - r_c) and f * (y - r_c) per chunk,
// rescaled by powers of two at the merge), so they cost no second exponential.
//
// Performance notes: one block per (row, chunk) streams the logits with 16-byte vector loads (8 bf16 or
// 4 fp32 per load, 2 to 4 loads in flight per thread, all issued before any use), reduces with warp
// shuffles and a few shared-memory words, and per element spends one multiply, one subtract, one MUFU
// ex2, one multiply and float->int64 conversion, a 64-bit add and the float sums. The per-row finish runs
// in the same launch, in the last block of the row to finish (per-row arrival counter), so no second
// launch and no tail of a second kernel: the chosen chunk is re-read while it is still in L2.
#include "philox.cuh"
#include "sample.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.cuh"

#include <limits.h>
#include <stdint.h>

namespace espo {
namespace {

constexpr float kLog2e = 1.44269502162933349609375f;  // float32(log2(e)) exactly: espo.ops.reference.LOG2E_F32
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kBig = INT_MAX;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }

// 2**x by the MUFU unit (what Triton's tl.exp lowers to, after its multiply by log2(e)); 2**-inf = 0.
__device__ __forceinline__ float ex2(float x) {
#ifdef ESPO_CPU_EMULATION
  // The CPU emulation (tests/cuda_cpu): 2**x correctly rounded, as espo/ops/reference.py computes it (in float64,
  // then rounded to float32), with the instruction's flush of a subnormal result to 0.
  const float y = static_cast<float>(exp2(static_cast<double>(x)));
  return fabsf(y) < 1.17549435e-38f ? 0.0f : y;
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
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

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return min(a, b); }
};

template <typename Op, typename T>
__device__ __forceinline__ T warp_reduce(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = Op{}(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

template <int W>
struct Shared {
  float f[4 * W];
  int i[W];
  long long ll[W];
  long long pick_excl;  // sample_chunked: the chosen chunk's exclusive prefix of W
  float stats[4];       // finish_row: the merged statistics, parked here while the token is drawn
  int is_last;
};

// The per-warp scratch slots of each value type.
template <int W> __device__ __forceinline__ float* scratch(Shared<W>& sh, float) { return sh.f; }
template <int W> __device__ __forceinline__ int* scratch(Shared<W>& sh, int) { return sh.i; }
template <int W> __device__ __forceinline__ long long* scratch(Shared<W>& sh, long long) { return sh.ll; }

// One value per thread reduced over the block; every thread returns the result. Integer sums are exact,
// so any order gives the same bits; float results depend only on the (fixed) warp order.
template <typename Op, int W, typename T>
__device__ __forceinline__ T block_reduce(T v, Shared<W>& sh) {
  v = warp_reduce<Op>(v);
  if constexpr (W > 1) {
    T* slot = scratch(sh, v);
    if ((threadIdx.x & 31) == 0) slot[threadIdx.x >> 5] = v;
    __syncthreads();
    v = slot[0];
#pragma unroll
    for (int w = 1; w < W; ++w) v = Op{}(v, slot[w]);
    __syncthreads();
  }
  return v;
}

// N float sums at once (one pair of barriers for all of them).
template <int W, int N>
__device__ __forceinline__ void block_sum_n(float (&v)[N], Shared<W>& sh) {
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = warp_reduce<SumOp>(v[n]);
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

// Exclusive prefix sum of one int64 per thread, in thread order; `total` gets the block's sum.
template <int W>
__device__ __forceinline__ long long block_exclusive_scan_ll(long long v, Shared<W>& sh, long long& total) {
  const int lane = threadIdx.x & 31;
  long long inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long n = __shfl_up_sync(kFull, inc, o);
    if (lane >= o) inc += n;
  }
  long long ex = inc - v;
  if constexpr (W == 1) {
    total = __shfl_sync(kFull, inc, 31);
  } else {
    const int warp = threadIdx.x >> 5;
    if (lane == 31) sh.ll[warp] = inc;
    __syncthreads();
    long long before = 0, all = 0;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      if (w < warp) before += sh.ll[w];
      all += sh.ll[w];
    }
    __syncthreads();
    ex += before;
    total = all;
  }
  return ex;
}

// ---------------------------------------------------------------- parameters

struct Params {
  const void* logits;
  int64_t B, V, stride;
  int C;
  float two_s;  // 2**S, S = mass_shift(V): integer masses q < 2**S
  RowArg<float> temperature;
  RowArg<int64_t> top_k;
  RowArg<float> top_p;
  RowArg<int64_t> seed;
  RowArg<int64_t> offset;
  float* part;        // [5, B, C]: max x, sum f, sum f * d, max y, raw sum (f = 2**d, d = y - r_c)
  long long* part_q;  // [B, C]: sum of the integer masses q
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

// ---------------------------------------------------------------- the integer masses (espo/ops/reference.py)

// a = fl(fl(1 / T) * LOG2E_F32), the per-row factor of y = fl(x * a).
__device__ __forceinline__ float base2_factor(float inv_t) { return __fmul_rn(inv_t, kLog2e); }

// The chunk (or row) reference ceil(max y) as a float; 0 stands in for -inf (no mass: every q is 0).
__device__ __forceinline__ float safe_reference(float r) { return r == neg_inf() ? 0.0f : r; }

// d = fl(fl(x * a) - ref), f = ex2(d), q = trunc(fl(f * 2**S)): the same bits as kernels/sample.py _masses.
__device__ __forceinline__ long long integer_mass(float x, float a, float ref, float two_s, float& d, float& f) {
  d = __fsub_rn(__fmul_rn(x, a), ref);
  f = ex2(d);
  return __float2ll_rz(__fmul_rn(f, two_s));
}
__device__ __forceinline__ long long integer_mass(float x, float a, float ref, float two_s) {
  float d, f;
  return integer_mass(x, a, ref, two_s, d, f);
}

// ---------------------------------------------------------------- pass 1: one chunk's statistics

struct Partial {
  float mx, s, d, ymax, sr;
  long long q;
  int idx;
};

template <typename Tag, int CHUNK>
__device__ __forceinline__ Partial chunk_stats(const typename Tag::storage* row, int64_t V, int64_t start, float inv_t,
                                               float two_s, bool need_raw, bool greedy, bool aligned,
                                               Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  float x[C::kLoads][C::kLvec];
  load_chunk<Tag, CHUNK, false>(row, V, start, aligned, x);

  float mx = neg_inf();
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) mx = fmaxf(mx, x[j][k]);
  mx = block_reduce<MaxOp, C::kWarps>(mx, sh);
  // max over the chunk of y = fl(x * a): rounding is monotone and a > 0, so it is fl(max x * a).
  const float a = base2_factor(inv_t);
  const float ymax = __fmul_rn(mx, a);
  const float ref = safe_reference(ceilf(ymax));
  const float mr_safe = mx == neg_inf() ? 0.0f : mx;

  float acc[3] = {0.0f, 0.0f, 0.0f};  // sum f, sum f * d (log2 units), sum exp(x - mx)
  long long qsum = 0;
  int idx = kBig;
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j) {
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) {
      const float xv = x[j][k];
      float d, f;
      qsum += integer_mass(xv, a, ref, two_s, d, f);
      acc[0] += f;
      // f * d, and 0 where f == 0 (d may be -inf there): ex2 flushes below 2**-126, so f > 0 implies
      // d > -127 and the clamp changes nothing else.
      acc[1] = fmaf(f, fmaxf(d, -256.0f), acc[1]);
      // (x - max) first: max * log2(e) alone leaves the float32 range for |max| > 2.36e38
      if (need_raw) acc[2] += ex2((xv - mr_safe) * kLog2e);
      if (greedy) {
        const int le = local_index<Tag, CHUNK, false>(j) + k;
        if (xv == mx && le < CHUNK && start + le < V) idx = min(idx, le);
      }
    }
  }
  block_sum_n<C::kWarps, 3>(acc, sh);
  qsum = block_reduce<SumOp, C::kWarps>(qsum, sh);
  if (greedy) idx = block_reduce<MinOp, C::kWarps>(idx, sh);
  Partial p;
  p.mx = mx;
  p.s = acc[0];
  p.d = acc[1];
  p.ymax = ymax;
  p.sr = acc[2];
  p.q = qsum;
  p.idx = idx == kBig ? kBig : static_cast<int>(start) + idx;
  return p;
}

// ---------------------------------------------------------------- pass 2 helpers: the merged row

// A chunk's raw mass relative to the row's raw max, exp(pm - M) * ps; NaN sums stay NaN so the row is flagged.
__device__ __forceinline__ float chunk_weight(float pm, float ps, float M_safe) {
  const float f = ex2((pm - M_safe) * kLog2e);
  const float w = ps > 0.0f ? ps * f : 0.0f;
  return ps != ps ? ps : w;
}

// R - r_c as a right shift of the chunk's integer sum (63 for a chunk without mass: its sum is 0 anyway).
__device__ __forceinline__ int chunk_shift(float rc, float R) {
  const float s = R - rc;
  return rc > neg_inf() && s < 63.0f ? static_cast<int>(s) : 63;
}

// Integer inverse CDF over the unfiltered row (espo/ops/reference.py steps 2-4): choose the chunk from the
// shifted chunk sums, then re-read that chunk and find the first token whose shifted running sum exceeds
// what is left of the target.
template <typename Tag, int CHUNK>
__device__ int64_t sample_chunked(const Params& p, int64_t row, const typename Tag::storage* rowp, float a, float R,
                                  float u, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  const int nc = p.C;
  const int64_t plane = p.B * static_cast<int64_t>(nc);
  const float* py_row = p.part + row * nc + 3 * plane;
  const long long* pq_row = p.part_q + row * nc;

  long long z = 0;
  for (int c = threadIdx.x; c < nc; c += C::kThreads) z += __ldcg(pq_row + c) >> chunk_shift(ceilf(__ldcg(py_row + c)), R);
  const long long Z = block_reduce<SumOp, C::kWarps>(z, sh);
  const long long target = static_cast<long long>(__dmul_rn(static_cast<double>(u), __ll2double_rn(Z)));

  long long carry = 0;
  int found = kBig;
  for (int base = 0; base < nc; base += C::kThreads) {
    const int c = base + static_cast<int>(threadIdx.x);
    const long long w = c < nc ? __ldcg(pq_row + c) >> chunk_shift(ceilf(__ldcg(py_row + c)), R) : 0;
    long long tile_total;
    const long long ex = block_exclusive_scan_ll<C::kWarps>(w, sh, tile_total);
    const long long cum = carry + ex + w;
    const bool hit = c < nc && cum > target;
    const int first = block_reduce<MinOp, C::kWarps>(hit ? c : kBig, sh);
    if (first != kBig && c == first) sh.pick_excl = cum - w;
    __syncthreads();
    if (first != kBig) {
      found = first;
      break;
    }
    carry += tile_total;
  }
  const int chunk = found != kBig ? found : 0;  // Z == 0 only for an invalid row
  const long long t = found != kBig ? target - sh.pick_excl : 0;
  const float rc = ceilf(__ldcg(py_row + chunk));
  const int shift = chunk_shift(rc, R);
  const float ref = safe_reference(rc);
  __syncthreads();

  // Re-read the chosen chunk (blocked layout: each thread's elements are consecutive) and scan it.
  const int64_t start = static_cast<int64_t>(chunk) * CHUNK;
  float x[C::kLoads][C::kLvec];
  load_chunk<Tag, CHUNK, true>(rowp, p.V, start, aligned, x);
  // Two passes over the thread's elements (the masses are recomputed, bit for bit, rather than kept in
  // registers): the thread's total for the block scan, then its running sums.
  long long tt = 0;
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) tt += integer_mass(x[j][k], a, ref, p.two_s);
  long long total;
  long long run = block_exclusive_scan_ll<C::kWarps>(tt, sh, total);
  int my_first = kBig;
  const int base_e = static_cast<int>(threadIdx.x) * C::kEpt;
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) {
      run += integer_mass(x[j][k], a, ref, p.two_s);
      if (my_first == kBig && (run >> shift) > t) my_first = base_e + j * C::kLvec + k;
    }
  const int first = block_reduce<MinOp, C::kWarps>(my_first, sh);
  return start + (first != kBig ? first : 0);  // always found for a valid row
}

// Over the tokens whose order key is >= floor: their count (MASS false) or their integer mass qg.
template <typename Tag, int CHUNK, bool MASS>
__device__ long long sum_above(const typename Tag::storage* rowp, int64_t V, int nc, float a, float ref, float two_s,
                               int64_t floor, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  long long sum = 0;
  for (int c = 0; c < nc; ++c) {
    const int64_t start = static_cast<int64_t>(c) * CHUNK;
    float x[C::kLoads][C::kLvec];
    load_chunk<Tag, CHUNK, false>(rowp, V, start, aligned, x);
#pragma unroll
    for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
      for (int kk = 0; kk < C::kLvec; ++kk) {
        const int le = local_index<Tag, CHUNK, false>(j) + kk;
        const bool sel = le < CHUNK && start + le < V && static_cast<int64_t>(order_key(x[j][kk])) >= floor;
        if (MASS) {
          sum += sel ? integer_mass(x[j][kk], a, ref, two_s) : 0;
        } else {
          sum += sel ? 1 : 0;
        }
      }
  }
  return block_reduce<SumOp, C::kWarps>(sum, sh);
}

// Largest key t >= key_floor whose sum_above is at least `need`: 32 halvings of the int32 key range.
template <typename Tag, int CHUNK, bool MASS>
__device__ int64_t threshold_bisect(const typename Tag::storage* rowp, int64_t V, int nc, float a, float ref,
                                    float two_s, long long need, int64_t key_floor, bool aligned,
                                    Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  int64_t lo = key_floor, hi = 2147483648LL;
  for (int it = 0; it < 32; ++it) {
    const int64_t mid = lo + (hi - lo) / 2;
    const bool ok = sum_above<Tag, CHUNK, MASS>(rowp, V, nc, a, ref, two_s, mid, aligned, sh) >= need;
    lo = ok ? mid : lo;
    hi = ok ? hi : mid;
  }
  return lo;
}

// Exact top-k then top-p (ties at a threshold kept) on the global integer masses qg (reference step 5),
// then integer inverse-CDF sampling by one walk over the row.
template <typename Tag, int CHUNK>
__device__ int64_t sample_filtered(const typename Tag::storage* rowp, int64_t V, int nc, float a, float R, float two_s,
                                   int64_t k, float top_p, float u, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  int64_t key_floor = INT32_MIN;
  if (k > 0 && k < V) key_floor = threshold_bisect<Tag, CHUNK, false>(rowp, V, nc, a, R, two_s, k, key_floor, aligned, sh);
  long long total = sum_above<Tag, CHUNK, true>(rowp, V, nc, a, R, two_s, key_floor, aligned, sh);
  if (top_p < 1.0f) {
    const long long need = static_cast<long long>(ceil(__dmul_rn(static_cast<double>(top_p), __ll2double_rn(total))));
    key_floor = threshold_bisect<Tag, CHUNK, true>(rowp, V, nc, a, R, two_s, need, key_floor, aligned, sh);
    total = sum_above<Tag, CHUNK, true>(rowp, V, nc, a, R, two_s, key_floor, aligned, sh);
  }
  const long long target = static_cast<long long>(__dmul_rn(static_cast<double>(u), __ll2double_rn(total)));
  long long acc = 0;
  for (int c = 0; c < nc; ++c) {
    const int64_t start = static_cast<int64_t>(c) * CHUNK;
    float x[C::kLoads][C::kLvec];
    load_chunk<Tag, CHUNK, true>(rowp, V, start, aligned, x);
    const int base_e = static_cast<int>(threadIdx.x) * C::kEpt;
    // An element's kept mass, computed in both loops below: holding the int64 masses in registers between
    // them instead adds spills to a finish kernel that already spills (ptxas -v, sm_90), and ex2 is cheap.
    auto kept_mass = [&](int j, int kk) -> long long {
      const int le = base_e + j * C::kLvec + kk;
      const bool sel = le < CHUNK && start + le < V && static_cast<int64_t>(order_key(x[j][kk])) >= key_floor;
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
  return 0;  // never reached for a valid row (target < total)
}

// ---------------------------------------------------------------- pass 2: the row's finish

template <typename Tag, int CHUNK>
__device__ void finish_row(const Params& p, int64_t row, const typename Tag::storage* rowp, float temp, float inv_t,
                           bool need_raw, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  const int nc = p.C;
  const int64_t plane = p.B * static_cast<int64_t>(nc);
  const float* pmx_row = p.part + row * nc;
  const float* ps_row = pmx_row + plane;
  const float* pd_row = ps_row + plane;
  const float* py_row = pd_row + plane;
  const float* psr_row = py_row + plane;
  const bool greedy = temp == 0.0f;

  // Merge the chunk partials: the row's max logit and max y, then the float sums rescaled to R.
  float Mx = neg_inf(), Y = neg_inf();
  for (int c = threadIdx.x; c < nc; c += C::kThreads) {
    Mx = fmaxf(Mx, __ldcg(pmx_row + c));
    Y = fmaxf(Y, __ldcg(py_row + c));
  }
  Mx = block_reduce<MaxOp, C::kWarps>(Mx, sh);
  Y = block_reduce<MaxOp, C::kWarps>(Y, sh);
  const float R = safe_reference(ceilf(Y));  // = max_c r_c
  const float Y_safe = Y == neg_inf() ? 0.0f : Y;
  const float Mx_safe = Mx == neg_inf() ? 0.0f : Mx;
  float sums[3] = {0.0f, 0.0f, 0.0f};  // S = sum 2**(y - R), D = sum 2**(y - R) * (y - R), Sr
  for (int c = threadIdx.x; c < nc; c += C::kThreads) {
    const float ps = __ldcg(ps_row + c), pd = __ldcg(pd_row + c), rc = ceilf(__ldcg(py_row + c));
    const float e = rc - R;  // an integer <= 0, or -inf
    const float scale = e > -200.0f ? ldexpf(1.0f, static_cast<int>(e)) : 0.0f;
    float w = ps > 0.0f ? ps * scale : 0.0f;
    w = ps != ps ? ps : w;
    sums[0] += w;
    sums[1] += w > 0.0f ? scale * (pd + e * ps) : 0.0f;
    if (need_raw) sums[2] += chunk_weight(__ldcg(pmx_row + c), __ldcg(psr_row + c), Mx_safe);
  }
  block_sum_n<C::kWarps, 3>(sums, sh);
  const float S = sums[0];
  const float log_S = logf(S);
  const float log_s = log_S + (R - Y_safe) * kLn2;  // log of the sum of exp(l - M)
  const float raw_log_s = need_raw ? logf(sums[2]) : log_s;
  const bool valid = S > 0.0f && S < pos_inf() && Mx < pos_inf() && raw_log_s == raw_log_s && raw_log_s < pos_inf();
  if (threadIdx.x == 0) {  // only thread 0 writes the outputs; parked in shared memory, not in registers
    sh.stats[0] = Mx;
    sh.stats[1] = log_s;
    sh.stats[2] = raw_log_s;
    sh.stats[3] = log_S - kLn2 * (sums[1] / S);  // the entropy
  }

  int64_t token = 0;
  if (valid) {
    if (greedy) {
      int first = kBig;
      for (int c = threadIdx.x; c < nc; c += C::kThreads)
        if (__ldcg(pmx_row + c) == Mx) first = min(first, __ldcg(p.part_idx + row * nc + c));
      token = block_reduce<MinOp, C::kWarps>(first, sh);
    } else {
      const float u = philox_uniform(row_value(p.seed, row), row_value(p.offset, row));
      const int64_t k = row_value(p.top_k, row);
      const float top_p = row_value(p.top_p, row);
      const float a = base2_factor(inv_t);
      if ((k > 0 && k < p.V) || top_p < 1.0f) {
        token = sample_filtered<Tag, CHUNK>(rowp, p.V, nc, a, R, p.two_s, k, top_p, u, aligned, sh);
      } else {
        token = sample_chunked<Tag, CHUNK>(p, row, rowp, a, R, u, aligned, sh);
      }
    }
    token = token < 0 ? 0 : (token >= p.V ? p.V - 1 : token);  // never reached for a valid row; memory safety
  }
  if (threadIdx.x != 0) return;
  const float Mx0 = sh.stats[0], log_s0 = sh.stats[1], raw_log_s0 = sh.stats[2], entropy = sh.stats[3];
  const float M0 = __fmul_rn(Mx0, inv_t);

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
    const float l_tok = __fmul_rn(x_tok, inv_t);
    regret = greedy ? 0.0f : M0 - l_tok;
    p.out.tokens[row] = token;
    p.out.logprobs[row] = greedy ? 0.0f : l_tok - M0 - log_s0;
    p.out.raw_logprobs[row] = x_tok - Mx0 - raw_log_s0;
    p.out.entropy[row] = greedy ? 0.0f : entropy;
    p.out.max_logprob[row] = greedy ? 0.0f : -log_s0;
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
    const float given = st.values != nullptr ? st.values[row] : st.value_floor;
    const float value = isfinite(given) ? given : st.value_floor;  // NaN or inf: the floor (espo.ops.reference)
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
  const float inv_t = __fdiv_rn(1.0f, greedy ? 1.0f : temp);
  const bool need_raw = inv_t != 1.0f;  // at temperature 0 or 1 the temperature-1 sums are the same sums

  const Partial part = chunk_stats<Tag, CHUNK>(rowp, p.V, static_cast<int64_t>(c) * CHUNK, inv_t, p.two_s, need_raw,
                                               greedy, aligned, sh);
  if (threadIdx.x == 0) {
    const int64_t plane = p.B * static_cast<int64_t>(p.C);
    float* out = p.part + row * p.C + c;
    out[0] = part.mx;
    out[plane] = part.s;
    out[2 * plane] = part.d;
    out[3 * plane] = part.ymax;
    if (need_raw) out[4 * plane] = part.sr;
    p.part_q[row * p.C + c] = part.q;
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
  return launch_kernel(sample_kernel<Tag, CHUNK>, static_cast<unsigned>(blocks), Cfg<Tag, CHUNK>::kThreads, stream, p);
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
  return align_up(5 * bc * sizeof(float)) + align_up(bc * sizeof(long long)) + align_up(bc * sizeof(int)) +
         align_up(static_cast<size_t>(batch) * sizeof(unsigned));
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
  p.two_s = static_cast<float>(1ULL << mass_shift(args.vocab));
  p.temperature = args.temperature;
  p.top_k = args.top_k;
  p.top_p = args.top_p;
  p.seed = args.seed;
  p.offset = args.offset;
  const size_t bc = static_cast<size_t>(args.batch) * static_cast<size_t>(nc);
  char* ws = static_cast<char*>(workspace);
  const size_t q_at = align_up(5 * bc * sizeof(float));
  const size_t idx_at = q_at + align_up(bc * sizeof(long long));
  const size_t arrived_at = idx_at + align_up(bc * sizeof(int));
  p.part = reinterpret_cast<float*>(ws);
  p.part_q = reinterpret_cast<long long*>(ws + q_at);
  p.part_idx = reinterpret_cast<int*>(ws + idx_at);
  p.arrived = reinterpret_cast<unsigned*>(ws + arrived_at);
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
