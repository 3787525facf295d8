#!/usr/bin/env bash
# The GPU check: the CUDA tests, then the benchmark with torchvision's AlexNet in the same run.
#
#   bash bench/gpu_check.sh OUT_DIR          (or: make gpu-check OUT=OUT_DIR)
#
# For a GPU machine that has torch and torchvision but no network: the project's other
# requirements come from wheels in .whl/ made beforehand where pip reaches PyPI
# (bash bench/make_wheelhouse.sh), carried to the machine with the repository, and installed with
# pip --no-index. The repository is used in place (PYTHONPATH), not installed. Each stage has its
# own time limit (GPU_CHECK_*_LIMIT_S: 6.5 minutes in all on one GPU if every stage ran to its
# limit, where the overlap stage skips in seconds, 8 on two or more; a lease of 15 minutes then has
# room for a machine's start and a second run), and the
# benchmarks write their JSON after every row, so a stage cut short still leaves what it finished.
# Without CUDA every CUDA test skips with its reason and the benchmark runs its tiny CPU form
# instead: the script itself is tested that way on CPU (tests/test_bench_smoke.py).
#
# OUT_DIR receives: gpu-check.log (everything), env.txt, cuda-tests.log, cuda-tests.xml (JUnit),
# bench.txt (the table and ratios), bench.json, sync-debug.txt / .json (the training step under
# torch.cuda.set_sync_debug_mode("error"): a host sync in a step is an error that names it),
# overlap.txt / .json (the DDP step at dp=2, eager and compiled with and without the gradient
# all-reduce overlapped with the backward; both from bench/step_check.py), and data.txt /
# data.json: the input pipeline on real photos in ImageNet's shapes and in the paper's stored form,
# with CPU decode (images per CPU-second: per core) and with data.decode=gpu, set against the
# training step's images/s from bench.json.
# Exit status: 0 all ran and passed; 1 a CUDA test failed, a benchmark row errored or a step synced
# with the host; 2 bad usage or a requirement missing.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2
  exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TEST_LIMIT_S=${GPU_CHECK_TEST_LIMIT_S:-120}
BENCH_LIMIT_S=${GPU_CHECK_BENCH_LIMIT_S:-120}
DATA_LIMIT_S=${GPU_CHECK_DATA_LIMIT_S:-45}
SYNC_LIMIT_S=${GPU_CHECK_SYNC_LIMIT_S:-45}
OVERLAP_LIMIT_S=${GPU_CHECK_OVERLAP_LIMIT_S:-90}
DECODE_LIMIT_S=${GPU_CHECK_DECODE_LIMIT_S:-45}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu-check.log") 2>&1
tee_pid=$!
trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT  # the log is complete when the script returns
started=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - started )) s)"; }
run_stage() {  # TITLE LIMIT_S TXT COMMAND...: one stage under its limit, its output also in OUT/TXT
  local title=$1 limit=$2 txt=$3 rc
  shift 3
  stage "$title (limit $limit s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "$title: stopped at the $limit s limit; its JSON has the rows it finished"
  [ "$rc" -ne 0 ] && status=1
  return 0
}

stage "environment"
{
  date -u '+%Y-%m-%d %H:%M UTC'
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain -- distalex bench tests 2>/dev/null | grep -q . && echo ' + uncommitted changes')"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
  "$PYTHON" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "| torch", torch.__version__, "| torchvision", torchvision.__version__); print("CUDA:", torch.cuda.is_available() and f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" or "not available")'
} | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: $PYTHON cannot import torch and torchvision"; exit 2; }
has_cuda=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')

stage "requirements"
WHEELHOUSE=${WHEELHOUSE:-.whl}
importable() { "$PYTHON" -c 'import pydantic, yaml, numpy, PIL, braceexpand, webdataset, pytest' "$@"; }
if importable 2>/dev/null; then
  echo "requirements: already importable"
elif [ -f "$WHEELHOUSE/requirements.txt" ]; then
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELHOUSE" -r "$WHEELHOUSE/requirements.txt" \
    && importable && echo "requirements: installed from $WHEELHOUSE" \
    || { echo "error: installing the requirements from $WHEELHOUSE failed"; exit 2; }
else
  echo "error: requirements missing and no $WHEELHOUSE/requirements.txt; where pip reaches PyPI run"
  echo "       'bash bench/make_wheelhouse.sh' (for this machine's Python) and bring .whl/ along"
  importable
  exit 2
