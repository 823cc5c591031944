#!/usr/bin/env bash
# The CPU tests of what tools/gpu_check.sh runs (model, kernels, compile, activation checkpointing,
# one-rank training, the bench tools, the HF export) under torch 2.11 + triton 3.6, the versions
# of the lent GPU machines' image (the project's venv has torch 2.13 + triton 3.9): a Python error
# there costs a GPU session's scarce minutes. Run it by hand before a GPU session; it is not in
# .ci/run: torch 2.11's wheel on PyPI is the CUDA build, about 4.6 GB installed with its CUDA
# libraries and about 6 minutes to install on 2 cores, then about 12 minutes of tests.
# numpy < 2.3 as in tools/check_triton_compat.sh (triton 3.6's interpreter). Python 3.12 (the
# image's) where it runs, else python3.
# Skips (exit 0, with the reason) when the packages cannot be installed; fails on test failures.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${TORCH211_VENV:-$HOME/.cache/memlayers/venv-torch211}"
PY=python3
python3.12 -c "" 2>/dev/null && PY=python3.12
if [ ! -f "$VENV/.installed" ]; then
    "$PY" -m venv "$VENV" \
        && grep -vE '^(#|triton==|numpy==)' requirements/cpu.txt > "$VENV/requirements.txt" \
        && "$VENV/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 \
        && "$VENV/bin/python" -m pip install -q -r "$VENV/requirements.txt" torch==2.11.0 triton==3.6.0 "numpy<2.3" \
        && touch "$VENV/.installed" \
        || { echo "check_torch211: could not install torch 2.11 into $VENV: skipped"; exit 0; }
fi
"$VENV/bin/python" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'
# its own extension cache: a build of torch 2.13's venv would not load under 2.11
export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
    TORCH_EXTENSIONS_DIR="$HOME/.cache/memlayers/torch_extensions_torch211" PYTHONPATH="$PWD"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/model tests/kernels tests/export \
    tests/parallel/test_activation_checkpointing.py tests/parallel/test_sparse_values.py \
    tests/train/test_activation_checkpointing_trainer.py tests/train/test_compile_trainer.py \
    tests/train/test_trainer.py tests/train/test_optimizers.py tests/train/test_device_peak.py \
    tests/tools/test_bench_kernels.py tests/tools/test_bench_objective.py tests/tools/test_bench_train.py \
    tests/tools/test_profile.py tests/tools/test_bench_attention.py tests/tools/test_gpu_check_commands.py
