#!/usr/bin/env bash
# GPU check for the Triton kernels, for a session that has a device machine (the
# `device` tool): compiled (not interpreted) kernel tests on CUDA, then bench_kernels
# at the paper's shapes. Writes logs and JSON under $OUT (default ./gpu_check_out).
#
# Prepare here first (the GPU image lacks deepspeed/omegaconf/webdataset; the kernel
# tests need only torch, triton, pytest, but tests/conftest.py imports pretrain):
#   echo /.whl/ >> .git/info/exclude; pip download ... -d .whl <wheels>   (see ENVIRONMENT.md)
# then: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    git rev-parse HEAD 2>/dev/null || true
    date -u +%Y-%m-%dT%H:%M:%SZ
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
unset TRITON_INTERPRET
MEMLAYERS_KERNEL_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT/tests.log" || status=1
timeout 240 python3 tools/bench_kernels.py --json "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench.log" || status=1
timeout 60 python3 tools/bench_kernels.py --sweep --plot "$OUT/sweep.png" --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" || status=1
# A short bf16 training run through the Triton path (needs the deepspeed/omegaconf/webdataset wheels).
timeout 240 python3 -m pretrain.train --config configs/tiny.yaml train.dtype=bf16 model.memory.kernel=triton \
    train.max_steps=60 train.eval_every=60 train.log_every=10 "train.run_dir=$OUT/train" \
    "data.cache_dir=$OUT/data" 2>&1 | tee "$OUT/train.log" || status=1
timeout 120 python3 tools/bench_slots.py 2>&1 | tee "$OUT/bench_slots.log" || status=1
exit $status
