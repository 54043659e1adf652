#!/usr/bin/env bash
# Issue 20's GPU measurements, in one run on a lent GPU machine (results: results/gpu.md):
# describe speed through `Index.add` (extract_speed.py) for crop, pyramid and roi at a few
# decode-thread counts, the forward-pass probe (network_probe.py), and the extraction tests
# with CUDA picked by --device auto.
#
#   bash benchmarks/gpu_describe.sh IMAGES OUT [WORKERS...]
#
# FAISS comes from .whl/ when a wheel was carried there (the machine has no package index).
set -u
IMAGES=${1:?folder of images}
OUT=${2:?folder for the JSON results}
shift 2
WORKERS=${*:-2 6 14}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 2
fi
python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 2; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "cores: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
python3 benchmarks/network_probe.py --device cuda --json "$OUT/probe.json"
for w in $WORKERS; do
    python3 benchmarks/extract_speed.py --device cuda --images "$IMAGES" --limit 400 --roi-limit 400 \
        --backends torch-resnet50 --modes crop,pyramid,roi --workers "$w" --batch-size 64 --json "$OUT/speed_w$w.json"
done
timeout 120 python3 -m pytest -q -x -n 8 -p no:cacheprovider tests/test_extractor.py tests/test_backbone.py tests/test_pyramid.py 2>&1 | tail -15
