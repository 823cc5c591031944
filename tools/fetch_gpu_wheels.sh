#!/usr/bin/env bash
# Download, here, the wheels that tools/gpu_check.sh installs on a lent GPU machine (the
# `device` tool's image has torch 2.11 + triton 3.6 and most of the stack, but not
# deepspeed, omegaconf or pydantic, and it cannot reach PyPI).
# Writes .whl/ (ignored through .git/info/exclude) for Python 3.12 on x86-64 Linux.
# Then: run(command="COMMIT=<sha> bash tools/gpu_check.sh", carry=[".whl"], timeout_s=600), <sha> the
# output of `git rev-parse --short HEAD` here, written out: a $(git ...) in the command would run
# there, on the device copy's .git, which may be stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEST=.whl
mkdir -p "$DEST" .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# Versions: the pins of requirements/cpu.txt where they exist, else those measured to work there.
pin() { grep -E "^$1==" requirements/cpu.txt | cut -d= -f3; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" \
    "omegaconf==$(pin omegaconf)" hjson==3.1.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0
# deepspeed ships only an sdist; building it without ops gives a pure-Python wheel.
"$PY" -m pip wheel -q --no-deps "deepspeed==$(pin deepspeed)" -w "$DEST"
ls -1 "$DEST"
du -sh "$DEST"
