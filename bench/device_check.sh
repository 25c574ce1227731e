#!/usr/bin/env bash
# One call on a lent CUDA machine (its own torch and Triton; nothing installed): the CUDA-relevant
# tests, the in-place kernels alone, then the GPU suite. Logs and the JSON reports go to $OUT
# (or ./device-out). At most 9.5 minutes (the time limits below), inside one 600 s device call;
# the suite rewrites its report after each part, so a cut-short run keeps what it measured.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-device-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -c "import numba, transformers, safetensors, tokenizers, psutil, tqdm" 2>&1 | tee -a "$out/gpu.txt" \
    || echo "missing packages: the checks below will fail where they need them" | tee -a "$out/gpu.txt"
timeout -k 10 150 python3 -m pytest -q -x tests/test_gemv.py tests/test_step_graphs.py tests/test_attention.py tests/test_decode_gpu.py \
    tests/test_griffin_reference.py \
    2>&1 | tee "$out/tests.log" | tail -20
timeout -k 10 75 python3 bench/gemv_check.py 2>&1 | tee "$out/gemv_check.log" | tail -12
timeout -k 10 320 python3 bench/gpu_suite.py --runs 2 --no-kernels --report "$out/gpu_suite.json" 2>&1 \
    | tee "$out/gpu_suite.log" | tail -40
