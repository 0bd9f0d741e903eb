// CPU emulation of the CUDA execution model, for running csrc/ kernels under g++ (tests only).
//
// Compile a .cu file as C++ with -DESPO_CPU_EMULATION and this folder first on the include path: the fake
// <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h> here include this header. Link emulate.cpp.
//
// Model: the blocks of a grid run one after another (in order, or permuted by espo_emu_set_schedule), each
// with all its threads as cooperative fibers on their own stacks. A fiber runs until it reaches
// __syncthreads() or a warp primitive, then yields. __syncthreads() releases when every thread of the block
// that has not returned is waiting at a barrier (a thread that returns leaves the barrier counts, as on
// sm_70+). A warp primitive completes when every lane of its mask has called it (the same primitive, the
// same mask); the result of every lane is computed then. Deadlocks, a lane that leaves a warp primitive's
// mask by returning, misaligned vector loads and reads outside the registered buffers stop the launch with
// an error (cudaErrorLaunchFailure and friends) whose text espo_emu_last_error() gives.
// __shared__ is `static`: a function-static is exactly block-shared memory when blocks run one at a time.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <limits>
#include <type_traits>

#ifndef ESPO_CPU_EMULATION
#error "espo_emulate.h is the CPU emulation of CUDA: compile with -DESPO_CPU_EMULATION"
#endif

// ---------------------------------------------------------------- qualifiers

#define __global__
#define __device__
#define __host__
#define __noinline__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static
#define __restrict__ __restrict
#define __align__(n) alignas(n)

// ---------------------------------------------------------------- runtime types

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
  cudaErrorMisalignedAddress = 716,
};
typedef cudaError_t cudaError;

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned int x, y, z;
};

// What the scheduler sets before every switch to a thread.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------- the emulator's own API

