#!/usr/bin/env bash
# One device call of the kernel tuning loop: build flashrt-kernels (sm_90a), run the GEMM and
# attention GPU tests, benchmark the chosen ops. Usage: bash scripts/kernel_iter.sh [bench --only keys]
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${OUT:-./gpu_out}"
mkdir -p "$RES"
ONLY="${1:-skinny,attention,attn}"
PY=python3
$PY -c "import platformdirs" 2>/dev/null || $PY -m pip install -q --no-index --find-links wheelhouse platformdirs
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
t0=$(date +%s)
CUDAARCHS=90a CMAKE_ARGS="-DFLASHRT_PTXAS_VERBOSE=ON" $PY -m pip install --no-build-isolation --no-deps -v \
  ./packages/flashrt-core ./packages/flashrt-kernels > "$RES/build.log" 2>&1 || { tail -30 "$RES/build.log"; exit 1; }
echo "build ok in $(( $(date +%s) - t0 )) s"
grep -E "spill stores" "$RES/build.log" | grep -v " 0 bytes spill" | sort | uniq -c | head
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv,noheader
if [ -z "${SKIP_TESTS:-}" ]; then
  $PY -m pytest -m gpu packages/flashrt-kernels/tests/test_kernels_gpu_gemm.py \
    packages/flashrt-kernels/tests/test_kernels_gpu_attention.py -q -x -p no:cacheprovider > "$RES/pytest.log" 2>&1
  echo "pytest rc=$?: $(tail -1 "$RES/pytest.log")"
  grep -E "^(FAILED|ERROR)|Error|assert" "$RES/pytest.log" | head -8
fi
$PY scripts/bench_kernels.py --only "$ONLY" ${BENCH_ARGS:-} --out "$RES/bench.json" > "$RES/bench.log" 2>&1
echo "bench rc=$?"
grep -E "error|Error" "$RES/bench.log" | head -5
sed -n '/ copy .* TB\/s, bf16/,$p' "$RES/bench.log"
