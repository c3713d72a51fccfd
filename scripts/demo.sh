#!/usr/bin/env bash
# Set up (idempotently), then run the demo: the seed door in throwaway network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
