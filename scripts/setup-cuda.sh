#!/usr/bin/env bash
# Make nvcc available for building the CUDA kernels, and print its path.
#
# An nvcc already installed (NVCC, CUDA_HOME/CUDA_PATH, PATH) is used as is.
# Otherwise a pinned CUDA 13.0 compiler is installed from PyPI's NVIDIA wheels
# into the project-local, git-ignored .cuda/ (about 270 MB, no root needed,
# nothing outside the checkout is touched). The pins keep every machine
# building the same code: change them together.
#
# Idempotent: a second run finds the installed compiler and does nothing.
# Usage: nvcc=$(scripts/setup-cuda.sh)   (progress goes to stderr)
set -euo pipefail
cd "$(dirname "$0")/.."

found() { echo "$1"; exit 0; }

if [ -n "${NVCC:-}" ] && [ -x "$NVCC" ]; then found "$NVCC"; fi
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then found "$home/bin/nvcc"; fi
done
if command -v nvcc >/dev/null 2>&1; then found "$(command -v nvcc)"; fi

local_nvcc="$PWD/.cuda/pip/nvidia/cu13/bin/nvcc"
if [ -x "$local_nvcc" ]; then found "$local_nvcc"; fi

echo "setup-cuda: no nvcc found; installing CUDA 13.0 nvcc from PyPI into .cuda/pip" >&2
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target .cuda/pip \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 >&2
if [ ! -x "$local_nvcc" ]; then
    echo "setup-cuda: the install finished but $local_nvcc is missing" >&2
    exit 1
fi
"$local_nvcc" --version >&2
found "$local_nvcc"
