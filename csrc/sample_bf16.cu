// The sampling kernels for bfloat16 logits (csrc/sample_kernels.cuh), one dtype per translation unit.
#include "sample_kernels.cuh"

namespace espo {
namespace detail {

cudaError_t launch_bf16(const Params& p, int64_t chunk, cudaStream_t stream) {
  return launch_chunk<BF16>(p, chunk, stream);
}

}  // namespace detail
}  // namespace espo
