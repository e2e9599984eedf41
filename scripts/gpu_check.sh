#!/usr/bin/env bash
# The GPU check (docs/gpu.md), for a machine with an NVIDIA GPU:
#
#   1. prints the GPU, its driver and ONNX Runtime's providers;
#   2. builds one package per embedding scheme (generated Criteo-shaped data, one epoch each);
#   3. loads each on CUDA as 'ctrserve serve' does, checks its scores against a CPU session
#      (parity 1e-5), prints where ONNX Runtime placed the nodes and the in-process rows/s
#      (scripts/gpu_parity.py; exits non-zero when a package fails);
#   4. runs the serving benchmark ('ctrserve bench serve') with the server on CUDA.
#
#   scripts/gpu_check.sh [OUT]                      # OUT: runs/gpu-check
#   GPU_CHECK_PROVIDER=cpu scripts/gpu_check.sh     # the same steps on CPU (a rehearsal)
#
# Needs the train, bench and gpu extras in the environment of $PYTHON (default .venv/bin/python):
#   pip install -c requirements/constraints.txt -e '.[train,bench,gpu]'
# The CPU rehearsal took 7 minutes on 2 cores, most of it training; GPU_CHECK_SCHEMES narrows
# the schemes (default: all nine).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/gpu-check}
PROVIDER=${GPU_CHECK_PROVIDER:-cuda}
SCHEMES=${GPU_CHECK_SCHEMES:-full hash qr kpart pep int8 fp16 lma robe}
BENCH_SCHEME=${GPU_CHECK_BENCH_SCHEME:-qr}
ctrserve() { "$PYTHON" -m ctrserve "$@"; }

mkdir -p "$OUT"
echo "== the machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,compute_cap,memory.total --format=csv \
        | tee "$OUT/gpu.csv"
else
    echo "no nvidia-smi on this machine"
fi
"$PYTHON" -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, \
ort.get_available_providers())"
"$PYTHON" -c "from ctrserve.service.cuda import cuda_unavailable_reason as why; \
print('CUDA:', why() or 'usable')"

echo "== one package per scheme"
ctrserve generate criteo --rows 40000 --scale 200 --seed 1 --out "$OUT/data"
for scheme in $SCHEMES; do
    ctrserve train --data "$OUT/data/data.parquet" --spec "$OUT/data/spec.json" \
        --scheme "$scheme" --dim 16 --bottom 64,16 --top 64 --epochs 1 --no-progress \
        --out "$OUT/checkpoints/$scheme"
    ctrserve export "$OUT/checkpoints/$scheme" --repo "$OUT/repo" --name "$scheme" \
        --version 1 --overwrite >/dev/null
    echo "exported $OUT/repo/$scheme/1"
done

echo "== each package on $PROVIDER against CPU: parity, placement, in-process rows/s"
packages=()
for scheme in $SCHEMES; do packages+=("$OUT/repo/$scheme/1"); done
"$PYTHON" scripts/gpu_parity.py --provider "$PROVIDER" --out "$OUT/parity.json" "${packages[@]}"

echo "== the serving benchmark, server on $PROVIDER ($BENCH_SCHEME)"
# The benchmark starts the server itself: the provider and one worker reach it through the
# environment (its flags leave both unset).
CTRSERVE_PROVIDER="$PROVIDER" CTRSERVE_WORKERS=1 ctrserve bench serve \
    --package "$OUT/repo/$BENCH_SCHEME/1" --out "$OUT/bench" \
    --experiments ceiling,closed,single --batching on --apis v2-binary,columns \
    --single-apis v2-binary --concurrency 1,32 --duration 4 --warmup 1 --ceiling-seconds 2
echo "reports: $OUT/parity.json, $OUT/bench/report.md"
