// The sampling kernels for float32 logits (csrc/sample_kernels.cuh), one dtype per translation unit.
#include "sample_kernels.cuh"

namespace espo {
namespace detail {

cudaError_t launch_f32(const Params& p, int64_t chunk, cudaStream_t stream) {
  return launch_chunk<F32>(p, chunk, stream);
}

}  // namespace detail
}  // namespace espo
