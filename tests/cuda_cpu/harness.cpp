// The C entry of the emulated sample op: fills SampleArgs/SampleOutputs/StopState from raw pointers (as
// csrc/bindings.cpp does from tensors) and calls espo::sample_launch, whose kernels then run on the CPU.
// Every buffer the op may read through __ldg/__ldcg is registered, so a read outside them fails the launch.
#include <stdlib.h>
#include <string.h>

#include "espo_emulate.h"
#include "sample.cuh"

namespace {

size_t dtype_bytes(int dtype) { return dtype == 0 ? 4 : 2; }

template <typename T>
espo::RowArg<T> row_arg(const T* ptr, T value, int64_t batch) {
  if (ptr != nullptr) espo_emu_register_buffer(ptr, static_cast<size_t>(batch) * sizeof(T));
  return {ptr, value};
}

}  // namespace

extern "C" int espo_emu_sample(const void* logits, int dtype, int64_t batch, int64_t vocab, int64_t row_stride,
                               const float* temperature, double temperature_value, const int64_t* top_k,
                               int64_t top_k_value, const float* top_p, double top_p_value, const int64_t* seed,
                               int64_t seed_value, const int64_t* offset, int64_t offset_value, int64_t* tokens,
                               float* logprobs, float* raw_logprobs, float* entropy, float* max_logprob,
                               float* regret, bool* valid,
                               // the stop state: z == nullptr for none
                               float* z, float* sum_g, float* sum_g2, int32_t* count, int32_t* position,
                               bool* stopped, const float* scalars, int64_t num_rows, const int64_t* rows,
                               const float* values, bool* stop, double alpha_s, double clip, double delta,
                               double value_floor, int64_t min_tokens) {
  espo_emu_clear_buffers();
  const size_t elem = dtype_bytes(dtype);
  for (int64_t r = 0; r < batch; ++r)  // each row's V elements, and nothing between rows
    espo_emu_register_buffer(static_cast<const char*>(logits) + static_cast<size_t>(r * row_stride) * elem,
                             static_cast<size_t>(vocab) * elem);

  espo::SampleArgs args;
  args.logits = logits;
  args.dtype = static_cast<espo::LogitsType>(dtype);
  args.batch = batch;
  args.vocab = vocab;
  args.row_stride = row_stride;
  args.temperature = row_arg<float>(temperature, static_cast<float>(temperature_value), batch);
  args.top_k = row_arg<int64_t>(top_k, top_k_value, batch);
  args.top_p = row_arg<float>(top_p, static_cast<float>(top_p_value), batch);
  args.seed = row_arg<int64_t>(seed, seed_value, batch);
  args.offset = row_arg<int64_t>(offset, offset_value, batch);
  const espo::SampleOutputs out{tokens, logprobs, raw_logprobs, entropy, max_logprob, regret, valid};

  espo::StopState state{};
  if (z != nullptr) {
    state.z = z;
    state.sum_g = sum_g;
    state.sum_g2 = sum_g2;
    state.count = count;
    state.position = position;
    state.stopped = stopped;
    state.scalars = scalars;
    state.num_rows = num_rows;
    state.rows = rows;
    state.values = values;
    state.stop = stop;
    state.alpha_s = static_cast<float>(alpha_s);
    state.one_minus_alpha_s = static_cast<float>(1.0 - alpha_s);
    state.clip = static_cast<float>(clip);
    state.delta = static_cast<float>(delta);
    state.value_floor = static_cast<float>(value_floor);
    state.min_tokens = min_tokens;
  }

  // The workspace starts as garbage, as torch's caching allocator hands it out: every byte the kernel reads
  // must have been written by it (0xff bytes are NaN floats and -1 integers).
  const size_t bytes = espo::sample_workspace_bytes(args);
  void* workspace = aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (workspace == nullptr) return 2;
  memset(workspace, 0xff, bytes);
  espo_emu_register_buffer(workspace, bytes);
  const int err = espo::sample_launch(args, out, z != nullptr ? &state : nullptr, workspace, bytes, nullptr);
  free(workspace);
  espo_emu_clear_buffers();
  return err;
}
