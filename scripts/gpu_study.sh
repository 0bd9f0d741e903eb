#!/usr/bin/env bash
# Issue 23's study at a realistic scale on one CUDA GPU: calibrate the stop settings on their own prompts, then the
# rollout study (stops, exact false stops, controls, time at a full pool and at pool = batch), then training
# (GRPO vs GRPO + ESPO, PPO vs ESPO, 3 seeds, 1024 held-out problems). Results under studies/results/gpu-*.
#
#     bash scripts/gpu_study.sh [MODEL_DIR]          (default: models/smollm2, made with `espo model smollm2`)
#
# Needs: a CUDA build of torch, the package installed (`pip install -c constraints/main.txt ".[models]"`), and the
# converted model folder (538 MB in float32). The project's lent device machines have no network and carry at most
# 64 MiB, so they cannot hold SmolLM2: run this where the folder is (convert it there with network, or copy it).
# Each stage writes its results before the next starts; the training stage resumes its runs when rerun.
# Sizes: 512 calibration problems x 4, 512 evaluation problems x 8 (4096 rollouts; a full pool is 1024 slots),
# 100 training steps of the smollm2 preset per run. Expect hours on one GPU; STEPS, SEEDS and EVAL shrink it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/smollm2}
STEPS=${STEPS:-100}
SEEDS=${SEEDS:-"0 1 2"}
EVAL=${EVAL:-1024}
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_study: no CUDA GPU visible to torch')"
[ -f "$MODEL/card.json" ] || { echo "gpu_study: no converted model at $MODEL (run: espo model smollm2 $MODEL)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee studies/results/gpu-study-device.txt
cd studies
python3 calibrate_stops.py "../$MODEL" --device cuda --preset smollm2 --problems 512 --samples 4 --out results/gpu-calibration
python3 study_real_rollouts.py "../$MODEL" --device cuda --preset smollm2 --problems 512 --samples 8 --repeats 3 \
    --out results/gpu-rollouts
# shellcheck disable=SC2086
python3 study_real_training.py "../$MODEL" --preset smollm2 --device cuda --steps "$STEPS" --seeds $SEEDS \
    --eval-problems "$EVAL" --out results/gpu-training
