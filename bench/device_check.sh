#!/usr/bin/env bash
# One call on a lent CUDA machine (its own torch and Triton; nothing installed): the CUDA-relevant
# tests, the in-place kernels alone, then the GPU suite. Logs and the JSON reports go to $OUT
# (or ./device-out). Sized for about 8 minutes on one H100/H200.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-device-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -x tests/test_gemv.py tests/test_step_graphs.py tests/test_attention.py tests/test_decode_gpu.py \
    2>&1 | tee "$out/tests.log" | tail -20
timeout 60 python3 bench/gemv_check.py 2>&1 | tee "$out/gemv_check.log" | tail -12
timeout 420 python3 bench/gpu_suite.py --report "$out/gpu_suite.json" 2>&1 | tee "$out/gpu_suite.log" | tail -40
