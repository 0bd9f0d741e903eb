// The parameters of one launch of the sampling kernels: shared by the host launcher (csrc/sample.cu) and the
// kernels, compiled one dtype per translation unit (csrc/sample_{f32,bf16,f16}.cu) so that nvcc builds them in
// parallel.
#pragma once

#include "sample.cuh"

#include <cuda_runtime.h>

#include <stdint.h>

namespace espo {
namespace detail {

constexpr int kPivots = 16;  // pivot keys per pass of the top-k/top-p search (csrc/filter.cuh)

// The workspace of a filtered launch (csrc/filter.cuh), P = kPivots.
struct FilterWork {
  unsigned* pending;      // [B]: 1 if the row's token waits for the search (zeroed before the launch)
  float* ref;             // [B]: the row's integer-mass reference R
  int32_t* first;         // [B, P]: round 1's pivots
  long long* chunk_cnt;   // [B, C, P]: a round's stats per chunk
  long long* chunk_mass;  // [B, C, P]
  long long* pre;         // [B, 2, P]: round 1's stats summed over the row: count, mass
  long long* next;        // [B, 3]: round 2's interval lo, hi, and whether round 2 runs
};

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
  unsigned* arrived;  // [3, B]: blocks of the row done in each kernel (zeroed before the launch)
  SampleOutputs out;
  bool filtered;      // some row may have top-k/top-p: its search runs in pivot_round_kernel 1 and 2
  FilterWork fw;
  bool has_stop;
  StopState st;
};

// Launch the kernels for one dtype of logits (chunk = chunk_size(V)).
cudaError_t launch_f32(const Params& p, int64_t chunk, cudaStream_t stream);
cudaError_t launch_bf16(const Params& p, int64_t chunk, cudaStream_t stream);
cudaError_t launch_f16(const Params& p, int64_t chunk, cudaStream_t stream);

}  // namespace detail
}  // namespace espo
