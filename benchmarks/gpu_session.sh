#!/usr/bin/env bash
# A lent GPU session in calls of at most 10 minutes (the device tool's limit), each on a machine
# that may be fresh: every stage first builds the CUDA kernels unless `moe_align._C` already
# imports with them. Logs and result tables go to $OUT, which the device tool brings back; copy
# the tables into benchmarks/results/ and commit them.
#
#   bash benchmarks/gpu_session.sh build       # only the build (a call of its own on a fresh machine)
#   bash benchmarks/gpu_session.sh test-gpu    # the GPU-only tests, verbose (every result line survives a kill)
#   bash benchmarks/gpu_session.sh test-rest   # the other tests (the compile-only sm_90 test left out)
#   bash benchmarks/gpu_session.sh bench-ops   # bench_moe, bench_mla, bench_logprobs
#   bash benchmarks/gpu_session.sh bench-train # bench_train, bench_grpo
#   bash benchmarks/gpu_session.sh bench moe   # named benchmarks only (moe mla logprobs train grpo)
#   bash benchmarks/gpu_session.sh all         # all of it in one go (a longer call)
#   bash benchmarks/gpu_session.sh short       # one call of <= 10 minutes for a session with 15 device
#                                              # minutes: build, GPU-only tests, the target rows only
#
# The device machine gets the working tree without .git: name the commit for the tables' headers,
#   MOE_ALIGN_GIT_SHA=$(git rev-parse --short=12 HEAD) bash benchmarks/gpu_session.sh test-gpu
#
# bench_logprobs times Liger-Kernel and TRL where they are installed; the device machine has no
# package registry, so bring their wheels (Liger's losses and TRL's fused head import with torch,
# triton and transformers only; TRL's trainers need datasets and accelerate, so test_grpo_trl and
# bench_grpo's TRL row skip there):
#   pip download --no-deps liger-kernel==0.8.5 trl==1.16.0 -d benchmarks/peer_wheels
# and name benchmarks/peer_wheels in the device call's carry; every stage installs what is there.
#
# Every step runs under its own time limit (seconds, the STEP_LIMIT_* variables below), so one
# that runs long leaves the others their time and its log still comes back. SESSION_SECONDS (540
# for `short`, unset otherwise) caps the whole call: each step's limit is cut to what is left of
# it, and a step with under 30 s left is skipped, so a fast build leaves its time to the tests.
# Output is unbuffered (a killed step keeps what it printed), and Triton caches autotuning results
# on disk, so a later step or benchmark process on the same machine does not tune the same kernel
# again.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe_align_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
case "$gpu_name" in
  *H100*) tag=h100 ;;
  *H200*) tag=h200 ;;
  "") echo "no GPU (nvidia-smi found none)"; exit 1 ;;
  *) tag=$(echo "$gpu_name" | tr -cs 'A-Za-z0-9' '_' | tr 'A-Z' 'a-z') ;;
esac

clamp() {  # clamp LIMIT: LIMIT, or less when SESSION_SECONDS leaves less (10 s kept for the rest)
  if [ -z "${SESSION_SECONDS:-}" ]; then echo "$1"; return; fi
  local remaining=$((SESSION_SECONDS - SECONDS - 10))
  echo $(($1 < remaining ? $1 : remaining))
}

step() {  # step NAME LIMIT COMMAND...: run it with its log in $OUT/NAME.log, print its tail
  local name=$1 limit=$2
  shift 2
  limit=$(clamp "$limit")
  if [ "$limit" -lt 30 ]; then
    echo "== $name skipped: ${limit}s left of SESSION_SECONDS=$SESSION_SECONDS"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $((SECONDS - start))s$([ $rc -eq 124 ] && echo ' (time limit)')"
  { tail -n "${TAIL_LINES:-25}" "$OUT/$name.log"; echo; } | sed '/^$/d; s/^/   | /'
  return 0
}

install_peers() {  # the carried peer wheels, without dependencies (see the header)
  local wheels=(benchmarks/peer_wheels/*.whl)
  [ -e "${wheels[0]}" ] || return 0
  pip install -q --no-deps --no-index "${wheels[@]}" > "$OUT/peers.log" 2>&1 \
    && echo "== peers installed: ${wheels[*]##*/}" || echo "== peers: install failed, see $OUT/peers.log"
}