fi

status=0
stage "CUDA tests (limit ${TEST_LIMIT_S} s)"
timeout --kill-after=10 "$TEST_LIMIT_S" "$PYTHON" -m pytest -p no:cacheprovider -q -rs -m cuda tests/test_cuda.py \
  --junitxml="$OUT/cuda-tests.xml" -o junit_family=xunit1 2>&1 | tee "$OUT/cuda-tests.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "CUDA tests: stopped at the ${TEST_LIMIT_S} s limit"
[ "$rc" -ne 0 ] && status=1

if [ "$has_cuda" = 1 ]; then
  # The comparisons that decide the goals first (bf16 + channels_last, eager then compiled), then
  # the rows that decide the defaults (fp32, NCHW, CUDA graphs). The JSON is written after every
  # row, so a stage cut short by its limit keeps the rows it finished. One compile takes ~1 min.
  rows=distalex/eager/bf16/channels_last,torchvision/eager/bf16/channels_last,distalex-nolrn/eager/bf16/channels_last
  rows+=,distalex/compiled/bf16/channels_last,torchvision/compiled/bf16/channels_last,distalex-nolrn/compiled/bf16/channels_last
  rows+=,distalex/eager/fp32,distalex/eager/bf16,distalex/eager/fp32/channels_last
  rows+=,distalex/compiled-cudagraphs/bf16/channels_last,distalex/compiled/bf16
  bench_args=(--rows "$rows" --warmup 3 --iters 5 --windows 5)
else
  bench_args=(--tiny --rows distalex/eager/fp32,torchvision/eager/fp32,distalex-nolrn/eager/fp32,distalex/eager/fp32/channels_last,torchvision/eager/fp32/channels_last,distalex-nolrn/eager/fp32/channels_last)
  echo "no CUDA: the benchmark's tiny CPU form"
fi
run_stage benchmark "$BENCH_LIMIT_S" bench.txt "$PYTHON" bench/bench.py "${bench_args[@]}" --json "$OUT/bench.json"

# The training step as it runs: no host sync in it (on CUDA; without it the rows skip with the
# reason), and what overlapping the gradient all-reduce with the backward gains (two GPUs; with one
# it skips with the reason; without CUDA its tiny form on two gloo CPU ranks).
step_checks() {
  step_check sync "step without host syncs" "$SYNC_LIMIT_S" sync-debug
  step_check overlap "gradient all-reduce overlap" "$OVERLAP_LIMIT_S" overlap
}
step_check() {  # CHECK TITLE LIMIT_S FILE: bench/step_check.py CHECK into OUT/FILE.json and .txt
  local size_args=()
  [ "$has_cuda" = 1 ] || size_args=(--tiny)
  run_stage "$2" "$3" "$4.txt" "$PYTHON" bench/step_check.py "$1" ${size_args[@]+"${size_args[@]}"} --json "$OUT/$4.json"
}
step_checks

if [ "$has_cuda" = 1 ]; then
  cores=$(nproc)
  data_args=(--images 1280 --workers $(( cores > 8 ? 8 : cores )))
else
  data_args=(--images 48 --batch 8 --workers 2)
  echo "no CUDA: the input pipeline's tiny form (data.decode=gpu decodes on this process's CPU)"
fi
run_stage "input pipeline" "$DATA_LIMIT_S" data.txt "$PYTHON" bench/data.py "${data_args[@]}" --repeats 1 \
  --pipelines distalex,distalex-gpu,torchvision --feeds "$OUT/bench.json" --json "$OUT/data.json"

# The training rank's data.decode=gpu rate (bench/decode.py: batched decode and crop on the GPU)
# against the CPU loader on the same shards: decode.txt, decode.json. On this CPU without CUDA.
gpu_decode_rate() {
  local cores
  local args=(--images 32 --batch 8 --workers 2 --repeats 1)
  if [ "$has_cuda" = 1 ]; then
    cores=$(nproc)
    args=(--images 1024 --batch 128 --workers $(( cores > 8 ? 8 : cores )) --repeats 3)
  else
    echo "no CUDA: the GPU decode rate's tiny form, on this CPU"
  fi
  run_stage "GPU decode rate" "$DECODE_LIMIT_S" decode.txt "$PYTHON" bench/decode.py "${args[@]}" --json "$OUT/decode.json"
}
gpu_decode_rate

stage "done: exit status $status"
exit $status
