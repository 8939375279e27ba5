#!/usr/bin/env bash
# Second call on a lent GPU, right after tools/device_release.sh's training call (the machine stays
# warm 30 s): score the test split with the committed weights, once the files that call brought
# back are copied over weights/ (rrdg_*) and tools/baseline_weights/ (the baselines).
# Expects (ignored, carried): .whl/ (nibabel wheel), carry/testpack (pack of the test split:
# python tools/pack_dataset.py pack data/prepared carry/testpack --splits test), and
# carry/highres3dnet.pth. Writes results.json, runs.tar.gz (figure, reports) and the weights
# under $OUT. Usage: bash tools/device_score.sh [BUDGET_SECONDS, default 230]
set -uo pipefail
budget=${1:-230}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout "$budget" python3 tools/train_release.py --pack carry/testpack --out "$OUT" \
  --work /tmp/score --parcellation carry/highres3dnet.pth --device cuda --half-eval \
  --trained weights tools/baseline_weights --gan-seconds 0 --deadline $((budget - 20)) 2>&1 |
  tee "$OUT/log.txt"
