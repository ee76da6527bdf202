#!/usr/bin/env bash
# The whole comparison in one command: bash bench/run.sh [compare.py options]
#
# Creates bench/.venv-peers (once; again when the pins or pyproject.toml change) with fedslim (editable, ray extra) and the peers, Flower's
# simulation engine and pfl, then runs bench/compare.py and prints its table. The peers live only in
# that environment, never in fedslim's dependencies. torch is pinned so that pip keeps the CPU build
# it finds instead of pulling a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=bench/.venv-peers
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi
REQS=(-e '.[ray]' torch==2.13.0 'flwr[simulation]==1.41.0' pfl==0.6.0)
# Install again only when the requirements or pyproject.toml changed (fedslim is editable, so code
# changes need none): a machine without the package index, such as a lent GPU machine given a copy
# of a prepared environment, can then run the benchmark.
STAMP="$VENV/.installed"
WANT="$(printf '%s\n' "${REQS[@]}"; sha256sum pyproject.toml)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    "$VENV/bin/pip" install --quiet "${REQS[@]}"
    printf '%s\n' "$WANT" > "$STAMP"
fi
DATA=${FEDSLIM_BENCH_DATA:-../shared/data}
exec "$VENV/bin/python" bench/compare.py --data-dir "$DATA" --json bench/last_run.json "$@"
