// The one way the kernels are launched (placeholder until the emulation branch lands).
#pragma once

#include <cuda_runtime.h>

namespace espo {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), unsigned grid, unsigned block, cudaStream_t stream,
                          Args... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace espo
