#!/usr/bin/env bash
# The kernel tests in the Triton interpreter under triton 3.6, the version on the lent GPU
# machines (the project's own venv has 3.9): catches kernel code that uses an API the
# older Triton lacks, without a GPU. Then every kernel and launch candidate compiled by
# triton 3.6 for sm_90 (H100/H200) with its bundled ptxas (tools/compile_kernels.py):
# catches what only the compiler rejects (as 3.6's gather assertion did) and prints
# registers and spills per launch (about 2 minutes on 2 cores; COMPAT_COMPILE=0 skips it).
# tqdm: the kernel tests of apply_compile import pretrain.parallel, which imports the export writer.
# numpy < 2.3 because triton 3.6's interpreter calls int() on one-element arrays, which
# newer numpy refuses.
# Skips (exit 0, with the reason) when the packages cannot be installed; fails on test failures.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${TRITON36_VENV:-.cache/venv-triton36}"
if [ ! -f "$VENV/.installed-2" ]; then
    python3 -m venv "$VENV" \
        && "$VENV/bin/python" -m pip install -q torch==2.13.0 \
        && "$VENV/bin/python" -m pip install -q triton==3.6.0 "numpy<2.3" pytest==9.2.0 omegaconf==2.4.0 safetensors "tqdm==4.70.1" \
        && touch "$VENV/.installed-2" \
        || { echo "check_triton_compat: could not install triton 3.6 into $VENV: skipped"; exit 0; }
fi
echo "kernel tests under $("$VENV/bin/python" -c 'import triton; print("triton", triton.__version__)') (interpreter)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/kernels || exit 1
[ "${COMPAT_COMPILE:-1}" = 0 ] && exit 0
env -u TRITON_INTERPRET PYTHONPATH="$PWD" TRITON_DEFAULT_FP_FUSION=1 "$VENV/bin/python" tools/compile_kernels.py --arch 90
