#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with a CUDA device and PyTorch already installed
# (copy what it writes under $OUT to benchmarks/results/gpu/ and quote it in README's speed
# table; no GPU has been lent to a session with this script yet):
#   1. tests/test_gpu.py: permutation nulls, bootstrap sums and replicates on CUDA equal the
#      CPU's bit for bit; the MLP on CUDA predicts as on the CPU to rounding;
#   2. benchmarks/gpu.py: the same calls timed on both devices;
#   3. benchmarks/extract.py --device cuda: extraction against a bare forward (target <= 5 %);
#   4. the bundled digits example audited with the statistics on CPU and on CUDA from the same
#      traces (verdict rows must be identical), and extracted on CUDA (statuses compared).
# Usage: OUT=dir bash benchmarks/device_check.sh   (wheels of missing packages in .whl/, if any)
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 ROUTEAUDIT_CACHE_DIR=/tmp/ra_cache
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__)"
  nproc; } 2>&1 | tee "$OUT/env.txt"

python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt"
python3 benchmarks/gpu.py --out "$OUT/gpu.txt"
for args in "" "--n 16384 --batch 256 --tokens 128 --dim 1024 --blocks 12" \
            "--n 16384 --batch 256 --tokens 128 --dim 1024 --blocks 12 --autocast bf16" \
            "--adapter fixtures/digits/block_adapter.py"; do
    echo "== benchmarks/extract.py --device cuda $args"
    # shellcheck disable=SC2086
    python3 benchmarks/extract.py --device cuda --repeats 5 $args
done 2>&1 | tee "$OUT/extract.txt"

ex=fixtures/digits/block_adapter.py
python3 -m routeaudit extract "$ex" -o /tmp/ra_traces --device cpu -q --no-cache
python3 -m routeaudit run /tmp/ra_traces --device cpu -q --json "$OUT/verdicts_cpu.json" >/dev/null &
python3 -m routeaudit run /tmp/ra_traces --device cuda -q --json "$OUT/verdicts_cuda.json" >/dev/null &
python3 -m routeaudit run "$ex" --device cuda -q --no-cache --json "$OUT/verdicts_cuda_extracted.json" \
    >/dev/null &
wait
python3 - "$OUT" <<'EOF' 2>&1 | tee "$OUT/verdicts.txt"
import json, sys
out = sys.argv[1]
def rows(name):
    return json.load(open(f"{out}/{name}.json"))["verdicts"]
cpu, cuda, extracted = rows("verdicts_cpu"), rows("verdicts_cuda"), rows("verdicts_cuda_extracted")
print(f"same traces, statistics on CUDA vs CPU: {len(cpu)} verdict rows, identical: {cpu == cuda}")
for a, b in zip(cpu, cuda):
    if a != b:
        print("  differs:", a["audit"], a["cell"], {k for k in a if a[k] != b.get(k)})
same = [(a["audit"], a["cell"], a["status"]) for a in cpu] == \
       [(c["audit"], c["cell"], c["status"]) for c in extracted]
print(f"traces extracted on CUDA: statuses identical to the CPU run: {same}")
for a, c in zip(cpu, extracted):
    print(f"  {a['audit']:<28} {str(a['cell']):<30} cpu {a['status']:<13} cuda {c['status']:<13} "
          f"p {a['p_value']} / {c['p_value']}")
EOF
