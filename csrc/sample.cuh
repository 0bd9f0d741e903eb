// Fused sample-and-score with the ESPO stop update: the plain C++ launcher API of the CUDA kernels.
//
// No torch (and no CUDA runtime header) is needed to include this file: csrc/bindings.cpp wraps it for
// torch, and a host-only program can include it for chunk_size(). The semantics are those of
// espo/ops/reference.py; the random stream, the chunking rule and the sampling rule are those of the Triton
// backend (kernels/sample.py), so that both backends draw the same tokens for the same inputs.
//
// One launch (after a memset of B counters) over a 1-D grid of B * C blocks, block (row, chunk):
//   1. the block reads its chunk of the row once and writes the chunk's statistics to a workspace: its
//      max logit, max y = fl(x * a), the exact int64 sum of the integer masses q (espo/ops/reference.py), the
//      float sums of f = 2**(y - r_c) and f * (y - r_c) from the same exponentials, the first argmax for
//      greedy rows, and the temperature-1 sum for rows whose temperature is not 0 or 1;
//   2. the last block of each row to finish (a per-row counter) merges the row's C partials, draws the
//      row's uniform, picks the chunk where the integer cumulative mass crosses the integer target and
//      re-reads that chunk alone to find the token, writes the statistics and updates the ESPO stop state.
// A call where some row may have top-k/top-p (sample_is_filtered) makes two more launches over the same grid, the
// rounds of the multi-pivot threshold search of csrc/filter.cuh: step 2 defers such a row, and the last block of
// the row in the second round finds its exact thresholds, walks the row to draw the token, and finishes it.
// Which block finishes a row varies from run to run, but what it computes does not: tokens come from
// integer sums (exact in any order) and the float statistics from partials read in chunk order with a
// fixed reduction tree, so results are deterministic and do not depend on B.
#pragma once

#include <stddef.h>
#include <stdint.h>

// cudaStream_t without the CUDA headers (this is exactly how driver_types.h declares it).
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace espo {

enum class LogitsType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Elements per chunk: about 48 chunks a row, a power of two in [16, 4096]; a function of V only.
// Must equal kernels/sample.py: chunk_size (tests/test_cuda_host.py checks it).
inline int64_t chunk_size(int64_t vocab_size) {
  int64_t n = (vocab_size + 47) / 48;  // cdiv(V, 48)
  int64_t p = 1;
  while (p < n) p <<= 1;  // next power of two >= n
  return p < 16 ? 16 : (p > 4096 ? 4096 : p);
}

// S of the integer masses q < 2**S: min(40, 62 - bit_length(V)), so that V * 2**S < 2**62.
// Must equal espo/ops/reference.py: mass_shift (tests/test_cuda_host.py checks it).
inline int mass_shift(int64_t vocab_size) {
  int bits = 0;
  for (uint64_t v = static_cast<uint64_t>(vocab_size); v != 0; v >>= 1) ++bits;
  return 62 - bits < 40 ? 62 - bits : 40;
}

inline int64_t num_chunks(int64_t vocab_size) {
  const int64_t chunk = chunk_size(vocab_size);
  return (vocab_size + chunk - 1) / chunk;
}

// A per-row argument: `ptr` (B contiguous values on the device) when not null, else `value` for every row.
template <typename T>
struct RowArg {
  const T* ptr;
  T value;
};

struct SampleArgs {
  const void* logits;  // [B, V] with unit stride along V
  LogitsType dtype;
  int64_t batch;       // B >= 1
  int64_t vocab;       // V >= 1
  int64_t row_stride;  // in elements
  RowArg<float> temperature;  // >= 0; 0 is greedy
  RowArg<int64_t> top_k;      // >= 0; 0 or >= V disables
  RowArg<float> top_p;        // (0, 1]; 1 disables
  RowArg<int64_t> seed;
  RowArg<int64_t> offset;
};

struct SampleOutputs {  // each [B], contiguous, on the device
  int64_t* tokens;
  float* logprobs;
  float* raw_logprobs;
  float* entropy;
  float* max_logprob;
  float* regret;
  bool* valid;
};

// The ESPO stop state of espo.EarlyStopper (per-row tensors of the stopper's length) and its parameters.
struct StopState {
  float* z;
  float* sum_g;
  float* sum_g2;
  int32_t* count;
  int32_t* position;
  bool* stopped;
  const float* scalars;       // [5]: mean, var, beta, armed, ready
  int64_t num_rows;           // the stopper's length (a stopper row outside [0, num_rows) is left alone)
  const int64_t* rows;        // [B] stopper row of each logits row, or null for row i -> stopper row i
  const float* values;        // [B] critic values, or null for the value floor
  bool* stop;                 // [B] out: the stop mask
  float alpha_s;
  float one_minus_alpha_s;
  float clip;
  float delta;
  float value_floor;
  int64_t min_tokens;
};

// Whether a call may filter some row (top-k or top-p given per row, or enabled for every row): three launches.
bool sample_is_filtered(const SampleArgs& args);

// Bytes of device workspace sample_launch needs for this call (256-byte aligned pointer).
size_t sample_workspace_bytes(const SampleArgs& args);

// Launch the op on `stream`. `stop_state` may be null (no stopper). Returns a cudaError_t value (0 is
// success); argument errors that the launcher detects return cudaErrorInvalidValue (1). Asynchronous:
// nothing is synchronised, no memory is allocated, and it can be captured in a CUDA graph.
int sample_launch(const SampleArgs& args, const SampleOutputs& out, const StopState* stop_state, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream);

}  // namespace espo