namespace espo_emu {
// Runs body() as every thread of every block of <<<grid, block>>>; returns the launch's error (also kept for
// cudaGetLastError).
cudaError_t launch(dim3 grid, dim3 block, void (*body)(void*), void* ctx);
// Stop the launch from inside a thread with this error and message (does not return).
[[noreturn]] void fail(cudaError_t err, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void check_read(const void* p, size_t bytes, size_t align, const char* what);
void count_vector_load();
void yield_barrier(int op, int pred, int* result);
// A warp exchange: deposit `in`, wait for the mask's lanes, return this lane's result.
uint64_t warp_exchange(int op, unsigned mask, uint64_t in, int arg, int width);
enum WarpOp { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kMatchAny, kSyncWarp,
              kReduceAdd, kReduceMin, kReduceMax, kReduceMinS, kReduceMaxS };
enum BarrierOp { kSync, kSyncCount, kSyncAnd, kSyncOr };
unsigned live_lanes();  // __activemask(): the lanes of this warp that have not returned yet (scheduling-dependent)
}  // namespace espo_emu

// The one launch entry (csrc/launch.cuh calls it): run `body` (a callable with no arguments) as every thread.
template <typename F>
cudaError_t espo_emulate_launch(dim3 grid, dim3 block, F&& body) {
  using Fn = typename std::remove_reference<F>::type;
  return espo_emu::launch(grid, block, [](void* c) { (*static_cast<Fn*>(c))(); }, &body);
}

extern "C" {
// 0 (the default): blocks in grid order and threads in index order; any other seed: both permuted by it.
void espo_emu_set_schedule(unsigned long long seed);
// Reads through __ldg/__ldcg/__ldca/__ldlu/__ldcs and atomics must fall inside a registered buffer (when
// any is registered); misaligned vector loads fail whether or not buffers are registered.
void espo_emu_register_buffer(const void* ptr, size_t bytes);
void espo_emu_clear_buffers(void);
// The text of the last failed launch ("" after a successful one).
const char* espo_emu_last_error(void);
// Counters since the library was loaded: switches into threads (the emulation's cost) and vector loads
// (__ldg of uint2/uint4/int2/int4/float2/float4: which load path a kernel took).
unsigned long long espo_emu_switches(void);
unsigned long long espo_emu_vector_loads(void);
}

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
// Synchronous under emulation (the stream is ignored).
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();

// ---------------------------------------------------------------- synchronisation

inline void __syncthreads() { espo_emu::yield_barrier(espo_emu::kSync, 0, nullptr); }
inline int __syncthreads_count(int pred) {
  int r;
  espo_emu::yield_barrier(espo_emu::kSyncCount, pred != 0, &r);
  return r;
}
inline int __syncthreads_and(int pred) {
  int r;
  espo_emu::yield_barrier(espo_emu::kSyncAnd, pred != 0, &r);
  return r;
}
inline int __syncthreads_or(int pred) {
  int r;
  espo_emu::yield_barrier(espo_emu::kSyncOr, pred != 0, &r);
  return r;
}
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { espo_emu::warp_exchange(espo_emu::kSyncWarp, mask, 0, 0, 32); }
inline unsigned __activemask() { return espo_emu::live_lanes(); }

// ---------------------------------------------------------------- warp primitives

namespace espo_emu {
template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "warp primitives move values of <= 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace espo_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return espo_emu::from_bits<T>(espo_emu::warp_exchange(espo_emu::kShflIdx, mask, espo_emu::to_bits(v), src_lane, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return espo_emu::from_bits<T>(espo_emu::warp_exchange(espo_emu::kShflUp, mask, espo_emu::to_bits(v), delta, width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return espo_emu::from_bits<T>(espo_emu::warp_exchange(espo_emu::kShflDown, mask, espo_emu::to_bits(v), delta, width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return espo_emu::from_bits<T>(espo_emu::warp_exchange(espo_emu::kShflXor, mask, espo_emu::to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(espo_emu::warp_exchange(espo_emu::kBallot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(espo_emu::warp_exchange(espo_emu::kAny, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(espo_emu::warp_exchange(espo_emu::kAll, mask, pred != 0, 0, 32));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  return static_cast<unsigned>(espo_emu::warp_exchange(espo_emu::kMatchAny, mask, espo_emu::to_bits(v), 0, 32));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(espo_emu::warp_exchange(espo_emu::kReduceAdd, mask, v, 0, 32));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(espo_emu::warp_exchange(espo_emu::kReduceMin, mask, v, 0, 32));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(espo_emu::warp_exchange(espo_emu::kReduceMax, mask, v, 0, 32));
}
inline int __reduce_add_sync(unsigned mask, int v) {
  return static_cast<int>(__reduce_add_sync(mask, static_cast<unsigned>(v)));
}
inline int __reduce_min_sync(unsigned mask, int v) {
  return static_cast<int>(espo_emu::warp_exchange(espo_emu::kReduceMinS, mask, static_cast<uint32_t>(v), 0, 32));
}
inline int __reduce_max_sync(unsigned mask, int v) {
  return static_cast<int>(espo_emu::warp_exchange(espo_emu::kReduceMaxS, mask, static_cast<uint32_t>(v), 0, 32));
}

// ---------------------------------------------------------------- vector types

#define ESPO_EMU_VEC(name, T, align)                                \
  struct alignas(align) name##2 { T x, y; };                        \
  struct alignas(align * 2 > 16 ? 16 : align * 2) name##4 { T x, y, z, w; }; \
  inline name##2 make_##name##2(T x, T y) { return {x, y}; }        \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return {x, y, z, w}; }
ESPO_EMU_VEC(uint, unsigned int, 8)
ESPO_EMU_VEC(int, int, 8)
ESPO_EMU_VEC(float, float, 8)
#undef ESPO_EMU_VEC
struct alignas(16) ulonglong2 { unsigned long long x, y; };
struct alignas(16) longlong2 { long long x, y; };
struct alignas(16) double2 { double x, y; };

// ---------------------------------------------------------------- loads (checked) and atomics

template <typename T>
inline T __ldg(const T* p) {
  espo_emu::check_read(p, sizeof(T), alignof(T) > sizeof(T) ? sizeof(T) : alignof(T), "__ldg");
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline T __ldcg(const T* p) { return __ldg(p); }
template <typename T>
inline T __ldca(const T* p) { return __ldg(p); }
template <typename T>
inline T __ldcs(const T* p) { return __ldg(p); }
template <typename T>
inline T __ldlu(const T* p) { return __ldg(p); }
// Vector loads fault on a GPU unless aligned to their size.
#define ESPO_EMU_VLOAD(T)                                                       \
  template <>                                                                   \
  inline T __ldg<T>(const T* p) {                                               \
    espo_emu::check_read(p, sizeof(T), sizeof(T), "__ldg (vector)");            \
    espo_emu::count_vector_load();                                              \
    T v;                                                                        \
    memcpy(&v, p, sizeof(T));                                                   \
    return v;                                                                   \
  }
ESPO_EMU_VLOAD(uint2)
ESPO_EMU_VLOAD(uint4)
ESPO_EMU_VLOAD(int2)
ESPO_EMU_VLOAD(int4)
ESPO_EMU_VLOAD(float2)
ESPO_EMU_VLOAD(float4)
#undef ESPO_EMU_VLOAD

// Blocks and threads run one at a time, so a read-modify-write is atomic by construction.
#define ESPO_EMU_ATOMIC(name, expr)                                       \
  template <typename T, typename U>                                       \
  inline T name(T* p, U v_) {                                             \
    espo_emu::check_read(p, sizeof(T), sizeof(T), #name);                 \
    const T v = static_cast<T>(v_);                                       \
    const T old = *p;                                                     \
    *p = (expr);                                                          \
    return old;                                                           \
  }
ESPO_EMU_ATOMIC(atomicAdd, old + v)
ESPO_EMU_ATOMIC(atomicSub, old - v)
ESPO_EMU_ATOMIC(atomicMin, v < old ? v : old)
ESPO_EMU_ATOMIC(atomicMax, v > old ? v : old)
ESPO_EMU_ATOMIC(atomicExch, v)
ESPO_EMU_ATOMIC(atomicAnd, old & v)
ESPO_EMU_ATOMIC(atomicOr, old | v)
ESPO_EMU_ATOMIC(atomicXor, old ^ v)
#undef ESPO_EMU_ATOMIC
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  espo_emu::check_read(p, sizeof(T), sizeof(T), "atomicCAS");
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  espo_emu::check_read(p, 4, 4, "atomicInc");
  const unsigned old = *p;
  *p = old >= limit ? 0u : old + 1u;
  return old;
}

// ---------------------------------------------------------------- integer and bit intrinsics

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<int64_t>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  s &= 31;
  return s == 0 ? hi : (hi << s) | (lo >> (32 - s));
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  s &= 31;
  return s == 0 ? lo : (lo >> s) | (hi << (32 - s));
}

// ---------------------------------------------------------------- float intrinsics (IEEE, no contraction)

inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double d) { long long x; memcpy(&x, &d, 8); return x; }

