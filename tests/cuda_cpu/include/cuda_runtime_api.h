// Fake <cuda_runtime_api.h> of the CPU emulation (tests/cuda_cpu): the emulated runtime and device functions.
#pragma once
#include "espo_emulate.h"
