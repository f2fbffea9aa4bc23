#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, real-weight tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
