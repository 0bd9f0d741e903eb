// The one way the kernels of csrc/ are launched: on a GPU a plain <<<grid, block, 0, stream>>> launch; compiled
// for the CPU emulation (tests/cuda_cpu, -DESPO_CPU_EMULATION) the emulator runs every thread of the grid.
#pragma once

#include <cuda_runtime.h>

namespace espo {

// kernel<<<grid, block, 0, stream>>>(args...); returns the launch's error (cudaGetLastError()).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
#ifdef ESPO_CPU_EMULATION
  (void)stream;
  return espo_emulate_launch(grid, block, [&] { kernel(args...); });
#else
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
#endif
}

}  // namespace espo
