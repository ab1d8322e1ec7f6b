#!/usr/bin/env bash
# One device call that asks Nsight Compute where a kernel's warps stall, per SASS instruction:
# build flashrt-kernels (sm_90a), then for each probe of scripts/ncu_probe.py profile one launch
# with the full section set and source counters, and export, packed into $OUT/ncu_<probe>.tgz,
#   <probe>_details.txt  the sections (duration, occupancy, warp-state statistics, ...)
#   <probe>_sass.csv     every SASS instruction with its executed count and stall samples
# Read the CSV with scripts/ncu_hotspots.py. Usage: bash scripts/ncu_source.sh [attn gemm ...]
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${OUT:-./gpu_out}"
mkdir -p "$RES"
PY=python3
$PY -c "import platformdirs" 2>/dev/null || $PY -m pip install -q --no-index --find-links wheelhouse platformdirs
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
t0=$(date +%s)
if [ -n "${FLASHRT_GPU_CHECK_BUILT:-}" ]; then  # built already (FLASHRT_LINEINFO=1 gpu_check.sh build)
  echo "build: the one installed"
else
  CUDAARCHS=90a CMAKE_ARGS="-DFLASHRT_PTXAS_VERBOSE=ON -DCMAKE_CUDA_FLAGS=-lineinfo" $PY -m pip install \
    --no-build-isolation --no-deps -v ./packages/flashrt-core ./packages/flashrt-kernels > "$RES/build.log" 2>&1 \
    || { tail -30 "$RES/build.log"; exit 1; }
  echo "build ok in $(( $(date +%s) - t0 )) s"
fi
declare -A KERNEL=([attn]=attn_fwd [combine]=attn_combine [gemm]=skinny_gemm)
for probe in "${@:-attn}"; do
  rep="$RES/$probe"
  ncu --clock-control none --set full --import-source yes -k "regex:${KERNEL[$probe]}" --launch-skip 2 \
    --launch-count 1 -f -o "$rep" $PY scripts/ncu_probe.py "$probe" > "$RES/${probe}_ncu.log" 2>&1 \
    || { echo "ncu $probe failed"; tail -5 "$RES/${probe}_ncu.log"; continue; }
  ncu -i "$rep.ncu-rep" --page details > "$RES/${probe}_details.txt" 2>&1
  ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$RES/${probe}_sass.csv" 2>&1
  echo "== $probe"
  grep -E "^ +(Duration|Registers Per Thread|Achieved Occupancy|Warp Cycles Per Issued Instruction|Executed Ipc Active|Block Limit Registers|Dynamic Shared Memory Per Block|Grid Size)" \
    "$RES/${probe}_details.txt"
  $PY scripts/ncu_hotspots.py "$RES/${probe}_sass.csv" --top 25 || true
  # one file per probe (the device tool returns few files): the report stays behind, the text
  # and CSV exports come back as $RES/ncu_<probe>.tgz
  tar czf "$RES/ncu_$probe.tgz" -C "$RES" "${probe}_details.txt" "${probe}_sass.csv" "${probe}_ncu.log" \
    && rm -f "$RES/${probe}_details.txt" "$RES/${probe}_sass.csv" "$RES/${probe}_ncu.log" "$rep.ncu-rep"
done
