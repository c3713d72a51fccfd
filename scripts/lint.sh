#!/usr/bin/env bash
# Set up (idempotently), then the checked style: ruff (lint and format) and mypy over the package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