build() {
  install_peers
  if python3 -c "import moe_align._build_info as b, moe_align._C, sys; sys.exit(0 if b.WITH_CUDA else 1)" \
      2>/dev/null; then
    echo "== build: moe_align._C with CUDA kernels already imports"
    return
  fi
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  MOE_ALIGN_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    step build "${STEP_LIMIT_BUILD:-300}" pip install --no-deps --no-build-isolation -e .
  python3 -c "import moe_align._build_info as b, moe_align._C; assert b.WITH_CUDA, 'built without CUDA'" \
    || { echo "the build failed: see $OUT/build.log"; exit 1; }
}

# The GPU-only tests: test_cuda_*, test_bf16_on_gpu, the 65536-token addressing test and the
# trainer_gpu smoke tests.
GPU_TESTS='cuda or gpu or 65536'

test_gpu() {
  TAIL_LINES=60 step pytest_gpu "${STEP_LIMIT_TEST_GPU:-420}" \
    python3 -m pytest -v -p no:cacheprovider -rfE --tb=short --durations=10 -k "$GPU_TESTS" tests
}

test_rest() {
  # Not -x: a GPU session is rare, so every failure is worth seeing at once.
  TAIL_LINES=60 step pytest_rest "${STEP_LIMIT_TEST_REST:-480}" \
    python3 -m pytest -q -p no:cacheprovider -rfE --tb=short --durations=10 -k "not ($GPU_TESTS)" \
    --deselect tests/test_triton_sm90.py::test_triton_kernels_compile_for_sm90 tests
}

bench() {  # bench NAME LIMIT EXTRA_ARGS...: benchmarks/bench_NAME.py on the GPU, its table in $OUT
  local name=$1 limit=$2
  shift 2
  limit=$(clamp "$limit")
  # the benchmark stops starting cases a minute before the hard limit, so its table is written
  step "bench_$name" "$limit" python3 "benchmarks/bench_$name.py" --device cuda \
    --time-limit "$((limit > 120 ? limit - 60 : limit / 2))" \
    --markdown "$OUT/${name}_${tag}.md" --csv "$OUT/${name}_${tag}.csv" "$@"
}

bench_ops() {
  bench moe "${STEP_LIMIT_MOE:-200}"
  bench mla "${STEP_LIMIT_MLA:-200}"
  bench logprobs "${STEP_LIMIT_LOGPROBS:-120}"
}

bench_targets() {  # only the rows the issues set GPU targets on
  bench moe "${STEP_LIMIT_MOE:-100}" --shapes v3 --tokens 4096 16384 --sections align moe
  bench mla "${STEP_LIMIT_MLA:-100}" --sections decode prefill --heads 16 128 --batch 128 --cache-len 4096 --s-q 1
  bench logprobs "${STEP_LIMIT_LOGPROBS:-80}" --tokens 8192 --hidden 7168 --vocab 129280
}

bench_train() {
  bench train "${STEP_LIMIT_TRAIN:-240}"
  bench grpo "${STEP_LIMIT_GRPO:-240}"
}

[ "${1:-all}" = short ] && SESSION_SECONDS=${SESSION_SECONDS:-540}
echo "GPU: $gpu_name; commit ${MOE_ALIGN_GIT_SHA:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}; results in $OUT"
build
case "${1:-all}" in
  build) ;;
  test-gpu) test_gpu ;;
  test-rest) test_rest ;;
  bench-ops) bench_ops ;;
  bench-train) bench_train ;;
  bench)
    shift
    for name in "$@"; do
      limit_var="STEP_LIMIT_$(echo "$name" | tr 'a-z' 'A-Z')"
      bench "$name" "${!limit_var:-280}"
    done ;;
  all) test_gpu; test_rest; bench_ops; bench_train ;;
  short) STEP_LIMIT_TEST_GPU=${STEP_LIMIT_TEST_GPU:-200} test_gpu; bench_targets ;;
  *) echo "usage: $0 build|test-gpu|test-rest|bench-ops|bench-train|bench NAME...|all|short"; exit 2 ;;
esac
ls -l "$OUT"
