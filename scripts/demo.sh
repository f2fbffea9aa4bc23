#!/usr/bin/env bash
# The main job on the embedded default model: encode an essay, inspect, verify, decode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
set -x
.venv/bin/kvc encode --essay aord.txt -o out/aord.kvc
.venv/bin/kvc inspect out/aord.kvc
.venv/bin/kvc verify --deep out/aord.kvc
.venv/bin/kvc decode out/aord.kvc -o out/aord.safetensors
