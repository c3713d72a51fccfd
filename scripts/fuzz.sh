#!/usr/bin/env bash
# Set up (idempotently), then fuzz parse + engine + verdict for RUNS inputs (default 1,000,000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c 'import atheris' 2>/dev/null || .venv/bin/python -m pip install -q --disable-pip-version-check 'atheris>=2.3'
exec .venv/bin/python bench/fuzz.py -atheris_runs="${RUNS:-1000000}" "$@"
