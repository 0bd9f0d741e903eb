#!/usr/bin/env bash
# One device call that does every GPU check of the project: build the CUDA extension, run the whole test
# suite on the GPU (gpu-marked tests included), then the benchmarks. Logs and results land in $OUT
# (or ./gpu-out), ready to copy into bench/results/.
#   bash scripts/gpu_suite.sh [tests|bench|all]      (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
what=${1:-all}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if [ -f csrc/bindings.cpp ]; then
  # in place: the tests import the source tree's espo, which must hold espo/_C*.so
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 setup.py build_ext --inplace 2>&1 | tail -20 | tee "$OUT/build.log"
fi
env -u TRITON_INTERPRET python3 scripts/check_triton_compile.py | tail -1 | tee -a "$OUT/env.txt"
python3 -m espo backends | tee -a "$OUT/env.txt"
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # no -x: a first run on a GPU should show every failure; a per-test limit keeps a hang from eating the call
  limit=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=240")
  python3 -m pytest -q -rfE -p no:cacheprovider $limit --junitxml="$OUT/tests.xml" tests 2>&1 | tee "$OUT/tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 bench/bench_sample.py --out "$OUT" 2>&1 | tee "$OUT/bench_sample.log" | tail -40
  if [ -f bench/bench_decode.py ]; then
    python3 bench/bench_decode.py --out "$OUT" 2>&1 | tee "$OUT/bench_decode.log" | tail -30
  fi
fi
exit "$status"
