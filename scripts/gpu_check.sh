#!/usr/bin/env bash
# GPU check, run ON the CUDA machine from the repository root (no network needed):
#   build + install flashrt-core and flashrt-kernels (CUDAARCHS=90a unless set), run `pytest -m gpu`
#   over packages/, run the kernel benchmark, print a short summary LAST.
# Results and logs go to $OUT (default ./gpu_out). Pure-Python deps missing on the machine are
# installed from ./wheelhouse (made here by scripts/make_wheelhouse.sh; carry it along).
#
#   bash scripts/gpu_check.sh           kernels: build, every `-m gpu` test except the true-size
#                                       model tests, the kernel benchmark (~3 min)
#   bash scripts/gpu_check.sh models    build, the true-size Pi0.5 / Pi0 GPU tests, `flashrt bench`
#                                       for Pi0.5 and Pi0 (~8 min; its own device call)
#   bash scripts/gpu_check.sh profile   build, per-kernel profile of the denoise graph and the stage
#                                       replays (scripts/profile_pipeline.py), and where predict()'s
#                                       host time goes (scripts/profile_host.py, cProfile) (~4 min)
#   bash scripts/gpu_check.sh compile   build, `flashrt bench` for Pi0.5 at 2 views against the reference
#                                       under torch.compile(max-autotune) (~9 min: its own device call).
#                                       Inductor's cache (tuning results, generated kernels) comes
#                                       back as $OUT/inductor_cache.tgz; put that file in the
#                                       repository root and carry it, and the next call on the same card
#                                       type skips what is done (max-autotune needs > 10 min)
#   bash scripts/gpu_check.sh all       both, with the model benchmark at BENCH_VIEWS (default 2) only
#                                       (~5 min: one call that checks everything)
#   bash scripts/gpu_check.sh build     deps + build + import only (for ad-hoc runs after it)
#   bash scripts/gpu_check.sh ab        build, AB_TESTS (pytest arguments, optional), the AB_ENV A/B
#                                       only (~2-3 min: the cheapest measurement of a switch)
#
#   COMPILE_AFTER=1  (modes models / all) the compile stage last, in whatever the budget has left: a
#                    start on max-autotune's tuning that a later `compile` call carries on from
#   MODEL_TESTS=0    (modes models / all) skip the true-size model tests (benchmarks only)
#   PROFILE_HOST=0   (mode profile) skip the host-time profile of predict()
#   AB_ENV="VAR=value ...[; VAR=value ...]"  (modes models / all / ab) after the Pi0.5 bench, the Pi0.5
#                    FP8 bench at AB_VIEWS (default 2) under each ';'-separated environment, then without
#                    any, then under each again: a same-run A/B, alternating (results in the logs
#                    tarball, ab/; p50s in the summary)
#   AB_BASE=ab_base  (modes models / all / ab) one more A/B experiment: the code of another commit,
#                    unpacked here by `bash scripts/ab_base.sh <commit>` into ./ab_base (carry it);
#                    its kernels are built into ab_base/.target and its arms run with its sources first
#                    on PYTHONPATH (for a change a switch cannot turn off: a kernel rewritten in place)
#   AB_CAMERA=HxW    (modes models / all / ab) after the A/B, the plain Pi0.5 FP8 bench once more, fed
#                    HxW camera images (`--camera-size`: the graph then copies and resizes them)
#
#   <mode> --with-compile   on a machine with two GPUs: after the one shared build, the `compile` mode
#                           runs on GPU 1 while <mode> runs on GPU 0 (its results, inductor_cache.tgz
#                           included, packed into $OUT/compile.tgz; its summary is appended to ours).
#                           The max-autotune baseline then costs no device time of its own; its
#                           compile workers share the CPUs, so host times on GPU 0 may be a little higher.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-kernels}"
WITH_COMPILE=$([ "${2:-}" = --with-compile ] && echo 1)
ROOT=$PWD
# Logs go to a work folder; at the end only the summary, the JSON results and one tarball of the
# logs are put in $OUT (the device tool returns a limited number of files).
RESULTS="${OUT:-$ROOT/gpu_out}"
OUT="$RESULTS/.work"
mkdir -p "$OUT"
COMPILE_PID=""
collect() {
  if [ -n "$COMPILE_PID" ]; then  # the compile run on GPU 1: wait for it, then its summary, last
    wait "$COMPILE_PID"
    echo; cat "$RESULTS/compile/summary.txt" 2>/dev/null | sed 's/^/[gpu 1] /' | tee -a "$OUT/summary.txt"
    # one file (the device tool returns few): its JSON, logs and inductor_cache.tgz
    tar czf "$RESULTS/compile.tgz" -C "$RESULTS" compile && rm -rf "$RESULTS/compile"
  fi
  cp "$OUT"/summary.txt "$OUT"/*.json "$RESULTS"/ 2>/dev/null
  tar czf "$RESULTS/gpu_logs.tgz" -C "$OUT" . 2>/dev/null
  rm -rf "$OUT"
}
trap collect EXIT
PY="${PYTHON:-python3}"
export CUDAARCHS="${CUDAARCHS:-90a}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# One overall budget (the device call allows ~420 s): each stage gets at most its own limit and
# never eats the time the later stages and the summary need.
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-$([ "$MODE" = kernels ] && echo 400 || echo 560)}"
BENCH_VIEWS="${BENCH_VIEWS:-$([ "$MODE" = all ] && echo 2 || echo 1,2,3)}"
limit() {  # limit <stage max> <seconds to keep for later stages>
  local left=$(( BUDGET - ($(date +%s) - START) - $2 ))
  [ "$left" -gt "$1" ] && left=$1
  [ "$left" -lt 10 ] && left=10
  echo "$left"
}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
stamp() { date +%s; }

{ nvidia-smi; echo; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda)"; \
  nvcc --version; cmake --version; } > "$OUT/env.txt" 2>&1

# 1. pure-Python dependencies that may be missing (no network: from ./wheelhouse)
[ -n "${FLASHRT_GPU_CHECK_BUILT:-}" ] || missing=$($PY - <<'PYEOF'
import importlib.util
need = {"pluggy": "pluggy", "platformdirs": "platformdirs", "tqdm": "tqdm", "packaging": "packaging",
        "safetensors": "safetensors", "numpy": "numpy", "pytest": "pytest"}
missing = [dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None]
try:  # the packages' pyproject.toml use PEP 639 license strings: setuptools >= 77 builds them
    import setuptools
    if int(setuptools.__version__.split(".")[0]) < 77:
        missing.append("setuptools>=77")
except ImportError:
    missing.append("setuptools>=77")
print(" ".join(missing))
PYEOF
)
if [ -n "${missing:-}" ]; then
  if [ -d wheelhouse ]; then
    # shellcheck disable=SC2086
    $PY -m pip install --no-index --find-links wheelhouse $missing > "$OUT/install_deps.log" 2>&1 \
      && say "deps: installed from wheelhouse: $missing" || say "deps: FAILED to install $missing (see install_deps.log)"
  else
    say "deps: missing $missing and no ./wheelhouse (run scripts/make_wheelhouse.sh and carry wheelhouse)"
  fi
fi

# 2. build + install (offline); a child of --with-compile uses its parent's build
t0=$(stamp)
build_rc=0
build_msg="shared with the parent run"
if [ -z "${FLASHRT_GPU_CHECK_BUILT:-}" ]; then
  if ! $PY -m pip install --no-build-isolation --no-deps ./packages/flashrt-core > "$OUT/install_core.log" 2>&1; then
    # still importable from the source tree (entry-point plugins are then missing)
    export PYTHONPATH="$ROOT/packages/flashrt-core/src${PYTHONPATH:+:$PYTHONPATH}"
    say "install flashrt-core: FAILED (install_core.log); using PYTHONPATH=packages/flashrt-core/src"
  fi
  for pkg in packages/flashrt-pi05 packages/flashrt-pi0 packages/flashrt-pi0fast packages/flashrt-groot packages/flashrt-video; do
    [ -f "$pkg/pyproject.toml" ] && $PY -m pip install --no-build-isolation --no-deps "./$pkg" >> "$OUT/install_models.log" 2>&1
  done
  T_BUILD=$(limit 240 200)
  # nothing later works without the build: under a small budget it takes what the later stages
  # would have kept (a 30 s build limit once cost a whole device call)
  [ "$T_BUILD" -lt 120 ] && T_BUILD=$(limit 240 10)
  # FLASHRT_LINEINFO=1: SASS-to-source line tables, for scripts/ncu_source.sh (no effect on the code)
  [ -n "${FLASHRT_LINEINFO:-}" ] && CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_FLAGS=-lineinfo"
  CMAKE_ARGS="${CMAKE_ARGS:-} -DFLASHRT_PTXAS_VERBOSE=ON" timeout "$T_BUILD" $PY -m pip install --no-build-isolation --no-deps -v ./packages/flashrt-kernels \
    > "$OUT/build_kernels.log" 2>&1
  build_rc=$?
  t1=$(stamp)
  if [ $build_rc -eq 0 ]; then
    build_msg="ok in $((t1 - t0)) s (CUDAARCHS=$CUDAARCHS)"
  else
    build_msg="FAILED rc=$build_rc after $((t1 - t0)) s (build_kernels.log)"
    tail -40 "$OUT/build_kernels.log"
  fi
  grep -E "spill|Used [0-9]+ registers" "$OUT/build_kernels.log" > "$OUT/ptxas.txt" 2>/dev/null
fi
(cd /tmp && $PY -c "import flashrt_kernels as fk; print('flashrt_kernels', fk.__version__, fk.built_archs(), 'devices', fk.device_count())") \
  > "$OUT/import.txt" 2>&1

if [ "$MODE" = build ]; then
  say "device:  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  say "build:   $build_msg"
  say "import:  $(tail -1 "$OUT/import.txt")"
  exit $build_rc
fi
if [ -n "$WITH_COMPILE" ]; then
  if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -lt 2 ]; then
    say "--with-compile: this machine has fewer than two GPUs; the compile baseline is skipped"
  else
    mkdir -p "$RESULTS/compile"
    CUDA_VISIBLE_DEVICES=1 FLASHRT_GPU_CHECK_BUILT=1 OUT="$RESULTS/compile" \
      GPU_CHECK_BUDGET=$(( BUDGET - ($(date +%s) - START) )) bash "$0" compile > "$RESULTS/compile/run.log" 2>&1 &
    COMPILE_PID=$!
    export CUDA_VISIBLE_DEVICES=0
  fi
fi

# The same-run A/B of AB_ENV (modes models / all / ab): sets ab_lines for the summary.
run_ab() {
  ab_lines=""
  mkdir -p "$OUT/ab"
  experiments=()
  [ -n "${AB_ENV:-}" ] && IFS=';' read -r -a experiments <<< "$AB_ENV"
  if [ -n "${AB_BASE:-}" ]; then  # the base commit's code: its kernels built once, for its arms
    local target="$ROOT/$AB_BASE/.target" base_path base_env
    if timeout "$(limit 240 120)" $PY -m pip install --no-build-isolation --no-deps --target "$target" \
         "./$AB_BASE/packages/flashrt-kernels" > "$OUT/build_ab_base.log" 2>&1; then
      base_path="$target"
      for src in "$ROOT/$AB_BASE"/packages/*/src; do base_path="$base_path:$src"; done
      base_env="PYTHONPATH=$base_path"
      experiments+=("$base_env")
    else
      ab_lines="$ab_lines
  AB_BASE: the base build FAILED (build_ab_base.log)"
    fi
  fi
  if [ ${#experiments[@]} -gt 0 ]; then
    # AB_ENV="A=0 B=1; C=0": experiments separated by ';', each arm one process. Order: every
    # experiment, the plain run, every experiment again (alternating, so drift hits both sides).
    arms=("${experiments[@]}" "" "${experiments[@]}")
    i=0
    for env_set in "${arms[@]}"; do
      i=$((i + 1))
      env_set=$(echo "$env_set" | xargs)  # trimmed; empty: the plain run
      T_AB=$(limit 45 $(( ${BENCH_PI0_S:-150} / 2 )))
      # shellcheck disable=SC2086
      ( [ -n "$env_set" ] && export $env_set
        timeout "$T_AB" $PY -m flash_rt.cli bench --config pi05 --views "${AB_VIEWS:-2}" --precision fp8 \
          --iters 200 --p99-iters 200 --no-eager --compile none --out "$OUT/ab/$i.json" > "$OUT/ab/$i.log" 2>&1 )
      label=${env_set:-(plain)}
      [ -n "${base_env:-}" ] && [ "$env_set" = "$base_env" ] && label="base ($AB_BASE)"
      ab_lines="$ab_lines
  $label: $(grep -m1 -E "predict p50" "$OUT/ab/$i.log" | cut -c1-160)"
    done
  fi
  if [ -n "${AB_CAMERA:-}" ]; then  # the plain run again, fed camera-size images (the graph resizes them)
    T_AB=$(limit 45 $(( ${BENCH_PI0_S:-150} / 2 )))
    timeout "$T_AB" $PY -m flash_rt.cli bench --config pi05 --views "${AB_VIEWS:-2}" --precision fp8 \
      --iters 200 --p99-iters 200 --no-eager --compile none --camera-size "$AB_CAMERA" \
      --out "$OUT/ab/camera.json" > "$OUT/ab/camera.log" 2>&1
    ab_lines="$ab_lines
  (plain, --camera-size $AB_CAMERA): $(grep -m1 -E "predict p50" "$OUT/ab/camera.log" | cut -c1-160)"
  fi
}

# 3m. true-size model tests and benchmarks (the product's proof: correctness vs the fp32
#     reference per view count and precision, then the speed of record)
run_models() {
  t0=$(stamp)
  T_MT=$(limit 200 150)
  if [ "${MODEL_TESTS:-1}" = 0 ]; then
    echo "skipped (MODEL_TESTS=0)" > "$OUT/pytest_hopper_gpu.log"
    mt_rc=0
  else
    FLASHRT_GPU_REPORT=$OUT/hopper_gpu.jsonl timeout "$T_MT" $PY -m pytest -m gpu -s -q -rfEs -p no:cacheprovider \
      packages/flashrt-pi05/tests/test_hopper_gpu.py --junitxml="$OUT/pytest_hopper_gpu.xml" > "$OUT/pytest_hopper_gpu.log" 2>&1
    mt_rc=$?
  fi
  mt_line=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/pytest_hopper_gpu.log" | tail -1)
  t1=$(stamp)
  T_B5=$(limit $(( ${BENCH_PI05_S:-200} + $([ "${BENCH_COMPILE:-none}" = none ] && echo 0 || echo ${BENCH_COMPILE_S:-200}) )) 60)
  # BENCH_COMPILE=<mode> adds the torch.compile baseline (runs last, within BENCH_COMPILE_S seconds)
  timeout "$T_B5" $PY -m flash_rt.cli bench --config pi05 --views "$BENCH_VIEWS" --precision fp8,bf16 \
    --compile "${BENCH_COMPILE:-none}" --compile-budget-s "${BENCH_COMPILE_S:-200}" \
    --out "$OUT/pi05.json" --plot > "$OUT/bench_pi05.log" 2>&1
  b5_rc=$?
  run_ab
  T_B0=$(limit ${BENCH_PI0_S:-150} 5)
  timeout "$T_B0" $PY -m flash_rt.cli bench --config pi0 --views "$BENCH_VIEWS" --precision fp8,bf16 --compile none \
    --out "$OUT/pi0.json" > "$OUT/bench_pi0.log" 2>&1
  b0_rc=$?
  t2=$(stamp)
  echo
  echo "==================== gpu_check models summary ($(date -u +%FT%TZ)) ===================="
  say "device:  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  say "build:   $build_msg"
  say "model gpu tests: rc=$mt_rc in $((t1 - t0)) s: $mt_line"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_hopper_gpu.log" | head -20 | cut -c1-240 | tee -a "$SUMMARY"
  grep -hE "cos|cosine" "$OUT/pytest_hopper_gpu.log" | head -24 | cut -c1-200 | tee -a "$SUMMARY"
  say "bench pi05: rc=$b5_rc; bench pi0: rc=$b0_rc (in $((t2 - t1)) s)"
  [ -n "$ab_lines" ] && say "A/B (Pi0.5 FP8, one process each, in this order, after the bench above):$ab_lines"
  tail -18 "$OUT/bench_pi05.log" | tee -a "$SUMMARY"
  tail -14 "$OUT/bench_pi0.log" | tee -a "$SUMMARY"
  [ $build_rc -eq 0 ] && [ $mt_rc -eq 0 ] && [ $b5_rc -eq 0 ] && [ $b0_rc -eq 0 ]
}

# 3c. the torch.compile(max-autotune) baseline, alone in a call (or last, COMPILE_AFTER=1): its
#     autotuning takes minutes. Inductor's cache comes back (inductor_cache.tgz, whole if it fits the
#     device tool's 16 MiB per file, else without inductor_cache/triton); a later call that carries
#     it skips what is done.
run_compile() {
  export TORCHINDUCTOR_CACHE_DIR="$ROOT/inductor_cache"
  [ -f inductor_cache.tgz ] && tar xzf inductor_cache.tgz
  T_C=$(limit 560 15)
  # after `models` / `all` the fast path was just measured: FP8 only here, to leave the time to the tuning
  precisions=$([ "$MODE" = compile ] && echo fp8,bf16 || echo fp8)
  timeout "$T_C" $PY -m flash_rt.cli bench --config pi05 --views 2 --precision "$precisions" --iters 100 \
    --p99-iters 100 --no-eager --compile max-autotune --compile-budget-s $((T_C - 80)) \
    --out "$OUT/pi05_compile.json" > "$OUT/bench_compile.log" 2>&1
  c_rc=$?
  tar czf "$RESULTS/inductor_cache.tgz" inductor_cache 2>/dev/null
  if [ "$(stat -c %s "$RESULTS/inductor_cache.tgz" 2>/dev/null || echo 0)" -gt $((15 * 1024 * 1024)) ]; then
    tar czf "$RESULTS/inductor_cache.tgz" --exclude=inductor_cache/triton inductor_cache 2>/dev/null
  fi
  echo
  echo "==================== gpu_check compile summary ($(date -u +%FT%TZ)) ===================="
  say "device:  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  say "build:   $build_msg"
  tuned=$(grep -c "^AUTOTUNE" "$OUT/bench_compile.log")
  cache_size=$(du -h "$RESULTS/inductor_cache.tgz" 2>/dev/null | cut -f1)
  say "compile baseline: rc=$c_rc in ${T_C} s at most; GEMM shape sets tuned: $tuned; inductor_cache.tgz $cache_size"
  tail -16 "$OUT/bench_compile.log" | tee -a "$SUMMARY"
  return $c_rc
}
if [ "$MODE" = compile ]; then
  run_compile
  exit $?
fi
if [ "$MODE" = ab ]; then  # the A/B alone (and AB_TESTS, pytest arguments run first): the cheapest call
  ab_tests=""
  ab_rc=0
  if [ -n "${AB_TESTS:-}" ]; then
    # shellcheck disable=SC2086
    timeout "$(limit 90 60)" $PY -m pytest -m gpu -q -rfEs -p no:cacheprovider $AB_TESTS > "$OUT/pytest_ab.log" 2>&1
    ab_rc=$?
    ab_tests="rc=$ab_rc $(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/pytest_ab.log" | tail -1)"
  fi
  run_ab
  echo
  echo "==================== gpu_check ab summary ($(date -u +%FT%TZ)) ===================="
  say "device:  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  say "build:   $build_msg"
  [ -n "$ab_tests" ] && say "tests ($AB_TESTS): $ab_tests"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_ab.log" 2>/dev/null | head -10 | cut -c1-220 | tee -a "$SUMMARY"
  say "A/B (Pi0.5 FP8, one process each, in this order):$ab_lines"
  for f in "$OUT"/ab/*.log; do
    [ -f "$f" ] && grep -E "^    [a-z0-9]+x.*: " "$f" | head -4 | sed "s|^|  $(basename "$f" .log): |"
  done | tee -a "$SUMMARY"
  [ $build_rc -eq 0 ] && [ $ab_rc -eq 0 ]  # the call's status: the build and the tests (the A/B only measures)
  exit $?
fi
if [ "$MODE" = models ]; then
  run_models
  models_rc=$?
  [ -n "${COMPILE_AFTER:-}" ] && run_compile
  exit $models_rc
fi

# 3p. where the time goes: per-kernel profile of the denoise graph, stage replays (the compiled
#     baseline has its own mode, `compile`: it needs a whole call)
if [ "$MODE" = profile ]; then
  T_P=$(limit 200 10)
  timeout "$T_P" $PY scripts/profile_pipeline.py --config "${PROFILE_CONFIG:-pi05}" --views "${BENCH_VIEWS:-2}" \
    --precision fp8,bf16 --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1
  p_rc=$?
  T_H=$(limit 90 5)
  [ "${PROFILE_HOST:-1}" = 0 ] || timeout "$T_H" $PY scripts/profile_host.py --config "${PROFILE_CONFIG:-pi05}" --views 2 --calls 300 \
    > "$OUT/profile_host.log" 2>&1
  echo
  echo "==================== gpu_check profile summary ($(date -u +%FT%TZ)) ===================="
  say "device:  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  say "build:   $build_msg"
  say "profile: rc=$p_rc"
  cat "$OUT/profile.log" | grep -v Warning | tail -100 | tee -a "$SUMMARY"
  say "host profile of predict() (scripts/profile_host.py):"
  grep -v Warning "$OUT/profile_host.log" | tail -20 | cut -c1-160 | tee -a "$SUMMARY"
  exit $p_rc
fi

# 3. GPU tests: each kernel test file in its own process (a device fault in one cannot take the
#    others down), then every other package's gpu tests.
t0=$(stamp)
test_rc=0
test_lines=""
for f in packages/flashrt-kernels/tests/test_kernels_gpu_*.py; do
  name=$(basename "$f" .py)
  T_FILE=$(limit 90 100)
  timeout "$T_FILE" $PY -m pytest -m gpu "$f" -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/pytest_$name.xml" > "$OUT/pytest_$name.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && test_rc=$rc
  line=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/pytest_$name.log" | tail -1)
  [ $rc -eq 124 ] && line="TIMEOUT after ${T_FILE} s; last: $line"
  test_lines="$test_lines
  ${name#test_kernels_gpu_}: rc=$rc $line"
done
cat "$OUT"/pytest_test_kernels_gpu_*.log > "$OUT/pytest_gpu_kernels.log"
t1=$(stamp)
T_OTHER=$(limit 60 $([ "$MODE" = all ] && echo 330 || echo 95))
timeout "$T_OTHER" $PY -m pytest -m gpu packages --ignore=packages/flashrt-kernels \
  --ignore=packages/flashrt-pi05/tests/test_hopper_gpu.py -q -rfEs -p no:cacheprovider \
  --junitxml="$OUT/pytest_gpu_other.xml" > "$OUT/pytest_gpu_other.log" 2>&1
other_rc=$?
[ $other_rc -eq 5 ] && other_rc=0  # no gpu tests collected there yet
t1b=$(stamp)
other_line=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/pytest_gpu_other.log" | tail -1)

# 4. kernel benchmark
t2=$(stamp)
T_BENCH=$(limit 120 $([ "$MODE" = all ] && echo 300 || echo 5))
timeout "$T_BENCH" $PY scripts/bench_kernels.py --out "$OUT/bench_kernels.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
t3=$(stamp)

# 5. summary, last
echo
echo "==================== gpu_check summary ($(date -u +%FT%TZ)) ===================="
say "device:  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
say "import:  $(tail -1 "$OUT/import.txt")"
say "build:   $build_msg; ptxas: $(grep -c 'registers' "$OUT/ptxas.txt") kernels, $(grep -cE '[1-9][0-9]* bytes spill stores' "$OUT/ptxas.txt") with spills"
say "kernel tests: rc=$test_rc in $((t1 - t0)) s:$test_lines"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu_kernels.log" | head -30 | cut -c1-220 | tee -a "$SUMMARY"
say "other gpu tests: rc=$other_rc in $((t1b - t1)) s: $other_line"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu_other.log" | head -10 | cut -c1-220 | tee -a "$SUMMARY"
say "bench:   rc=$bench_rc in $((t3 - t2)) s (bench_kernels.json, bench.log)"
sed -n '/TB\/s, bf16/,$p' "$OUT/bench.log" | tee -a "$SUMMARY"
[ $bench_rc -ne 0 ] && tail -12 "$OUT/bench.log" | tee -a "$SUMMARY"
kernels_ok=$([ $build_rc -eq 0 ] && [ $test_rc -eq 0 ] && [ $other_rc -eq 0 ] && [ $bench_rc -eq 0 ] && echo 1)
if [ "$MODE" = all ]; then
  run_models
  models_rc=$?
  [ -n "${COMPILE_AFTER:-}" ] && run_compile
  [ -n "$kernels_ok" ] && [ $models_rc -eq 0 ]
else
  [ -n "$kernels_ok" ]
fi
