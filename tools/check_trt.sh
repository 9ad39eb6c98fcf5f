#!/usr/bin/env bash
# TensorRT code checks that need no GPU (CI calls this):
#   1. mypy --strict on the TensorRT / pycuda modules against tensorrt-stubs + stubs/pycuda
#   2. no TensorRT API removed in 10.0 anywhere in the repo's Python code
set -euo pipefail
cd "$(dirname "$0")/.."

stubs=$(mktemp -d)
trap 'rm -rf "$stubs"' EXIT
python tools/prepare_trt_stubs.py "$stubs"
MYPYPATH="$stubs" python -m mypy --config-file mypy-trt.ini

python tools/check_trt_api.py