// Each one IEEE operation, rounded to nearest even (the build passes -ffp-contract=off -fno-fast-math).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }

// Conversions as the PTX cvt instructions do them: NaN -> 0, out of range saturates.
namespace espo_emu {
template <typename I, typename F>
inline I cvt_sat(F x) {
  constexpr I lo = std::numeric_limits<I>::min(), hi = std::numeric_limits<I>::max();
  if (x != x) return 0;
  if (x <= static_cast<F>(lo)) return lo;
  if (x >= static_cast<F>(hi)) return hi;
  return static_cast<I>(x);
}
}  // namespace espo_emu
inline long long __float2ll_rz(float x) { return espo_emu::cvt_sat<long long>(truncf(x)); }
inline long long __float2ll_rn(float x) { return espo_emu::cvt_sat<long long>(nearbyintf(x)); }
inline long long __float2ll_rd(float x) { return espo_emu::cvt_sat<long long>(floorf(x)); }
inline long long __float2ll_ru(float x) { return espo_emu::cvt_sat<long long>(ceilf(x)); }
inline int __float2int_rz(float x) { return espo_emu::cvt_sat<int>(truncf(x)); }
inline int __float2int_rn(float x) { return espo_emu::cvt_sat<int>(nearbyintf(x)); }
inline int __float2int_rd(float x) { return espo_emu::cvt_sat<int>(floorf(x)); }
inline int __float2int_ru(float x) { return espo_emu::cvt_sat<int>(ceilf(x)); }
inline unsigned __float2uint_rz(float x) { return espo_emu::cvt_sat<unsigned>(truncf(x)); }
inline unsigned __float2uint_rn(float x) { return espo_emu::cvt_sat<unsigned>(nearbyintf(x)); }
inline long long __double2ll_rz(double x) { return espo_emu::cvt_sat<long long>(trunc(x)); }
inline long long __double2ll_rn(double x) { return espo_emu::cvt_sat<long long>(nearbyint(x)); }
inline int __double2int_rz(double x) { return espo_emu::cvt_sat<int>(trunc(x)); }
inline double __ll2double_rn(long long x) { return static_cast<double>(x); }
inline double __ull2double_rn(unsigned long long x) { return static_cast<double>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }
