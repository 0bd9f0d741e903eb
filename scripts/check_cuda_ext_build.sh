#!/usr/bin/env bash
# Build espo._C the way users do (pip, --no-build-isolation, against a CUDA build of torch) on a machine
# without a GPU, then import it and run the tests that need the extension but no GPU (tests/ops/test_cuda_ops.py:
# op schemas, meta shapes, bad-input errors). Catches what the nvcc-only check of check_cuda_build.sh cannot:
# the torch binding's compile and link, the op registration, the built architectures.
#
# Heavy (a CUDA build of torch is several GB), so not part of CI; run it after changing csrc/ or setup.py:
#
#   bash scripts/check_cuda_ext_build.sh        # TORCH_VERSION=2.11.0 (the device's), VENV=/tmp/espo-cuda-venv
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
VENV="${VENV:-/tmp/espo-cuda-venv}"
if [ -z "${CUDA_HOME:-}" ]; then
    # nvcc may be a wrapper script on the PATH: find the toolkit by its runtime header instead
    for dir in /usr/local/cuda /usr/local/cuda-* "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
        if [ -x "$dir/bin/nvcc" ] && [ -f "$dir/include/cuda_runtime_api.h" ]; then CUDA_HOME="$dir"; break; fi
    done
fi
if [ -z "${CUDA_HOME:-}" ]; then
    echo "check_cuda_ext_build: no CUDA toolkit found; set CUDA_HOME" >&2
    exit 1
fi
export CUDA_HOME

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy setuptools wheel ninja pytest hypothesis
"$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else "torch in the venv is not a CUDA build")'

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work"
echo "check_cuda_ext_build: pip wheel --no-build-isolation (torch $TORCH_VERSION, CUDA_HOME=$CUDA_HOME)"
(cd "$work" && MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps -w "$work/dist" .)
wheel="$(ls "$work"/dist/espo_rl-*.whl)"
so="$(unzip -l "$wheel" | grep -o 'espo/_C[^ ]*\.so' || true)"
if [ -z "$so" ]; then
    echo "check_cuda_ext_build: the wheel has no espo/_C extension" >&2
    exit 1
fi
(cd "$work" && unzip -q -o "$wheel" "$so")  # next to the sources, as build_ext --inplace puts it
echo "check_cuda_ext_build: $so built for $(strings "$work/$so" | grep -o 'sm_[0-9]*a\?' | sort -u | grep -v 'sm_3[0-9]' | tr '\n' ' ')"
(cd "$work" && "$VENV/bin/python" -c 'import espo._C')  # an import error fails here, not as a skip below
(cd "$work" && "$VENV/bin/python" -X faulthandler -m pytest -q -p no:cacheprovider tests/ops/test_cuda_ops.py)
echo "check_cuda_ext_build: ok"
