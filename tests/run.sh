#!/usr/bin/env bash
# The one test command: `bash tests/run.sh [pytest args]`, from any directory.
#
# 1. Builds or refreshes two virtual environments inside the repository (both gitignored):
#    .venv          the WebUI's pins (tests/env/requirements-webui-pins.txt) plus the ldm package installed with
#                   --no-deps (tests/env/requirements-ldm.txt); the tests run here.
#    .venv-interop  diffusers + peft and the newer packages they need (tests/env/requirements-interop.txt); only
#                   tests/interop/diffusers_worker.py runs here, as a subprocess.
#    Each venv keeps a stamp: a hash of its requirement files and of the Python version. A venv whose stamp matches
#    is left alone, so a rerun with nothing changed takes seconds. pip output goes to <venv>/install.log.
# 2. Runs pytest on tests/ in .venv with TRAINER_INTEROP_PYTHON pointing at the interop python. Extra arguments go to
#    pytest (`bash tests/run.sh -k naming`; test paths given there replace the default `tests`). Exit status: pytest's, except that "no tests collected" (5) counts as
#    success with a note.
#
# Environment: TRAINER_PYTHON picks the base interpreter (default python3; 3.10 or 3.11).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

BASE_PYTHON="${TRAINER_PYTHON:-python3}"
ENV_DIR="tests/env"
STAMP_NAME="trainer-requirements.sha256"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

# The hash that decides whether a venv is up to date: the requirement files' bytes and the base Python's version.
requirements_hash() {
    { "$BASE_PYTHON" -c 'import sys; print(sys.version)'; cat "$@"; } | sha256sum | cut -d' ' -f1
}

# venv_is_current VENV HASH: true when VENV's python runs and its stamp holds HASH.
venv_is_current() {
    [[ -x "$1/bin/python" ]] && "$1/bin/python" -c '' 2>/dev/null && [[ "$(cat "$1/$STAMP_NAME" 2>/dev/null)" == "$2" ]]
}

# run_logged LOG CMD...: run CMD with its output appended to LOG; on failure print the log's tail and fail.
run_logged() {
    local log="$1"
    shift
    echo "+ $*" >>"$log"
    if ! "$@" >>"$log" 2>&1; then
        echo "FAILED: $*" >&2
        echo "---- last lines of $log (pip's 'Location ... is ignored' warnings left out) ----" >&2
        grep -v "^WARNING: Location '" "$log" | tail -n 40 >&2
        exit 1
    fi
}

# ensure_venv VENV REQ_FILE [NODEPS_REQ_FILE]: create/refresh VENV unless its stamp is current.
ensure_venv() {
    local venv="$1" req="$2" nodeps="${3:-}"
    local files=("$req")
    [[ -n "$nodeps" ]] && files+=("$nodeps")
    local hash
    hash="$(requirements_hash "${files[@]}")"
    if venv_is_current "$venv" "$hash"; then
        echo "$venv: up to date"
        return
    fi
    echo "$venv: installing ${files[*]} (log: $venv/install.log)"
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c '' 2>/dev/null; then
        rm -rf "$venv"
        "$BASE_PYTHON" -m venv "$venv"
    fi
    rm -f "$venv/$STAMP_NAME"
    local log="$venv/install.log"
    : >"$log"
    run_logged "$log" "$venv/bin/python" -m pip install -r "$req"
    if [[ -n "$nodeps" ]]; then
        run_logged "$log" "$venv/bin/python" -m pip install --no-deps -r "$nodeps"
    fi
    echo "$hash" >"$venv/$STAMP_NAME"
}

t0="$(now)"
ensure_venv .venv "$ENV_DIR/requirements-webui-pins.txt" "$ENV_DIR/requirements-ldm.txt"
ensure_venv .venv-interop "$ENV_DIR/requirements-interop.txt"
echo "environment setup: $(elapsed "$t0")"

# Tests never reach a model hub: fail fast instead of waiting on the network.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export HF_HUB_DISABLE_TELEMETRY=1
export TRAINER_INTEROP_PYTHON="$REPO/.venv-interop/bin/python"

# Test paths given on the command line (`bash tests/run.sh tests/test_install.py`) replace the default `tests`.
targets=(tests)
for arg in "$@"; do
    [[ "$arg" != -* && -e "${arg%%::*}" ]] && targets=()
done

t1="$(now)"
set +e
.venv/bin/python -m pytest "${targets[@]}" -q "$@"
rc=$?
set -e
echo "tests: $(elapsed "$t1")"
if [[ $rc -eq 5 ]]; then
    echo "note: pytest collected no tests (exit 5); counted as success"
    rc=0
fi
exit "$rc"
