// The host side of the fused sample-and-score op (sample.cuh): the workspace layout, the checks, the launches.
// The kernels are in csrc/sample_kernels.cuh.
#include "params.cuh"
#include "sample.cuh"

#include <cuda_runtime.h>

#include <limits.h>
#include <stdint.h>

namespace espo {
namespace {

using detail::kPivots;
using detail::Params;
using detail::FilterWork;

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Byte offsets of the workspace's arrays (each 256-byte aligned); the filter arrays only for a filtered call.
struct Layout {
  size_t part, part_q, part_idx, zeroed, ref, first, chunk_cnt, chunk_mass, pre, next, end;
};

Layout layout(int64_t batch, int64_t vocab, bool filtered) {
  const size_t b = static_cast<size_t>(batch), bc = b * static_cast<size_t>(num_chunks(vocab));
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t here = at;
    at += align_up(bytes);
    return here;
  };
  Layout l{};
  l.part = take(5 * bc * sizeof(float));
  l.part_q = take(bc * sizeof(long long));
  l.part_idx = take(bc * sizeof(int));
  l.zeroed = take(4 * b * sizeof(unsigned));  // arrived [3, B], then pending [B]
  if (filtered) {
    l.ref = take(b * sizeof(float));
    l.first = take(b * kPivots * sizeof(int32_t));
    l.chunk_cnt = take(bc * kPivots * sizeof(long long));
    l.chunk_mass = take(bc * kPivots * sizeof(long long));
    l.pre = take(b * 2 * kPivots * sizeof(long long));
    l.next = take(b * 3 * sizeof(long long));
  }
  l.end = at;
  return l;
}

}  // namespace

bool sample_is_filtered(const SampleArgs& args) {
  return args.top_k.ptr != nullptr || args.top_p.ptr != nullptr ||
         (args.top_k.value > 0 && args.top_k.value < args.vocab) || args.top_p.value < 1.0f;
}

size_t sample_workspace_bytes(const SampleArgs& args) {
  return layout(args.batch, args.vocab, sample_is_filtered(args)).end;
}

int sample_launch(const SampleArgs& args, const SampleOutputs& out, const StopState* stop_state, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream) {
  if (args.batch < 1 || args.vocab < 1 || args.logits == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t chunk = chunk_size(args.vocab);
  const int64_t nc = num_chunks(args.vocab);
  if (args.batch * nc > static_cast<int64_t>(INT_MAX) || args.vocab > static_cast<int64_t>(INT_MAX) - chunk)
    return cudaErrorInvalidValue;
  const bool filtered = sample_is_filtered(args);
  const Layout l = layout(args.batch, args.vocab, filtered);
  if (workspace_bytes < l.end) return cudaErrorInvalidValue;

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
  char* ws = static_cast<char*>(workspace);
  p.part = reinterpret_cast<float*>(ws + l.part);
  p.part_q = reinterpret_cast<long long*>(ws + l.part_q);
  p.part_idx = reinterpret_cast<int*>(ws + l.part_idx);
  p.arrived = reinterpret_cast<unsigned*>(ws + l.zeroed);
  p.filtered = filtered;
  p.fw = FilterWork{};
  if (filtered) {
    p.fw.pending = p.arrived + 3 * args.batch;
    p.fw.ref = reinterpret_cast<float*>(ws + l.ref);
    p.fw.first = reinterpret_cast<int32_t*>(ws + l.first);
    p.fw.chunk_cnt = reinterpret_cast<long long*>(ws + l.chunk_cnt);
    p.fw.chunk_mass = reinterpret_cast<long long*>(ws + l.chunk_mass);
    p.fw.pre = reinterpret_cast<long long*>(ws + l.pre);
    p.fw.next = reinterpret_cast<long long*>(ws + l.next);
  }
  p.out = out;
  p.has_stop = stop_state != nullptr;
  if (stop_state != nullptr) {
    p.st = *stop_state;
  } else {
    p.st = StopState{};
  }

  const size_t zeroed = (filtered ? 4 : 1) * static_cast<size_t>(args.batch) * sizeof(unsigned);
  cudaError_t err = cudaMemsetAsync(p.arrived, 0, zeroed, stream);
  if (err != cudaSuccess) return err;
  switch (args.dtype) {
    case LogitsType::kFloat32: err = detail::launch_f32(p, chunk, stream); break;
    case LogitsType::kBFloat16: err = detail::launch_bf16(p, chunk, stream); break;
    case LogitsType::kFloat16: err = detail::launch_f16(p, chunk, stream); break;
    default: err = cudaErrorInvalidValue;
  }
  return static_cast<int>(err);
}

}  // namespace espo
