#!/usr/bin/env bash
# GPU check, for a session that has a device machine (the `device` tool): everything issues 16
# and 21 measure on a GPU. A session's device time is 15 minutes, machine start (1-2 min)
# included, at most 10 minutes a command, and a machine left idle for 30 s is given back: plan
# ONE call of the default stages, then at once (while the machine is warm) a second call with
# STAGES="<the ones summary.txt names as not run>" and TOTAL_S = the budget left less ~60 s.
# Stages, in the order they run (the numbers the issues ask for first, so a call cut short keeps
# them; expected seconds from the H200 runs of abf31f5 and 56c59aa, a new stage's estimated):
#   bench      (~75 s)  tools/bench_kernels.py at the paper's shapes: every kernel against its PyTorch
#                       baseline (scoring forward, forward+backward and backward; bag forward and backward)
#   train373   (~210 s) tools/bench_train.py: memory_373m vs its dense baseline, bf16, seq 2048, compiled,
#                       the memory model also with the row-sparse value update (3 variants, ~70 s each;
#                       TRAIN373_COMPILE=both adds the eager pair)
#   train1p3b  (~110 s) tools/bench_train.py: smf_1p3b (memory model), compiled, activation checkpointing full, none
#   skew       (~40 s)  the bag and the scoring backward with Zipf(1.0) rows (the hot-row chunked paths)
#   layer      (~100 s) the whole MemoryPlus layer (its rows first) and the 373M model, Triton vs PyTorch,
#                       each sublayer kind timed alone, and the model compiled vs eager
#   configs    (~15 s)  every launch candidate of the autotuned kernels, p20/p50/p80 (the winners to pin)
#   profile    (~90 s)  tools/profile.py: 373M compiled training steps, operators by kernel time, device busy share
#   objective  (~30 s)  tools/bench_objective.py: the loss on 8 x 2048 x 32K bf16 logits, eager vs compiled
#   attention  (~25 s)  tools/bench_attention.py: document masking, SDPA dense mask vs FlexAttention block mask
#   tests      (~80 s)  the kernel tests compiled (not interpreted) on CUDA (passed on the H200 at abf31f5)
# The first five take ~535 s: one default call (TOTAL_S 560) measures them and names the rest in
# summary.txt; the second call runs what its TOTAL_S allows, in the order above.
# Extra stages (STAGES="..."): sweep (bag bandwidth over d and k), values (dense vs row-sparse
# value update), train (100 steps of tiny.yaml in bf16 on the Triton path).
#
# Time: the whole script keeps within TOTAL_S (default 560 s): each stage runs under the smaller
# of its own limit (TESTS_S, BENCH_S, ...) and the time left, and a stage with under 40 s left is
# skipped and named in summary.txt. A stage at its limit gets SIGTERM, and SIGKILL KILL_GRACE_S
# (15) s later if it has not ended; every tool saves its results as it goes, so what a stage
# measured before its limit comes back. A stage that fails does not stop the others.
#
# Files back (the device tool returns at most 8): summary.txt (machine, versions, commit, each
# stage's exit status and time), tests.log, bench.log (every kernel table), trainbench.log,
# profile.log, and results.tar.gz with every JSON, markdown table and plot (bench_kernels.json,
# bench_train_373m.{json,md}, bench_train_1p3b.{json,md}, bench_skew.json, bench_layer.json,
# launch_configs.json, bench_objective.json, bench_attention.json, sweep.png, values.png),
# re-packed after each stage so a call cut short still returns them.
# Afterwards, here: `python tools/gpu_report.py <files_at of each call, in order>` writes
# benchmarks/<device>/<commit>/ (the raw files and README.md: device, date, commit, the issues'
# numbers against their floors, the training tables).
#
# Prepare here first (the GPU image lacks deepspeed, omegaconf, pydantic):
#   bash tools/fetch_gpu_wheels.sh        (writes .whl/, ~5 MB)
# then: run(command="COMMIT=<git rev-parse --short HEAD> bash tools/gpu_check.sh", carry=[".whl"], timeout_s=600)
# (COMMIT: the device copy's .git may be stale, so name the commit that is being sent.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
WORK="${TMPDIR:-/tmp}/memlayers_gpu_check"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
# The commit every bench JSON records (kernels.benchmark.source_commit): the one named, not the stale .git's.
export MEMLAYERS_COMMIT="${COMMIT:-}"
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
RESULTS="$WORK/results"  # everything but the logs, packed into $OUT/results.tar.gz after each stage
rm -rf "$RESULTS" && mkdir -p "$RESULTS"
pack() { tar czf "$OUT/results.tar.gz.tmp" -C "$RESULTS" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"; }
DEADLINE=$((SECONDS + ${TOTAL_S:-560}))
KILL_GRACE_S=${KILL_GRACE_S:-15}
skipped=()
stage() {  # stage NAME SECONDS LOG CMD...: run CMD within SECONDS and the time left, log appended
    local name=$1 limit=$2 log=$3; shift 3
    local left=$((DEADLINE - SECONDS - KILL_GRACE_S))
    if [ "$left" -lt 40 ]; then
        skipped+=("$name"); summary "$name" "skipped: ${left} s left of TOTAL_S"; return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    local t0=$SECONDS
    # SIGTERM at the limit (the trainer stops after its step, bench_train ends its worker), SIGKILL
    # if the stage has not ended KILL_GRACE_S later (a trainer in a compiling step would not)
    timeout -k "$KILL_GRACE_S" "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    summary "$name" "exit $rc after $((SECONDS - t0)) s (limit $limit s)"
    [ "$rc" -eq 0 ] || status=1
    pack
}
status=0
STAGES=" ${STAGES:-bench train373 train1p3b skew layer configs profile objective attention tests} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
unset TRITON_INTERPRET
export MEMLAYERS_KERNEL_DEVICE=cuda
# Compiling the kernel variants dominates the test time: spread it over workers when xdist is there.
XDIST=(); python3 -c "import xdist" 2>/dev/null && XDIST=(-n 6)
want bench && stage bench "${BENCH_S:-100}" "$OUT/bench.log" \
    python3 tools/bench_kernels.py --json "$RESULTS/bench_kernels.json"
# Training throughput at real sizes on one GPU (issue 16): memory model vs its dense baseline
# of equal active parameters, bf16, Triton kernels, seq 2048, each variant in a fresh process
# (tools/bench_train.py; docs/training.md, "Activation checkpointing and compile", says what to read).
# The memory model also with the row-sparse value update (the pool's cost follows the rows read).
want train373 && stage train373 "${TRAIN373_S:-240}" "$OUT/trainbench.log" \
    python3 tools/bench_train.py --config configs/memory_373m.yaml --dtype bf16 --compile "${TRAIN373_COMPILE:-on}" --ac none \
    --value-optimizers "${TRAIN373_VALUES:-adamw,sparse_rowwise_adamw}" \
    --steps 6 --warmup 3 --rounds 1 --data-cache "$WORK/data373" --json "$RESULTS/bench_train_373m.json" \
    --markdown "$RESULTS/bench_train_373m.md" model.memory.kernel=triton train.global_batch=8 train.micro_batch=8
want train1p3b && stage train1p3b "${TRAIN1P3B_S:-200}" "$OUT/trainbench.log" \
    python3 tools/bench_train.py --config configs/smf_1p3b.yaml --dtype bf16 --compile on --models memory --ac full,none \
    --steps 4 --warmup 3 --rounds 1 --data-cache "$WORK/data1p3b" --json "$RESULTS/bench_train_1p3b.json" \
    --markdown "$RESULTS/bench_train_1p3b.md" model.memory.kernel=triton train.global_batch=4 train.micro_batch=4
# Hot slots (Zipf-distributed rows, as a trained memory reads them): the bag's chunked sorted
# backward, and the scoring backward on the same slots (its hot-key chunks), each also at
# smaller chunk sizes (H200, abf31f5: Zipf 1.77x uniform at ROW_CHUNK 1024; rows read
# 100-1024 times stayed one serial program each).
want skew && stage skew "${SKEW_S:-60}" "$OUT/bench.log" \
    python3 tools/bench_kernels.py --index-skew 1.0 --v-dims 1024 --row-chunks 256 64 --key-chunks 512 128 \
    --json "$RESULTS/bench_skew.json"
# The whole memory layer and the whole model (forward+backward, one micro-batch of 8 x 2048),
# eager by sublayer kind, and compiled (abf31f5, eager only: 41 s; the compiled model adds its
# compilation). The layer's own rows come first, saved to the JSON as each is measured.
want layer && stage layer "${LAYER_S:-150}" "$OUT/bench.log" \
    python3 tools/bench_kernels.py --layer configs/memory_373m.yaml --repeats 10 --json "$RESULTS/bench_layer.json"
# Every launch candidate with p20/p50/p80; the steady winners print as PINNED lines for
# kernels/launch_configs.py (and sit under "pins" in the JSON).
want configs && stage configs "${CONFIGS_S:-100}" "$OUT/bench.log" \
    python3 tools/bench_kernels.py --configs --json "$RESULTS/launch_configs.json"
# The real 373M training step under torch.profiler (compiled, Triton): operators ranked by their
# kernels' time and the device's busy share of the step, the 3 compile/warm-up steps left out.
want profile && stage profile "${PROFILE_S:-100}" "$OUT/profile.log" \
    python3 tools/profile.py --config configs/memory_373m.yaml --steps 6 --skip-steps 3 \
    --trace-dir "$WORK/profile373" "train.run_dir=$WORK/profile373_run" "data.cache_dir=$WORK/data373" \
    model.memory.kernel=triton train.compile=true train.global_batch=8 train.micro_batch=8
# The training objective eager vs compiled (train.compile compiles it): time and peak memory.
want objective && stage objective "${OBJECTIVE_S:-45}" "$OUT/bench.log" \
    python3 tools/bench_objective.py --json "$RESULTS/bench_objective.json"
# model.document_attention: the dense boolean mask in SDPA vs the FlexAttention block mask, fwd+bwd.
want attention && stage attention "${ATTENTION_S:-90}" "$OUT/bench.log" \
    python3 tools/bench_attention.py --json "$RESULTS/bench_attention.json"
# The kernel tests compiled on CUDA (all passed on the H200 at abf31f5).
want tests && stage tests "${TESTS_S:-180}" "$OUT/tests.log" \
    python3 -m pytest -q -p no:cacheprovider "${XDIST[@]}" --durations=8 tests/kernels tests/slots/test_sample_cuda.py
want sweep && stage sweep "${SWEEP_S:-40}" "$OUT/bench.log" \
    python3 tools/bench_kernels.py --sweep --plot "$RESULTS/sweep.png"
# Dense vs row-sparse value update at v_dim 1024 (training on the Triton path with sparse_adamw
# is the "train" stage + optim.value_optimizer=sparse_adamw). The variants of one N are built side
# by side: at 4.2M slots all four would hold 104 GiB, so the row-wise ones only (56 GiB; dense
# adamw stops at --dense-max-slots).
want values && stage values "${VALUES_S:-200}" "$OUT/bench.log" \
    python3 tools/bench_values.py --device cuda --v-dim 1024 --batch 16 --seq-len 2048 --n-keys 256,1024,2048 \
    --variants adamw,sparse_rowwise_adamw,sparse_rowwise_adamw:bf16 \
    --dense-max-slots 1048576 --repeats 5 --layer-n-keys 0 --plot "$RESULTS/values.png"
want train && stage train "${TRAIN_S:-100}" "$OUT/bench.log" \
    python3 -m pretrain.train --config configs/tiny.yaml train.dtype=bf16 model.memory.kernel=triton \
    train.max_steps=100 train.eval_every=100 train.log_every=10 train.checkpoint_every=100 \
    "train.run_dir=$WORK/train" "data.cache_dir=$WORK/data"
[ "${#skipped[@]}" -eq 0 ] || summary "not run" "rerun with STAGES='${skipped[*]}'"
exit $status
