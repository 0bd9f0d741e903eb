#!/usr/bin/env bash
# One device call that does every GPU check of the project: build the CUDA extension, the Triton compile
# check, bench/bench_sample.py, the whole test suite on the GPU (gpu-marked tests included) and
# bench/bench_decode.py. Each stage has its own time limit, so that a hang in one cannot eat the others;
# after each stage everything so far is packed into $OUT/gpu-out.tar.gz (the device tool brings back at
# most 8 files), ready to unpack and copy into bench/results/.
#   bash scripts/gpu_suite.sh [build] [sample] [tests] [decode] [vllm]     (default: all five, in that order)
# vllm: espo's processor inside a real vLLM on the GPU (tests/integrations/test_vllm*.py: the V1 runner with its
# default async scheduling, and Model Runner V2), where `import vllm` works: the device image has no vLLM, so the
# caller installs it first (e.g. wheels carried in and installed with --target, PYTHONPATH set); without one the
# stage says so and is skipped.
#   DEADLINE=470 bash scripts/gpu_suite.sh issue36   # issue 36's run, ~8 min: build meta sample36 callcost optests decode36
#     rda36 (if time is left before DEADLINE)
#     meta: tests/ops/test_cuda_ops.py alone under faulthandler (and gdb's backtrace where gdb exists): the rank-1 meta crash;
#     optests: the op's GPU tests (sample, filters, cuda, integer sampling) and the decoder's fused ops'; sample36: B = 1 and 256, V = 151936, bf16,
#     unfiltered, top-k 50, top-p 0.95 beside torch's sorting filter and FlashInfer, each backend's device time by kernel; callcost: one call at B = 1 from
#     Python (medians; each backend also alone, with its arguments prepared, beside 8 allocations and one small launch); decode36: the 0.5B shape at B = 64 beside generate with a static cache, the decoder's step
#     with and without its fused ops (--fused-ops both --gate-up-silu both: the B = 64 row unfused, fused, and fused
#     with cuBLAS's gate/up GEMMs instead of gate_up_silu; generate once; --breakdown: each step's
#     kernels by kind from torch.profiler, busy against idle time; --overlap-steps both: the fused row once more
#     with overlapped steps), and 25%/50% stops through a full pool, fused (16 rollouts a slot, the decoder's
#     refill_batch and refill_tokens: refills in the graphed step), with fixed lengths and with natural ones (EOS
#     at a drawn length), each with steps in turn and overlapped (each row is printed to the stage log as it ends);
#     DECODE36_ARGS adds arguments, e.g. "--refill-tokens 0 256" for the design without chunks; rda36: the fused B = 64
#     step with and without fused_ops.ROPE_DECODE_ATTENTION (RoPE, cache write and attention in one launch), -> rda/.
# DECODE_ARGS adds arguments to bench_decode.py. Stage limits in seconds: LIMIT_BUILD, LIMIT_SAMPLE, LIMIT_TESTS, LIMIT_DECODE; DEADLINE (seconds from the
# start) cuts every stage short so that the whole run ends in time and packs what it has. It runs on the image's
# own python3, torch, triton and nvcc: nothing here assumes the project's pins or a network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
WORK=/tmp/gpu-out
rm -rf "$WORK"; mkdir -p "$OUT" "$WORK"
stages=${*:-build sample tests decode vllm}
stages=${stages/issue36/build meta sample36 callcost optests decode36 rda36}
export PYTHONUNBUFFERED=1
begin=$(date +%s)

pack() { tar czf "$OUT/gpu-out.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")"; }

stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log to $WORK/NAME.log, show its tail, pack
  local name=$1 limit=$2 start rc left
  shift 2
  start=$(date +%s)
  left=$(( ${DEADLINE:-100000} - (start - begin) - 5 ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then echo "stage $name: skipped, past DEADLINE" | tee -a "$WORK/stages.txt"; return 124; fi
  timeout --kill-after=15 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  echo "stage $name: rc $rc, $(( $(date +%s) - start )) s (limit $limit), at $(( $(date +%s) - begin )) s" \
    | tee -a "$WORK/stages.txt"
  tail -n "${TAIL:-15}" "$WORK/$name.log"
  pack
  return $rc
}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  nvcc --version | tail -2
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
  python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
  nproc
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

for what in $stages; do
  case $what in
    build)
      # in place: the tests and benches import the source tree's espo, which must hold espo/_C*.so
      stage build "${LIMIT_BUILD:-150}" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
        python3 setup.py build_ext --inplace
      TAIL=3 stage triton_compile 60 env -u TRITON_INTERPRET python3 scripts/check_triton_compile.py
      TAIL=5 stage backends 30 python3 -m espo backends
      ;;
    sample)
      stage bench_sample "${LIMIT_SAMPLE:-110}" python3 bench/bench_sample.py --out "$WORK"
      ;;
    tests)
      # no -x: a first run on a GPU should show every failure; workers share the GPU, 2 CPU threads each
      TAIL=40 stage tests "${LIMIT_TESTS:-150}" env OMP_NUM_THREADS=2 python3 -m pytest -q -rfE -p no:cacheprovider \
        -n 8 --timeout=100 --durations=15 --junitxml="$WORK/tests.xml" tests
      ;;
    decode)
      # shell-split on purpose: DECODE_ARGS="--throughput-models smollm2" runs a part of the table
      # shellcheck disable=SC2086
      TAIL=30 stage bench_decode "${LIMIT_DECODE:-150}" python3 bench/bench_decode.py --models 0.5b smollm2 \
        --stop-models 0.5b --rollouts-per-slot 16 --stop-new-tokens 128 --repeats 2 ${DECODE_ARGS:-} --out "$WORK"
      ;;
    meta)
      TAIL=30 stage meta 60 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/ops/test_cuda_ops.py
      if grep -q "Fatal Python error\|Segmentation" "$WORK/meta.log" && command -v gdb >/dev/null; then
        TAIL=60 stage meta_gdb 60 gdb -batch -ex run -ex bt --args python3 -m pytest -q -p no:cacheprovider \
          "tests/ops/test_cuda_ops.py::test_meta_rejects_bad_logits"
      fi
      ;;
    optests)
      TAIL=30 stage optests "${LIMIT_OPTESTS:-90}" env OMP_NUM_THREADS=2 python3 -m pytest -q -rfE -p no:cacheprovider \
        -n 8 --timeout=100 --junitxml="$WORK/optests.xml" tests/ops/test_sample.py tests/ops/test_sample_filters.py \
        tests/ops/test_cuda.py tests/ops/test_torch_backend.py tests/ops/test_cuda_host.py tests/ops/test_cuda_ops.py \
        tests/ops/test_integer_sampling.py tests/ops/test_triton_compile.py tests/ops/test_sampling_params.py \
        tests/engine/test_fused_ops.py tests/engine/test_fused_decoder.py \
        tests/engine/test_decoder.py::test_gpu_graph_refill_chunks_match_eager \
        tests/engine/test_decoder.py::test_gpu_overlapped_steps_match_steps_in_turn \
        tests/engine/test_decoder.py::test_gpu_overlapped_steps_never_wait_for_the_device
      ;;
    sample36)
      TAIL=12 stage bench_sample "${LIMIT_SAMPLE:-100}" python3 bench/bench_sample.py --B 1 256 --V 151936 \
        --dtypes bfloat16 --filtered-B 256 --no-compile --out "$WORK"
      ;;
    callcost)
      TAIL=12 stage callcost 40 python3 bench/bench_call_cost.py --calls 1000 --out "$WORK"
      ;;
    decode36)
      # shellcheck disable=SC2086
      TAIL=20 stage bench_decode "${LIMIT_DECODE:-200}" python3 bench/bench_decode.py --models 0.5b --batch 64 \
        --new-tokens 128 --hf-cache static --hf-step --fused-ops both --gate-up-silu both --overlap-steps both --breakdown --stop-slots 64 --rollouts-per-slot 16 --stop-new-tokens 128 \
        --stop-lengths fixed natural \
        --repeats 2 ${DECODE36_ARGS:-} --out "$WORK"
      ;;
    rda36)
      # last, in a process of its own (a fault in the new kernel cannot cost decode36's rows): the B = 64 fused step
      # with and without rope_decode_attention, each with its breakdown
      TAIL=12 stage bench_rda "${LIMIT_RDA:-90}" python3 bench/bench_decode.py --models 0.5b --batch 64 \
        --new-tokens 128 --fused-ops on --rope-decode-attention both --breakdown --no-hf --stop-models \
        --out "$WORK/rda"
      ;;
    vllm)
      if python3 -c "import vllm" >/dev/null 2>&1; then
        python3 -c "import vllm; print('vllm', vllm.__version__)" >>"$WORK/env.txt" 2>&1
        TAIL=40 stage vllm "${LIMIT_VLLM:-400}" env ESPO_REQUIRE_HOST=vllm python3 -m pytest -q -rfE -p no:cacheprovider \
          --junitxml="$WORK/vllm.xml" tests/integrations/test_vllm.py tests/integrations/test_vllm_records.py
      else
        echo "stage vllm: skipped, no vllm importable here (install vllm 0.32 to 0.34 first)" | tee -a "$WORK/stages.txt"
      fi
      ;;
    *) echo "gpu_suite: unknown stage '$what' (build, sample, tests, decode, vllm, meta, optests, sample36," \
         "callcost, decode36, rda36, issue36)" >&2; exit 2 ;;
  esac
done
cat "$WORK/stages.txt"
cp "$WORK"/*.json "$WORK"/*.md "$OUT"/ 2>/dev/null || true  # the tables themselves, beside the archive
