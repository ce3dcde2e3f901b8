#!/bin/bash
# Fill the ignored .whl/ folder with the wheels bench/decode_gpu.py needs on the GPU machine,
# which has torch, transformers and triton but no network: DeepSpeed (a pure-Python wheel built
# here with DS_BUILD_OPS=0; its kernels compile just in time there, with the ninja wheel), its
# small dependencies, and torchao. Target: CPython 3.12 on x86-64, as on that machine.
#
#   bash bench/wheels.sh          # from the project root, on a machine with PyPI access
#
# Needs torch in the Python that builds the DeepSpeed wheel (its setup.py imports torch): the
# project's .venv by default (PY=...). Idempotent: wheels already in .whl/ are kept. Total about
# 10 MB, well under the 64 MiB a device call may carry. The package's own wheel goes there too:
#   .venv/bin/pip wheel -q --no-deps --no-build-isolation . -w .whl
# On the GPU machine (run with carry [".whl"]), first thing in the command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEEPSPEED=${DEEPSPEED:-deepspeed==0.19.8}
TORCHAO=${TORCHAO:-torchao==0.18.0}
# DeepSpeed's runtime dependencies the GPU machine lacks (torch, numpy, packaging, tqdm are there).
DEPS="hjson msgpack py-cpuinfo einops ninja psutil"

mkdir -p .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude

if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$DEEPSPEED"
fi

platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 any; do
  platforms="$platforms --platform $p"
done
target="--only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl"
"$PY" -m pip download -q --no-deps $target $DEPS "$TORCHAO"
# pydantic with its dependencies: pydantic-core must be the exact version pydantic names.
"$PY" -m pip download -q $target pydantic

ls -l .whl
du -sh .whl
