#!/usr/bin/env bash
# Prepare, on the development machine, what the GPU machine needs for issue 5's GPU figure
# (vectorized against serial, LeNet cohorts of 25), then print the one command to give it.
#
# The GPU machine (see bench/README.md, "On a GPU") reaches no package index and no ../shared:
# its python3 holds a CUDA torch, numpy, scikit-learn, matplotlib, PyYAML, tqdm and psutil, but not
# pydantic. So this fetches pydantic's wheels for that python (3.12, x86-64) into .whl/ and copies
# MNIST into .gpu-data/, both ignored by git, to be carried along.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FEDSLIM_BENCH_DATA:-../shared/data}
PY=${PYTHON:-python3}

EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
for d in /.whl/ /.gpu-data/; do
    grep -qxF "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >> "$EXCLUDE"
done
rm -rf .whl && mkdir -p .whl
# Versions pinned as a set: pydantic-core must be the one this pydantic was built against.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
rm -rf .gpu-data && mkdir -p .gpu-data
cp -r "$DATA/mnist" .gpu-data/mnist
du -sh .whl .gpu-data

cat <<'CMD'

Then, with the device tool (one call, about 5 minutes; carry: [".whl", ".gpu-data"]):

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && nvidia-smi -L && python3 bench/compare.py --data-dir .gpu-data --device cuda --workloads lenet --contenders floor fedslim-serial fedslim-vectorized --repeat 1 --json $OUT/gpu.json 2>&1 | tee $OUT/log
CMD
