#!/usr/bin/env bash
# The device checks, as one prepared script for a lent GPU machine: run it from the repository root.
#
#   bash benchmarks/gpu_checks.sh            # results in $OUT (the device tool's folder) or benchmarks/results/cuda
#
# It needs torch with CUDA, torchdiffeq, scipy, matplotlib, pytest and pytest-xdist (in the device
# image) plus torchsde and trampoline, which the image lacks: download their wheels here with
#   pip download --no-deps -d .wheels torchsde==0.2.6 trampoline==0.1.2
# (add diffusers and its pure-Python dependencies for the overhead peers), ignore .wheels/ in
# .git/info/exclude and carry it. Nothing is fetched there, and the image's own Python is left
# as it is: the wheels go to /tmp/site. Not yet run on a GPU, so its duration is not known; the
# GPU tests come first, then the benchmarks, then the whole suite. compiled.py runs 10 and 50
# steps only: the unrolled loop compiles in time that grows with the steps.
set -uo pipefail
out=${OUT:-benchmarks/results/cuda}
mkdir -p "$out"
if compgen -G ".wheels/*.whl" >/dev/null; then
    python3 -m pip install --no-index --no-deps -q --target /tmp/site .wheels/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site
# Five files come back (the device tool returns at most eight): tests.txt, bench.txt and three JSONs.
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print(torch.__version__)"; } \
    > "$out/tests.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_compiled.py >> "$out/tests.txt" 2>&1
tail -5 "$out/tests.txt"
: > "$out/bench.txt"
python3 benchmarks/overhead.py --device cuda --out "$out/overhead.json" >> "$out/bench.txt" 2>&1
python3 benchmarks/compiled.py --device cuda --steps 10,50 --out "$out/compiled.json" >> "$out/bench.txt" 2>&1
python3 benchmarks/likelihood.py --device cuda --probes 1 4 16 --out "$out/likelihood.json" >> "$out/bench.txt" 2>&1
tail -60 "$out/bench.txt"
echo "== the whole suite (CPU tests in parallel) ==" >> "$out/tests.txt"
python3 -m pytest -q -p no:cacheprovider -n 8 >> "$out/tests.txt" 2>&1
tail -5 "$out/tests.txt"
