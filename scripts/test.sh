#!/usr/bin/env bash
# Set up (idempotently), then run the whole test suite. The real-kernel tests need root; under
# CI=true a skipped real-kernel test fails the run (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -ra "$@"
