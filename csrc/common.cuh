// Device helpers shared by the sampling kernels (csrc/sample_kernels.cuh) and the top-k/top-p search (csrc/filter.cuh):
// element types and loads, deterministic block reductions, and the integer masses of espo/ops/reference.py.
// Included by csrc/sample_kernels.cuh; everything is in an anonymous namespace of each kernel translation unit.
#pragma once

#include "sample.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

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


}  // namespace
}  // namespace espo
