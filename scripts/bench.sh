#!/usr/bin/env bash
# Set up (idempotently), then run the benchmarks in throwaway namespaces and write
# bench/results/report.{md,json}. Pass --smoke for a quick check, --repeat N for more runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python bench/run.py "$@"
