// Fake <cuda_runtime.h> of the CPU emulation (tests/cuda_cpu): the emulated runtime and device functions.
#pragma once
#include "espo_emulate.h"
