#!/usr/bin/env bash
# GPU check for the Triton kernels, for a session that has a device machine (the
# `device` tool): the kernel tests compiled (not interpreted) on CUDA, bench_kernels at
# the paper's shapes and its N sweep, then a short bf16 training run through the Triton
# path. Writes at most 8 files (the device tool returns no more) under $OUT (default
# ./gpu_check_out): summary.txt (machine, versions, commit, each stage's exit status and
# time), tests.log, bench.log (all benchmark tables), bench_kernels.json,
# scoring_configs.json, bench_skew.json, sweep.png, train.log.
#
# Prepare here first (the GPU image lacks deepspeed, omegaconf, webdataset, pydantic):
#   bash tools/fetch_gpu_wheels.sh        (writes .whl/, ~5 MB)
# then: run(command="COMMIT=<git rev-parse HEAD> bash tools/gpu_check.sh", carry=[".whl"], timeout_s=300)
# (COMMIT: the device copy's .git may be stale, so name the commit that is being sent.)
# STAGES picks stages (default all: "tests bench configs skew sweep train"; "configs" times the
# fused scoring under each launch its autotuner considers, "skew" the bag with Zipf-distributed
# rows). Time limits (seconds): TESTS_S, BENCH_S, CONFIGS_S, SKEW_S, SWEEP_S, TRAIN_S.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
WORK="${TMPDIR:-/tmp}/memlayers_gpu_check"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown) (from the .git that travelled; may be stale)}"
    date -u +%Y-%m-%dT%H:%M:%SZ
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
summary() { echo "$1: $2 ($(date -u +%H:%M:%S))" | tee -a "$OUT/summary.txt"; }
stage() {  # stage NAME SECONDS LOG CMD...: run CMD with a time limit, log appended, result in summary.txt
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    summary "$name" "exit $rc after $((SECONDS - t0)) s (limit $limit s)"
    [ "$rc" -eq 0 ] || status=1
}
status=0
STAGES=" ${STAGES:-tests bench configs skew sweep train} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
unset TRITON_INTERPRET
export MEMLAYERS_KERNEL_DEVICE=cuda
# Compiling the kernel variants dominates the test time: spread it over workers when xdist is there.
XDIST=(); python3 -c "import xdist" 2>/dev/null && XDIST=(-n 6)
want tests && stage tests "${TESTS_S:-150}" "$OUT/tests.log" \
    python3 -m pytest -q -p no:cacheprovider "${XDIST[@]}" --durations=8 tests/kernels
want bench && stage bench "${BENCH_S:-120}" "$OUT/bench.log" \
    python3 tools/bench_kernels.py --json "$OUT/bench_kernels.json"
want configs && stage configs "${CONFIGS_S:-90}" "$OUT/bench.log" \
    python3 tools/bench_kernels.py --scoring-configs --json "$OUT/scoring_configs.json"
# Hot slots (Zipf-distributed rows, as a trained memory reads them): the chunked sorted backward.
want skew && stage skew "${SKEW_S:-90}" "$OUT/bench.log" \
    python3 tools/bench_kernels.py --index-skew 1.0 --v-dims 1024 --json "$OUT/bench_skew.json"
want sweep && stage sweep "${SWEEP_S:-40}" "$OUT/bench.log" \
    python3 tools/bench_kernels.py --sweep --plot "$OUT/sweep.png"
# Opt-in (STAGES="values"; 2 more files): dense vs row-sparse value update at v_dim 1024,
# training on the Triton path with sparse_adamw is the "train" stage + optim.value_optimizer=sparse_adamw.
want values && stage values "${VALUES_S:-200}" "$OUT/bench.log" \
    python3 tools/bench_values.py --device cuda --v-dim 1024 --batch 16 --seq-len 2048 --n-keys 256,1024,2048 \
    --dense-max-slots 1048576 --repeats 5 --layer-n-keys 0 --plot "$OUT/values.png"
want train && stage train "${TRAIN_S:-100}" "$OUT/train.log" \
    python3 -m pretrain.train --config configs/tiny.yaml train.dtype=bf16 model.memory.kernel=triton \
    train.max_steps=100 train.eval_every=100 train.log_every=10 train.checkpoint_every=100 \
    "train.run_dir=$WORK/train" "data.cache_dir=$WORK/data"
exit $status
