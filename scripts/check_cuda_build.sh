#!/usr/bin/env bash
# Check that the CUDA sources build, on a machine without a GPU (CI): every csrc/*.cu is compiled with
# nvcc alone (the kernels need no torch headers), and csrc/bindings.cpp is compiled (syntax only) against
# the installed torch's headers when torch and the CUDA headers are there. Exits non-zero on any error;
# prints one skip line and exits 0 when nvcc is absent.
#
#   bash scripts/check_cuda_build.sh            # ESPO_CHECK_ARCH=sm_80 to check another architecture
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC="$CUDA_HOME/bin/nvcc"
fi
if [ -z "$NVCC" ]; then
    echo "check_cuda_build: skipped, nvcc is not on this machine"
    exit 0
fi
ARCH="${ESPO_CHECK_ARCH:-sm_90}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

shopt -s nullglob
sources=(csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "check_cuda_build: no csrc/*.cu to compile" >&2
    exit 1
fi
for src in "${sources[@]}"; do
    echo "check_cuda_build: $NVCC -std=c++17 -arch=$ARCH -c $src"
    "$NVCC" -std=c++17 -O3 -arch="$ARCH" -c "$src" -o "$tmp/$(basename "$src" .cu).o"
done

# The torch binding: a syntax-only compile against torch's headers (a CPU build of torch ships the c10/cuda
# headers but not the one header its CMake generates for CUDA builds, which a stub stands in for here).
cxx="${CXX:-$(command -v c++ || command -v g++ || true)}"
torch_inc="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
py_inc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
cuda_inc=""
for dir in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(cd "$(dirname "$NVCC")/.." && pwd)" /usr/local/cuda; do
    if [ -n "$dir" ] && [ -f "$dir/include/cuda_runtime_api.h" ]; then cuda_inc="$dir/include"; break; fi
done
if [ -z "$cxx" ] || [ ! -d "$torch_inc/c10/cuda" ] || [ ! -f "$cuda_inc/cuda_runtime_api.h" ] || [ ! -f "$py_inc/Python.h" ]; then
    echo "check_cuda_build: csrc/bindings.cpp not checked (needs a C++ compiler, torch's headers, CUDA's and Python's)"
    exit 0
fi
if [ ! -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    mkdir -p "$tmp/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
fi
echo "check_cuda_build: $cxx -std=c++20 -fsyntax-only csrc/bindings.cpp (torch headers from $torch_inc)"
"$cxx" -std=c++20 -fsyntax-only -I"$tmp/stub" -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" -I"$cuda_inc" \
    -I"$py_inc" -Icsrc csrc/bindings.cpp
echo "check_cuda_build: ok"
