// Kernels that pin down the emulator's semantics (tests/ops/test_cuda_emulator.py), launched as csrc/ launches its
// own: through espo::launch_kernel (csrc/launch.cuh). Compiled only for the CPU emulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.cuh"

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpFields = 12;

// Per thread (blocks of 64 = 2 warps): out[(block * 64 + thread) * kWarpFields + k].
__global__ void warp_kernel(int* out) {
  __shared__ int partial[2];
  const int t = threadIdx.x, lane = t & 31;
  int* o = out + (blockIdx.x * blockDim.x + t) * kWarpFields;
  int sum = lane;
  for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(kFull, sum, m);
  o[0] = sum;  // 496
  int scan = 1;
  for (int d = 1; d < 32; d <<= 1) {
    const int n = __shfl_up_sync(kFull, scan, d);
    if (lane >= d) scan += n;
  }
  o[1] = scan;  // lane + 1
  o[2] = __shfl_down_sync(kFull, t * 10, 1);                          // (t + 1) * 10, own at lane 31
  o[3] = __shfl_sync(kFull, t * 10 + static_cast<int>(blockIdx.x), 31);  // lane 31's value
  o[4] = static_cast<int>(__ballot_sync(kFull, lane % 3 == 0));
  o[5] = __any_sync(kFull, t == 40) * 2 + __all_sync(kFull, lane < 32);
  o[6] = static_cast<int>(__match_any_sync(kFull, lane / 4));
  o[7] = __syncthreads_count(t < 10);
  if (lane == 0) partial[t / 32] = sum + t;
  __syncthreads();
  o[8] = partial[0] + partial[1];  // 496 + 0 + 496 + 32
  __syncthreads();
  // A partial mask: only the low half-warp exchanges.
  o[9] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, lane, 1) : -1;
  o[10] = __reduce_add_sync(kFull, static_cast<unsigned>(lane));
  // Threads that return leave the barrier counts (sm_70+): the others still pass the barrier.
  if (t >= 40) return;
  o[11] = __syncthreads_count(1);  // 40
}

__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1);
  }
}

// Lanes of one warp in different primitives with the same full mask: neither can complete.
__global__ void mismatch_kernel(int* out) {
  out[threadIdx.x] = threadIdx.x == 0 ? __shfl_xor_sync(kFull, 1, 1) : static_cast<int>(__ballot_sync(kFull, 1));
}

__global__ void lane_exit_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1);
}

__global__ void load_kernel(const char* p, int offset, unsigned* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + offset));
  if (threadIdx.x == 0) *out = v.x;
}

// Every (block, thread) of a 3-D grid and 3-D block counts itself once.
__global__ void index_kernel(unsigned* counts) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  atomicAdd(counts + block * (blockDim.x * blockDim.y * blockDim.z) + thread, 1u);
}

}  // namespace

extern "C" {
int emu_warp(int* out, unsigned blocks) { return espo::launch_kernel(warp_kernel, blocks, 64, nullptr, out); }
int emu_deadlock(int* out) { return espo::launch_kernel(deadlock_kernel, 1, 32, nullptr, out); }
int emu_mismatch(int* out) { return espo::launch_kernel(mismatch_kernel, 1, 32, nullptr, out); }
int emu_lane_exit(int* out) { return espo::launch_kernel(lane_exit_kernel, 1, 32, nullptr, out); }
int emu_load(const char* p, int offset, unsigned* out) {
  return espo::launch_kernel(load_kernel, 1, 32, nullptr, p, offset, out);
}
int emu_index(unsigned* counts, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz) {
  return espo::launch_kernel(index_kernel, dim3(gx, gy, gz), dim3(bx, by, bz), nullptr, counts);
}
// The fake headers' conversions, element by element (host calls of device functions: plain C++ here).
void emu_half_to_float(const unsigned short* in, float* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(in[i]));
}
void emu_float_to_half(const float* in, unsigned short* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = __half_as_ushort(__float2half_rn(in[i]));
}
void emu_float_to_bfloat16(const float* in, unsigned short* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}
void emu_float2ll_rz(const float* in, long long* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = __float2ll_rz(in[i]);
}
}
