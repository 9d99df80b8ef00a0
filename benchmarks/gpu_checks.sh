#!/usr/bin/env bash
# The device checks, as one prepared script for a lent GPU machine: run it from the repository root.
#
#   bash benchmarks/gpu_checks.sh            # results in $OUT (the device tool's folder) or benchmarks/results/cuda
#
# It needs torch with CUDA, torchdiffeq, scipy, matplotlib and pytest (in the device image) plus
# torchsde and trampoline, which the image lacks: download their wheels here with
#   pip download --no-deps -d .wheels torchsde==0.2.6 trampoline==0.1.2
# (add diffusers and its pure-Python dependencies for the overhead peers), ignore .wheels/ in
# .git/info/exclude and carry it. Nothing is fetched there. About 6 minutes on one H100.
set -uo pipefail
out=${OUT:-benchmarks/results/cuda}
mkdir -p "$out"
if compgen -G ".wheels/*.whl" >/dev/null; then
    python3 -m pip install --no-index --no-deps -q .wheels/*.whl
fi
export PYTHONPATH=$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print(torch.__version__)"; } \
    | tee "$out/gpu.txt"
# The whole suite (CPU tests in parallel) and, on the GPU, tests/test_cuda.py.
python3 -m pytest -q -p no:cacheprovider -n 8 2>&1 | tail -15 | tee "$out/tests.txt"
python3 benchmarks/overhead.py --device cuda --out "$out/overhead.json" 2>&1 | tee "$out/overhead.txt"
python3 benchmarks/compiled.py --device cuda --out "$out/compiled.json" 2>&1 | tee "$out/compiled.txt"
python3 benchmarks/likelihood.py --device cuda --probes 1 4 16 --out "$out/likelihood.json" 2>&1 \
    | tee "$out/likelihood.txt"
